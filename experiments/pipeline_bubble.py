"""Pipeline bubble of GPipe and circular schedules: theory against the compiled step's FLOPs.

Usage: python experiments/pipeline_bubble.py
(4 simulated CPU devices, mesh pipeline=4. Compiles the train step, running nothing, for M = 4, 8,
16, 32 micro-batches under gpipe (v=1) and circular (v=2), and reads the bubble from
`jaxpar.analysis.report.analyze`. Writes results/pipeline_bubble.json, .md and .png, and
results/pipeline_schedule.png: the stage x tick grid of both schedules at M=8.)
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
    "train.batch_size=32", "train.seq_len=32", "train.dtype=float32", "model.remat=none",
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
        stack, step = [r["bubble_measured"] for r in rs], [r["overhead_measured"] for r in rs]
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


def main() -> int:
    spec = prepare(parse_mesh(MESH), tune_runtime=True)
    import matplotlib

    matplotlib.use("Agg")
    from jaxpar.analysis.report import analyze
    from jaxpar.analysis.timeline import plot_timelines
    from jaxpar.config import load_config
    from jaxpar.mesh import make_mesh
    from jaxpar.placement import Placement
    from jaxpar.train.step import Trainer

    mesh = make_mesh(spec)
    rows, at_m8 = [], []
    for name, v in SCHEDULES:
        for m in MICROBATCHES:
            pipe = [f"schedule={name}", f"microbatches={m}", f"repeats={v}"]
            config = load_config(None, [*COMMON, *(f"pipeline.{p}" for p in pipe)])
            trainer = Trainer(Placement(config, mesh))
            a = analyze(trainer).to_json()
            rows.append({
                "schedule": name,
                "M": m,
                "v": v,
                "ticks": a["ticks"],
                "bubble_theory": a["bubble_theory"],
                "bubble_measured": a["bubble_measured"],
                "overhead_measured": a["overhead_measured"],
                "flops_per_device": a["flops_per_device"],
                "flops_ratio": a["flops_ratio"],
                "compile_s": round(a["compile_s"], 2),
            })  # fmt: skip
            if m == 8:
                at_m8.append(trainer.placement.schedule)
            print(json.dumps(rows[-1]), flush=True)

    header = ["schedule", "M", "v", "ticks", "bubble theory", "bubble measured (stack)",
              "overhead measured (step)", "FLOPs/device", "ratio", "compile s"]  # fmt: skip
    out = write_results("pipeline_bubble", rows, header, lambda r: [
        r["schedule"], r["M"], r["v"], r["ticks"], f"{r['bubble_theory']:.2%}",
        f"{r['bubble_measured']:.2%}", f"{r['overhead_measured']:.2%}",
        f"{r['flops_per_device']:,}", f"{r['flops_ratio']:.3f}", r["compile_s"],
    ])  # fmt: skip
    plot_bubble(rows, spec.pipeline, out / "pipeline_bubble.png")
    plot_timelines(at_m8, out / "pipeline_schedule.png")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
