"""The planner's picks for Llama-2 7B and 70B on one and on eight 8 x H100 SXM nodes, sequence 4096.

Usage: python experiments/llama_plans.py
(The cost model alone: nothing this large compiles usefully on a CPU host, and the planner says
so. Global batch 256 x 4096 tokens (about 1M tokens per step), bfloat16 compute, float32
parameters and AdamW moments. Writes results/llama_plans.json and .md: the best layout of each
case with its predicted memory, step time, tokens/s and MFU, and how long planning took.)
"""

from __future__ import annotations

import sys
import time

from common import write_results

LLAMA = {
    "7B": ["model.layers=32", "model.dim=4096", "model.heads=32", "model.kv_heads=32",
           "model.mlp_dim=11008", "model.vocab=32000"],
    "70B": ["model.layers=80", "model.dim=8192", "model.heads=64", "model.kv_heads=8",
            "model.mlp_dim=28672", "model.vocab=32000"],
}  # fmt: skip
TRAIN = ["train.seq_len=4096", "train.batch_size=256", "train.dtype=bfloat16"]
CASES = [(name, devices) for name in LLAMA for devices in (8, 64)]


def main() -> int:
    from jaxpar.config import load_config
    from jaxpar.errors import JaxparError
    from jaxpar.plan.hardware import load_hardware
    from jaxpar.plan.planner import plan

    hw = load_hardware("h100-sxm")
    rows = []
    for name, devices in CASES:
        config = load_config(None, [*LLAMA[name], *TRAIN])
        start = time.perf_counter()
        try:
            result = plan(config, devices, hw, top=3)
        except JaxparError as e:  # the planner's refusal is a result too
            print(f"{name} on {devices} x h100-sxm: {e}", flush=True)
            rows.append({"model": name, "devices": devices, "rank": "-", "layout": str(e),
                         "plan_s": time.perf_counter() - start})  # fmt: skip
            continue
        seconds = time.perf_counter() - start
        for rank, e in enumerate(result.ranked[:3], 1):
            c = e.candidate
            rows.append({
                "model": name, "devices": devices, "rank": rank, "layout": c.describe(),
                "overrides": c.overrides, "microbatches": c.microbatches, "remat": c.remat,
                "memory_gib": e.memory_bytes / 2**30, "step_s": e.step_s,
                "tokens_per_s": e.tokens_per_s, "mfu": e.mfu, "compute_s": e.compute_s,
                "comm_s": e.comm_s, "hidden_s": e.hidden_s, "bubble": e.bubble,
                "searched": result.searched, "plan_s": seconds,
            })  # fmt: skip
        print(f"{name} on {devices} x h100-sxm: {result.searched:,} layouts in {seconds:.1f}s; "
              f"best {result.best.candidate.describe()}", flush=True)  # fmt: skip
    header = ["model", "H100s", "#", "layout", "M", "remat", "GiB/dev", "step s", "tokens/s",
              "MFU", "bubble", "comm exposed s", "layouts searched", "plan s"]  # fmt: skip
    write_results("llama_plans", rows, header, lambda r: [
        r["model"], r["devices"], r["rank"], r["layout"], r["microbatches"], r["remat"],
        f"{r['memory_gib']:.1f}", f"{r['step_s']:.2f}", f"{r['tokens_per_s']:,.0f}",
        f"{r['mfu']:.1%}", f"{r['bubble']:.1%}", f"{r['comm_s'] - r['hidden_s']:.3f}",
        f"{r['searched']:,}", f"{r['plan_s']:.1f}",
    ] if "step_s" in r else [r["model"], r["devices"], "-", r["layout"], *[""] * 9,
                              f"{r['plan_s']:.1f}"])  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
