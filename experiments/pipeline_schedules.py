"""Every pipeline schedule side by side: textbook and lockstep bubble, compiled temp bytes.

Usage: python experiments/pipeline_schedules.py
(4 simulated CPU devices, mesh pipeline=4. For M = 4, 8, 16, 32 micro-batches of the same size
and every schedule, at each tick granularity it can run (`pipeline.tick`: single or fused),
compiles the train step (running nothing) and reads from `jaxpar analyze`: the textbook bubble,
the lockstep bubble (every tick as long as its slowest stage, with one job's F, B and W matmul
FLOPs taken from their compiled programs), the compiled temporaries per device, the jobs a stage
keeps for their B (stash) and for their W, and the compile time. Writes
results/pipeline_schedules.json, .md and .png, and results/pipeline_schedules_grid.png: the
stage x tick tables at M=8.)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from common import write_results

from jaxpar.mesh import parse_mesh, prepare

MESH = "pipeline=4"
SCHEDULES = [
    ("gpipe", 1, "auto"), ("circular", 2, "auto"), ("1f1b", 1, "fused"), ("1f1b", 1, "single"),
    ("interleaved_1f1b", 2, "auto"), ("zb_h1", 1, "fused"), ("zb_h1", 1, "single"),
    ("zb_v", 2, "auto"),
]  # fmt: skip
MICROBATCHES = [4, 8, 16, 32]
ROWS = 2  # per micro-batch
COMMON = [
    "model.layers=8", "model.dim=64", "model.heads=4", "model.kv_heads=2", "model.mlp_dim=128",
    "train.seq_len=32", "train.dtype=float32", "model.remat=none",
]  # fmt: skip


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, _, tick) in enumerate(SCHEDULES):
        rs = [r for r in rows if r["schedule"] == name and r["requested_tick"] == tick]
        name = name if tick == "auto" else f"{name} ({tick})"
        ms = [r["M"] for r in rs]
        colour = f"C{i}"
        left.plot(ms, [r["bubble_theory"] for r in rs], "--", color=colour, alpha=0.5)
        left.plot(ms, [r["bubble_lockstep"] for r in rs], "o-", color=colour, label=name)
        right.plot(ms, [r["temp_bytes"] / 2**20 for r in rs], "o-", color=colour, label=name)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(MICROBATCHES, [str(m) for m in MICROBATCHES])
        ax.set_xlabel(f"micro-batches M ({ROWS} rows each)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    left.yaxis.set_major_formatter(PercentFormatter(1.0))
    left.set_title("bubble: lockstep (solid, measured F/B/W FLOPs) vs textbook (dashed)")
    right.set_title("compiled temporaries per device (MiB)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write(rows: list[dict]) -> Path:
    """The table: per schedule and M, the bubbles, the lockstep cost (the slowest stage's matmul
    FLOPs summed over ticks, comparable across schedules), memory and compile time."""
    from jaxpar.analysis.flops import ActionCosts
    from jaxpar.pipeline.schedule import Schedule

    stages = parse_mesh(MESH).pipeline
    for r in rows:
        schedule = Schedule(r["schedule"], stages, r["M"], r["v"], r["requested_tick"])
        r["lockstep_flops"] = ActionCosts(**r["action_flops"]).lockstep_cost(schedule)
    header = ["schedule", "tick", "M", "v", "ticks", "bubble textbook", "bubble lockstep",
              "lockstep MFLOP", "temp MiB/device", "stash jobs", "W jobs", "compile s"]  # fmt: skip
    return write_results("pipeline_schedules", rows, header, lambda r: [
        r["schedule"], r["tick"], r["M"], r["v"], r["ticks"], f"{r['bubble_theory']:.1%}",
        f"{r['bubble_lockstep']:.1%}", f"{r['lockstep_flops'] / 1e6:,.1f}",
        f"{r['temp_bytes'] / 2**20:,.2f}", "" if r["stash_jobs"] is None else r["stash_jobs"],
        r["w_jobs"] or "", r["compile_s"],
    ])  # fmt: skip


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
    for name, v, tick in SCHEDULES:
        for m in MICROBATCHES:
            pipe = [f"schedule={name}", f"microbatches={m}", f"repeats={v}", f"tick={tick}"]
            extra = [f"train.batch_size={ROWS * m}", *(f"pipeline.{p}" for p in pipe)]
            trainer = Trainer(Placement(load_config(None, [*COMMON, *extra]), mesh))
            a = analyze(trainer).to_json()
            schedule = trainer.placement.schedule
            rows.append({
                "schedule": name, "requested_tick": tick, "tick": schedule.granularity, "M": m,
                "v": v, "ticks": a["ticks"],
                "bubble_theory": a["bubble_theory"], "bubble_lockstep": a["bubble_lockstep"],
                "action_flops": a["action_flops"], "temp_bytes": a["memory"]["temp_bytes"],
                "stash_jobs": schedule.stash_slots if schedule.hand_backward else None,
                "w_jobs": schedule.routes.slots["wstash"] if schedule.split else None,
                "compile_s": round(a["compile_s"], 2),
            })  # fmt: skip
            if m == 8:
                at_m8.append(schedule)
            print(json.dumps(rows[-1]), flush=True)

    out = write(rows)
    plot(rows, out / "pipeline_schedules.png")
    plot_timelines(at_m8, out / "pipeline_schedules_grid.png")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
