"""The planner's uneven splits for Llama-3-8B (vocabulary 128,256) on 4 and 8 pipeline stages.

Usage: python experiments/load_balance_plan.py
(The cost model alone, nothing compiled: one layer's F, B and W matmul FLOPs from the model's
shapes, the embedding and the LM head with the loss on the stages the schedule runs them on, each
tick as long as its slowest stage. Sequence 8192, 16 micro-batches. Writes
results/load_balance_plan.json and .md: per schedule and stage count, the lockstep cost (the
slowest stage's FLOPs summed over the ticks, per token of a micro-batch) with the layers balanced
and with the split `choose_split` picks, and the split `plan` and `stage_layers=auto` take.)
"""

from __future__ import annotations

import sys

from common import write_results

LLAMA3_8B = [
    "model.layers=32", "model.dim=4096", "model.heads=32", "model.kv_heads=8",
    "model.mlp_dim=14336", "model.vocab=128256", "train.seq_len=8192", "train.batch_size=64",
    "pipeline.microbatches=16",
]  # fmt: skip
SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("zb_h1", 1), ("interleaved_1f1b", 2), ("zb_v", 2)]


def main() -> int:
    from jaxpar.config import load_config
    from jaxpar.pipeline.schedule import auto_split, schedule_for, split_costs, stage_costs

    rows = []
    for stages in (4, 8):
        for name, repeats in SCHEDULES:
            config = load_config(
                None, [*LLAMA3_8B, f"pipeline.schedule={name}", f"pipeline.repeats={repeats}"]
            )
            schedule = schedule_for(config, stages)
            sizes, even, cost = split_costs(config, stages, schedule)
            layer, extra = stage_costs(config, stages)
            rows.append({
                "schedule": name, "stages": stages, "repeats": repeats,
                "microbatches": schedule.microbatches, "ticks": schedule.granularity,
                "ends_layers": max(extra) / layer[0], "split": list(sizes),
                "taken": list(auto_split(config, stages, schedule) or []) or "balanced",
                "even_lockstep": even, "split_lockstep": cost, "gain": even / cost,
            })  # fmt: skip
    header = ["schedule", "P", "v", "M", "ticks", "ends in layers", "choose_split", "taken",
              "lockstep even GFLOP/token", "lockstep split", "even / split"]  # fmt: skip
    write_results("load_balance_plan", rows, header, lambda r: [
        r["schedule"], r["stages"], r["repeats"], r["microbatches"], r["ticks"],
        f"{r['ends_layers']:.2f}", r["split"], r["taken"], f"{r['even_lockstep'] / 1e9:,.1f}",
        f"{r['split_lockstep'] / 1e9:,.1f}", f"{r['gain']:.3f}x",
    ])  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
