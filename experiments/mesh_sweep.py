"""Every data x pipeline x tensor layout of 8 devices for one model: memory, traffic, FLOPs, speed.

Usage: python experiments/mesh_sweep.py
(8 simulated CPU devices; the 10 ordered factorisations of 8. Each layout is analysed from its
compiled step (`jaxpar.analysis.report.analyze`) and timed (`jaxpar.train.bench.bench`) in two
rounds over all layouts, so that a burst of other work on the host does not land on one layout
alone: 1 warm-up and 2 timed steps, then 1 warm-up (the first step after another layout ran is
slow) and 3 timed steps. Layouts with pipeline=P > 1 run GPipe with M = 2P micro-batches, a bubble
of (P-1)/(3P-1), 20% to 30%; the others run the whole replica batch at once. Writes
results/mesh_sweep.json, .md and .png.)
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

from common import write_results

from jaxpar.mesh import parse_mesh, prepare

DEVICES = 8
LAYOUTS = [
    (d, p, DEVICES // (d * p)) for d in (8, 4, 2, 1) for p in (1, 2, 4, 8) if DEVICES % (d * p) == 0
]  # (data, pipeline, tensor), most data-parallel first
MODEL = [
    "model.layers=8", "model.dim=256", "model.heads=8", "model.kv_heads=8", "model.mlp_dim=768",
    "model.vocab=256", "train.batch_size=16", "train.seq_len=128", "train.dtype=float32",
    "pipeline.schedule=gpipe", "model.remat=none",
]  # fmt: skip
ROUNDS = [(2, 1), (3, 1)]  # (timed steps, warm-up steps) of each layout per round


def microbatches(pipeline: int) -> int:
    return 2 * pipeline if pipeline > 1 else 1


def row_of(layout: tuple[int, int, int], analysis: dict, times: list[float], loss: float) -> dict:
    """The sweep's figures for one layout: analysis (compiled, per device), the timed steps (this
    host) and the loss after the first round's 3 steps (the same on every layout, to rounding)."""
    mem = analysis["memory"]
    by_axis: dict[str, int] = {}
    for c in analysis["collectives"]:
        by_axis[c["axis"]] = by_axis.get(c["axis"], 0) + c["bytes"]
    return {
        "data": layout[0],
        "pipeline": layout[1],
        "tensor": layout[2],
        "mesh": analysis["mesh"],
        "model_params": analysis["model_params"],
        "tokens_per_step": analysis["tokens_per_step"],
        "microbatches": microbatches(layout[1]),
        "schedule": analysis["schedule"],
        "params_opt_bytes": mem["params_bytes"] + mem["opt_state_bytes"],
        "peak_bytes": mem["peak_bytes"],
        "estimate_bytes": mem["estimate"]["total_bytes"],
        "temp_bytes": mem["temp_bytes"],
        "collective_bytes": sum(by_axis.values()),
        "collective_bytes_by_axis": by_axis,
        "collectives": analysis["collectives"],
        "flops_per_device": analysis["flops_per_device"],
        "flops_ratio": analysis["flops_ratio"],
        "overhead_measured": analysis["overhead_measured"],
        "bubble_theory": analysis["bubble_theory"],
        "bubble_measured": analysis["bubble_measured"],
        "compile_s": round(analysis["compile_s"], 2),
        "median_step_s": round(statistics.median(times), 4),
        "min_step_s": round(min(times), 4),
        "step_times_s": [round(s, 4) for s in times],
        "tokens_per_s": round(analysis["tokens_per_step"] / statistics.median(times), 1),
        "loss_after_3_steps": loss,
    }


