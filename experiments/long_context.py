"""Long context on the `context` axis: per-device memory as the sequence grows, and speed.

Usage: python experiments/long_context.py [--memory-only | --speed-only]

1. Memory (compile only, nothing runs): one small Llama (4 layers, d 256, 8/8 heads, MLP 768,
   float32, batch 1, `model.remat=full`, `model.attention_block=1024`) at sequences of 4K, 16K,
   64K and 128K tokens on `context` = 1, 2, 4, 8 (ring attention, load-balanced), each on that
   many simulated CPU devices: the compiled train step's per-device peak (arguments + outputs +
   temporaries - aliased), the parameters and optimizer state being the same on every layout.
2. Speed (this host, 2 cores under 8 simulated devices: ratios only): the same model at 4K and
   8K tokens on 8 devices, with no context axis (`tensor=8`), ring and all_gather on
   `context=8`, and ring on `context=2,tensor=4`; two rounds over the layouts, alternated (a
   warm-up and a timed step of each per round), the median step of each.

Writes results/long_context.json, .md and .png.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

from common import RESULTS

from jaxpar.mesh import parse_mesh, prepare

MODEL = [
    "model.layers=4", "model.dim=256", "model.heads=8", "model.kv_heads=8", "model.mlp_dim=768",
    "model.vocab=256", "train.batch_size=1", "train.dtype=float32", "model.attention_block=1024",
]  # fmt: skip
SEQS = [4096, 16384, 65536, 131072]
CONTEXTS = [1, 2, 4, 8]
SPEED_SEQS = [4096, 8192]
SPEED_LAYOUTS = [
    ("tensor=8", "ring"),
    ("context=8", "ring"),
    ("context=8", "all_gather"),
    ("context=2,tensor=4", "ring"),
]
ROUNDS = [(1, 1), (1, 1)]  # (timed steps, warm-up steps) per layout per round


def trainer(mesh: str, seq: int, strategy: str, extra: tuple[str, ...] = ()):
    import jax

    from jaxpar.config import load_config
    from jaxpar.mesh import make_mesh
    from jaxpar.placement import Placement
    from jaxpar.train.step import Trainer

    config = load_config(None, [
        *MODEL, f"train.seq_len={seq}", f"model.context_attention={strategy}", *extra,
    ])  # fmt: skip
    spec = parse_mesh(mesh)
    return Trainer(Placement(config, make_mesh(spec, jax.devices()[: spec.size])))


def memory_rows() -> list[dict]:
    rows, start = [], time.perf_counter()
    for seq in SEQS:
        for c in CONTEXTS:
            tr = trainer(f"context={c}", seq, "ring", ("model.remat=full",))
            compiled, compile_s = tr.compile()
            m = compiled.memory_analysis()
            peak = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                    - m.alias_size_in_bytes)  # fmt: skip
            rows.append({
                "seq": seq, "context": c, "peak_bytes": int(peak),
                "temp_bytes": int(m.temp_size_in_bytes),
                "argument_bytes": int(m.argument_size_in_bytes), "compile_s": round(compile_s, 1),
            })  # fmt: skip
            temp = m.temp_size_in_bytes / 2**20
            print(f"[{time.perf_counter() - start:.0f}s] seq {seq:,} context={c}: peak "
                  f"{peak / 2**20:,.1f} MiB per device (temporaries {temp:,.1f} MiB), compile "
                  f"{compile_s:.1f} s", flush=True)  # fmt: skip
            del tr, compiled
    return rows


def speed_rows() -> list[dict]:
    from jaxpar.train.bench import bench

    cases = [(seq, mesh, s) for seq in SPEED_SEQS for mesh, s in SPEED_LAYOUTS]
    trainers = {case: trainer(case[1], case[0], case[2]) for case in cases}
    times: dict = {case: [] for case in cases}
    losses: dict = {}
    start = time.perf_counter()
    for r, (steps, warmup) in enumerate(ROUNDS):
        for case in cases:
            speed = bench(trainers[case], steps, warmup)
            times[case] += speed.step_times_s
            losses[case] = speed.last_loss
            print(f"[round {r + 1}, {time.perf_counter() - start:.0f}s] seq {case[0]:,} {case[1]} "
                  f"{case[2]}: steps {' '.join(f'{t:.2f}' for t in speed.step_times_s)} s, "
                  f"loss {speed.last_loss:.5f}", flush=True)  # fmt: skip
    rows = []
    for seq, mesh, s in cases:
        step = statistics.median(times[(seq, mesh, s)])
        rows.append({
            "seq": seq, "mesh": mesh, "strategy": s if "context" in mesh else "-",
            "median_step_s": round(step, 3), "tokens_per_s": round(seq / step, 1),
            "step_times_s": [round(t, 3) for t in times[(seq, mesh, s)]],
            "loss": losses[(seq, mesh, s)],
        })  # fmt: skip
    return rows


def plot(memory: list[dict], speed: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    for c in CONTEXTS:
        rows = [r for r in memory if r["context"] == c]
        ax.plot([r["seq"] for r in rows], [r["peak_bytes"] / 2**30 for r in rows], "o-",
                label=f"context={c}")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("sequence (tokens), batch 1")
    ax.set_ylabel("compiled peak GiB per device")
    ax.set_title("memory per device falls as 1/context")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    ax = axes[1]
    labels = [f"{r['mesh']}\n{r['strategy']}" for r in speed if r["seq"] == SPEED_SEQS[0]]
    width = 0.8 / len(SPEED_SEQS)
    for k, seq in enumerate(SPEED_SEQS):
        rows = [r for r in speed if r["seq"] == seq]
        xs = [i + k * width for i in range(len(rows))]
        ax.bar(xs, [r["tokens_per_s"] for r in rows], width, label=f"{seq:,} tokens")
    ax.set_xticks([i + width * (len(SPEED_SEQS) - 1) / 2 for i in range(len(labels))], labels)
    ax.set_ylabel("tokens/s (this host: 2 cores, 8 simulated devices)")
    ax.set_title("training speed, batch 1")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str]) -> int:
    # Without the runtime settings: XLA:CPU's split of temporaries into 32 MiB heaps would count
    # blocks larger than that once per heap, not the memory a device needs.
    prepare(parse_mesh("data=8"))
    path = RESULTS / "long_context.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    memory = previous.get("memory", []) if "--speed-only" in argv else memory_rows()
    speed = previous.get("speed", []) if "--memory-only" in argv else speed_rows()
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps({"memory": memory, "speed": speed}, indent=2) + "\n")
    lines = ["| sequence | " + " | ".join(f"context={c} MiB/device" for c in CONTEXTS) + " |",
             "|---|" + "---|" * len(CONTEXTS)]  # fmt: skip
    for seq in SEQS:
        found = {r["context"]: r["peak_bytes"] for r in memory if r["seq"] == seq}
        cells = [f"{found[c] / 2**20:,.0f}" if c in found else "-" for c in CONTEXTS]
        lines.append(f"| {seq:,} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| sequence | mesh | attention | median step s | tokens/s |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['seq']:,} | {r['mesh']} | {r['strategy']} | {r['median_step_s']} | "
              f"{r['tokens_per_s']:,.0f} |" for r in speed]  # fmt: skip
    (RESULTS / "long_context.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if memory and speed:
        plot(memory, speed, RESULTS / "long_context.png")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main(sys.argv[1:]))
