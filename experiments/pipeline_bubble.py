"""Pipeline bubble of GPipe and circular schedules: theory against the compiled step's FLOPs.

Usage: python experiments/pipeline_bubble.py
(4 simulated CPU devices, mesh pipeline=4. Compiles the train step, running nothing, for M = 4, 8,
16, 32 micro-batches under gpipe (v=1) and circular (v=2). Writes results/pipeline_bubble.json, .md
and .png, and results/pipeline_schedule.png: the stage x tick grid of both schedules at M=8.)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
from common import write_results

from jaxpar.mesh import parse_mesh, prepare

MESH = "pipeline=4"
SCHEDULES = [("gpipe", 1), ("circular", 2)]  # (schedule, repeats v)
MICROBATCHES = [4, 8, 16, 32]
COMMON = [
    "model.layers=8", "model.dim=64", "model.heads=4", "model.kv_heads=2", "model.mlp_dim=128",
    "train.batch_size=32", "train.seq_len=32", "train.dtype=float32", "pipeline.remat=none",
]  # fmt: skip
COLORS = {"gpipe": "C0", "circular": "C3"}


def plot_bubble(rows: list[dict], stages: int, path: Path) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    fig, ax = plt.subplots(figsize=(7, 4.5))
    m = np.geomspace(min(MICROBATCHES), max(MICROBATCHES), 100)
    for name, v in SCHEDULES:
        rs = [r for r in rows if r["schedule"] == name]
        c = COLORS[name]
        label = f"{name} (v={v})"
        ax.plot(m, (stages - 1) / (v * m + stages - 1), color=c, label=f"{label}: theory")
        ms = [r["M"] for r in rs]
        stack, step = [r["bubble_stack"] for r in rs], [r["bubble_step"] for r in rs]
        ax.plot(ms, stack, "o", color=c, ms=7, label=f"{label}: measured, layer stack")
        ax.plot(ms, step, "s--", color=c, alpha=0.4, label=f"{label}: measured, whole step")
    ax.set_xscale("log", base=2)
    ax.set_xticks(MICROBATCHES, [str(x) for x in MICROBATCHES])
    ax.set_xlabel("micro-batches M")
    ax.set_ylabel("bubble (idle share of computed FLOPs)")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_title(f"Pipeline bubble, P={stages} stages: theory (P-1)/(vM+P-1) vs compiled FLOPs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_schedules(schedules: list, path: Path) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba

    palette = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 7]  # 7 is grey
    width = max(s.ticks for s in schedules)
    fig, axes = plt.subplots(len(schedules), 1, figsize=(0.6 * width + 1.5, 1.7 * len(schedules)))
    for ax, s in zip(axes, schedules, strict=True):
        table = s.table()
        image = np.full((*table.shape, 4), to_rgba("0.85"))  # idle: grey, no label
        for (stage, tick), k in np.ndenumerate(table):
            if k >= 0:
                mb, rep = k % s.microbatches, k // s.microbatches
                image[stage, tick] = to_rgba(palette[mb % len(palette)], 1.0 - 0.5 * rep)
                text = f"m{mb}" if s.repeats == 1 else f"m{mb} r{rep}"
                ax.text(tick, stage, text, ha="center", va="center", fontsize=7)
        ax.imshow(image, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(s.ticks))
        ax.set_yticks(range(s.stages), [f"stage {i}" for i in range(s.stages)])
        ax.set_xticks(np.arange(s.ticks + 1) - 0.5, minor=True)
        ax.set_yticks(np.arange(s.stages + 1) - 0.5, minor=True)
        ax.grid(which="minor", color="white", linewidth=1.5)
        ax.tick_params(which="minor", length=0)
        key = "m micro-batch, r repeat (lighter: r1)" if s.repeats > 1 else "m micro-batch"
        ax.set_title(f"{s.describe()};  grey: idle;  {key}", fontsize=9, loc="left")
    axes[-1].set_xlabel("tick (forward pass)")
    fig.tight_layout()
    for ax, s in zip(axes, schedules, strict=True):  # one tick is equally wide in every panel
        box = ax.get_position()
        ax.set_position([box.x0, box.y0, box.width * s.ticks / width, box.height])
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> int:
    spec = prepare(parse_mesh(MESH))
    import matplotlib

    matplotlib.use("Agg")
    from jaxpar.config import load_config
    from jaxpar.mesh import make_mesh
    from jaxpar.train.step import Trainer

    mesh = make_mesh(spec)
    rows, at_m8 = [], []
    for name, v in SCHEDULES:
        for m in MICROBATCHES:
            pipe = [f"schedule={name}", f"microbatches={m}", f"repeats={v}"]
            config = load_config(None, [*COMMON, *(f"pipeline.{p}" for p in pipe)])
            trainer = Trainer(config, mesh)
            _, compile_s = trainer.compile()
            overhead = trainer.compute_overhead()
            rows.append({
                "schedule": name,
                "M": m,
                "v": v,
                "ticks": trainer.schedule.ticks,
                "bubble_theory": trainer.schedule.bubble,
                "bubble_stack": overhead.stack_bubble,
                "bubble_step": overhead.bubble,
                "flops_per_device": overhead.flops_per_device,
                "ratio": overhead.ratio,
                "compile_s": round(compile_s, 2),
            })  # fmt: skip
            if m == 8:
                at_m8.append(trainer.schedule)
            print(json.dumps(rows[-1]), flush=True)

    header = ["schedule", "M", "v", "ticks", "bubble theory", "bubble measured (stack)",
              "overhead measured (step)", "FLOPs/device", "ratio", "compile s"]  # fmt: skip
    out = write_results("pipeline_bubble", rows, header, lambda r: [
        r["schedule"], r["M"], r["v"], r["ticks"], f"{r['bubble_theory']:.2%}",
        f"{r['bubble_stack']:.2%}", f"{r['bubble_step']:.2%}", f"{r['flops_per_device']:,}",
        f"{r['ratio']:.3f}", r["compile_s"],
    ])  # fmt: skip
    plot_bubble(rows, spec.pipeline, out / "pipeline_bubble.png")
    plot_schedules(at_m8, out / "pipeline_schedule.png")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