def label(r: dict) -> str:
    return f"{r['data']}x{r['pipeline']}x{r['tensor']}"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mib = 2**20
    x = range(len(rows))
    axis_colors = {"data": "C0", "pipeline": "C2", "tensor": "C3", "data,pipeline": "C4"}
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), sharex=True)
    ax = axes[0, 0]
    ax.bar(x, [r["params_opt_bytes"] / mib for r in rows], color="C7", label="params + AdamW")
    ax.bar(x, [(r["peak_bytes"] - r["params_opt_bytes"]) / mib for r in rows],
           bottom=[r["params_opt_bytes"] / mib for r in rows], color="C1",
           label="rest of peak (batch, grads, activations)")  # fmt: skip
    ax.plot(x, [r["estimate_bytes"] / mib for r in rows], "k_", ms=16, mew=2,
            label="analytic estimate")  # fmt: skip
    ax.set_ylabel("MiB per device")
    ax.set_title("memory per device (compiled peak)")
    ax.legend(fontsize=8)

    ax = axes[0, 1]
    bottom = [0.0] * len(rows)
    for axis in sorted({a for r in rows for a in r["collective_bytes_by_axis"]}):
        heights = [r["collective_bytes_by_axis"].get(axis, 0) / mib for r in rows]
        color = axis_colors.get(axis, "C7")
        ax.bar(x, heights, bottom=bottom, color=color, label=f"over {axis}")
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set_ylabel("MiB per device per step")
    ax.set_title("collective bytes per device, by mesh axes")
    ax.legend(fontsize=8)

    ax = axes[1, 0]
    ax.bar(x, [r["flops_ratio"] for r in rows], color="C0")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("computed / ideal matmul FLOPs")
    ax.set_title("FLOP overhead per device (pipeline bubble)")

    ax = axes[1, 1]
    ax.bar(x, [r["median_step_s"] for r in rows], color="C5")
    ax.set_ylabel("median step s")
    ax.set_title("step time on this host (2 CPU cores, 8 simulated devices)")
    for a in axes[1]:
        a.set_xticks(list(x), [label(r) for r in rows], rotation=45)
        a.set_xlabel("data x pipeline x tensor")
    for a in axes.flat:
        a.grid(axis="y", alpha=0.3)
    r = rows[0]
    fig.suptitle(
        f"One model ({r['model_params'] / 1e6:.1f}M parameters, {r['tokens_per_step']:,} tokens "
        "per step, float32) on every mesh of 8 devices"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> int:
    prepare(parse_mesh(f"data={DEVICES}"), tune_runtime=True)
    from jaxpar.analysis.report import analyze
    from jaxpar.config import load_config
    from jaxpar.mesh import make_mesh
    from jaxpar.placement import Placement
    from jaxpar.train.bench import bench
    from jaxpar.train.step import Trainer

    start = time.perf_counter()
    trainers, analyses, times, losses = [], [], [], []
    for r, (steps, warmup) in enumerate(ROUNDS):
        for i, layout in enumerate(LAYOUTS):
            spec = "data={},pipeline={},tensor={}".format(*layout)
            m = microbatches(layout[1])
            if r == 0:
                config = load_config(None, [*MODEL, f"pipeline.microbatches={m}"])
                trainers.append(Trainer(Placement(config, make_mesh(parse_mesh(spec)))))
                analyses.append(analyze(trainers[i]).to_json())  # compiles; bench reuses it
                times.append([])
            speed = bench(trainers[i], steps, warmup)
            times[i] += speed.step_times_s
            if r == 0:
                losses.append(speed.last_loss)
            a = analyses[i]
            print(
                f"[round {r + 1}, {i + 1}/{len(LAYOUTS)}, {time.perf_counter() - start:.0f}s] "
                f"{spec} M={m}: peak {a['memory']['peak_bytes'] / 2**20:.1f} MiB, FLOP ratio "
                f"{a['flops_ratio']:.3f}, compile {a['compile_s']:.1f} s, steps "
                f"{' '.join(f'{t:.2f}' for t in speed.step_times_s)} s, loss {speed.last_loss:.4f}",
                flush=True,
            )
    rows = [row_of(*args) for args in zip(LAYOUTS, analyses, times, losses, strict=True)]

    def axis_mib(r: dict) -> str:
        # Loss and gradient-norm scalars (a few bytes over all axes) would only print as 0.00.
        parts = sorted(r["collective_bytes_by_axis"].items())
        return ", ".join(f"{a} {b / 2**20:.2f}" for a, b in parts if b >= 2**20 / 200)

    header = ["data x pipe x tensor", "M", "params+opt MiB", "peak MiB (estimate)",
              "collective MiB", "by axes (MiB)", "FLOP ratio", "bubble theory / stack",
              "compile s", "step s median (min)", "tokens/s"]  # fmt: skip
    out = write_results("mesh_sweep", rows, header, lambda r: [
        label(r), r["microbatches"], f"{r['params_opt_bytes'] / 2**20:.1f}",
        f"{r['peak_bytes'] / 2**20:.0f} ({r['estimate_bytes'] / 2**20:.0f})",
        f"{r['collective_bytes'] / 2**20:.2f}", axis_mib(r), f"{r['flops_ratio']:.3f}",
        f"{r['bubble_theory']:.1%} / {r['bubble_measured']:.1%}", r["compile_s"],
        f"{r['median_step_s']:.2f} ({r['min_step_s']:.2f})", f"{r['tokens_per_s']:,.0f}",
    ])  # fmt: skip
    plot(rows, out / "mesh_sweep.png")
    print(f"total {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
