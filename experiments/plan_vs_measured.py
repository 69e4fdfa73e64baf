"""The planner's predicted step time against the measured one: on this host's 8 simulated
devices, and (`--gpu`) on the GPU runs of `jaxpar/plan/measured.yaml`.

Usage: python experiments/plan_vs_measured.py [--profile FILE.yaml]
       python experiments/plan_vs_measured.py --gpu
(--gpu: the cost model alone, nothing runs: each measured run's predicted step time and memory on
its profile against the measured time, and the layout the planner picks for the same model, batch
and devices. Writes results/plan_vs_measured_gpu.json, .md, .png. Seconds.)

(8 simulated CPU devices. Calibrates this host first (`jaxpar plan --calibrate`'s measurements)
unless given a profile, then plans the model below and times a spread of its layouts with
`jaxpar.train.bench`: for every data x pipeline x tensor mesh of 8 devices the layout the planner
ranks best on that mesh, and the planner's overall top 5. Two rounds over all layouts (1 warm-up
and 3 timed steps each), so that a burst of other work on the host does not land on one layout
alone. Reports the Spearman rank correlation of predicted and measured times, and the measured time
of the planner's pick against the best measured. Writes results/plan_vs_measured.json, .md, .png.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
from common import RESULTS, write_results

from jaxpar.mesh import MeshSpec, prepare

DEVICES = 8
MODEL = [
    "model.layers=8", "model.dim=256", "model.heads=8", "model.kv_heads=8", "model.mlp_dim=768",
    "model.vocab=256", "train.batch_size=16", "train.seq_len=128", "train.dtype=float32",
]  # fmt: skip
ROUNDS = [(3, 1), (3, 1)]  # (timed steps, warm-up steps) of each layout per round
TOP = 5


def spearman(a: list[float], b: list[float]) -> float:
    rank = lambda x: np.argsort(np.argsort(x)).astype(float)  # noqa: E731 (no ties here)
    return float(np.corrcoef(rank(a), rank(b))[0, 1])


def chosen(result) -> list:
    """The planner's top layouts, then the best it ranks on each mesh not among them."""
    picks = list(result.ranked[:TOP])
    meshes = {e.candidate.mesh for e in picks}
    for e in result.ranked:
        if e.candidate.mesh not in meshes:
            meshes.add(e.candidate.mesh)
            picks.append(e)
    return picks


def plot(rows: list[dict], rho: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6))
    predicted = [r["predicted_s"] * 1e3 for r in rows]
    measured = [r["measured_s"] * 1e3 for r in rows]
    ax.scatter(predicted, measured, c=["C3" if r["rank"] == 1 else "C0" for r in rows], zorder=3)
    for r, x, y in zip(rows, predicted, measured, strict=True):
        ax.annotate(r["layout"], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    lo, hi = min(predicted + measured) * 0.8, max(predicted + measured) * 1.2
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="measured = predicted")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("predicted step ms (cost model, calibrated CPU profile)")
    ax.set_ylabel("measured median step ms (bench)")
    ax.set_title(f"plan vs measured, 8 simulated CPU devices: Spearman rho = {rho:.2f}\n"
                 "(red: the planner's pick)")  # fmt: skip
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(RESULTS / "plan_vs_measured.png", dpi=130)
    plt.close(fig)


def gpu_table() -> int:
    """Predicted against measured for every run of `measured.yaml`, and the planner's pick."""
    from jaxpar.plan.hardware import load_hardware
    from jaxpar.plan.measured import measured_runs, predict
    from jaxpar.plan.planner import plan

    rows = []
    for run in measured_runs():
        e = predict(run)
        label = (f"{run.model}\n{run.batch} x {run.seq:,}, {run.remat}\n"
                 f"{run.devices} x {run.hardware}")  # fmt: skip
        row = {"run": run.name, "label": label, "hardware": run.hardware,
               "layout": e.candidate.describe(),
               "remat": run.remat, "measured_s": run.step_s, "predicted_s": e.step_s,
               "measured_over_predicted": run.step_s / e.step_s,
               "predicted_gib": e.memory_bytes / 2**30, "fits": e.fits, "source": run.source,
               "date": run.date, "pick": "-"}  # fmt: skip
        if run.devices <= GPU_PICK_DEVICES:  # larger searches take minutes: no pick
            best = plan(run.config(), run.devices, load_hardware(run.hardware), top=1).best
            c = best.candidate
            row["pick"] = (f"{c.describe()} M={c.microbatches} remat={c.remat}: "
                           f"{best.step_s:.3f} s, {best.memory_bytes / 2**30:.1f} GiB")
        rows.append(row)
        print(f"{run.name} on {run.hardware}: predicted {e.step_s:.3f} s, measured "
              f"{run.step_s:.3f} s; pick {row['pick']}", flush=True)  # fmt: skip
    header = ["run", "hardware", "measured s", "predicted s", "measured / predicted",
              "predicted GiB", "the planner's pick", "source"]  # fmt: skip
    write_results("plan_vs_measured_gpu", rows, header, lambda r: [
        r["run"], r["hardware"], f"{r['measured_s']:.3f}", f"{r['predicted_s']:.3f}",
        f"{r['measured_over_predicted']:.3f}", f"{r['predicted_gib']:.1f}", r["pick"],
        f"{r['source']} ({r['date']})",
    ])  # fmt: skip
    plot_gpu(rows)
    return 0


GPU_PICK_DEVICES = 64


def plot_gpu(rows: list[dict]) -> None:
    try:
        import matplotlib
    except ImportError:
        print("no matplotlib: no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["measured_s"] for r in rows], 0.4, label="measured")
    ax.bar(x + 0.2, [r["predicted_s"] for r in rows], 0.4, label="predicted (cost model)")
    for i, r in enumerate(rows):
        ax.annotate(f"{r['measured_over_predicted']:.2f}x", (i, max(r["measured_s"],
                    r["predicted_s"])), ha="center", xytext=(0, 3), textcoords="offset points",
                    fontsize=8)  # fmt: skip
    ax.set_xticks(x, [r["label"] for r in rows], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("step s")
    ax.set_title("measured train steps against the planner's prediction (label: measured / "
                 "predicted)", fontsize=9)  # fmt: skip
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y", which="both")
    fig.tight_layout()
    fig.savefig(RESULTS / "plan_vs_measured_gpu.png", dpi=130)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", help="a hardware profile (default: calibrate this host now)")
    parser.add_argument("--gpu", action="store_true",
                        help="the measured GPU runs against the cost model (nothing runs)")
    args = parser.parse_args()
    if args.gpu:
        return gpu_table()
    prepare(MeshSpec(data=DEVICES), tune_runtime=True)
    from jaxpar.config import load_config
    from jaxpar.mesh import make_mesh
    from jaxpar.placement import Placement
    from jaxpar.plan.calibrate import calibrate
    from jaxpar.plan.hardware import load_hardware
    from jaxpar.plan.planner import plan
    from jaxpar.train.bench import bench
    from jaxpar.train.step import Trainer

    start = time.perf_counter()
    hw = load_hardware(args.profile) if args.profile else calibrate("cpu", progress=print)
    config = load_config(None, MODEL)
    result = plan(config, DEVICES, hw, top=TOP)
    print(f"planned {result.searched:,} layouts in {result.search_s:.1f}s", flush=True)
    picks = chosen(result)
    trainers = [Trainer(Placement(e.candidate.apply(config), make_mesh(e.candidate.spec)))
                for e in picks]  # fmt: skip
    times: list[list[float]] = [[] for _ in picks]
    for r, (steps, warmup) in enumerate(ROUNDS):
        for i, (e, trainer) in enumerate(zip(picks, trainers, strict=True)):
            speed = bench(trainer, steps, warmup)
            times[i] += speed.step_times_s
            c = e.candidate
            measured = " ".join(f"{t * 1e3:.0f}" for t in speed.step_times_s)
            print(f"[round {r + 1}, {i + 1}/{len(picks)}, {time.perf_counter() - start:.0f}s] "
                  f"{c.describe()} M={c.microbatches} remat={c.remat}: predicted "
                  f"{e.step_s * 1e3:.1f} ms, measured {measured} ms", flush=True)  # fmt: skip
    rank = {id(e): i + 1 for i, e in enumerate(result.ranked)}
    rows = [
        {
            "layout": e.candidate.describe(),
            "mesh": e.candidate.mesh,
            "overrides": e.candidate.overrides,
            "rank": rank[id(e)],
            "predicted_s": e.step_s,
            "compute_s": e.compute_s,
            "comm_s": e.comm_s,
            "memory_bytes": e.memory_bytes,
            "measured_s": statistics.median(t),
            "step_times_s": t,
        }
        for e, t in zip(picks, times, strict=True)
    ]
    rows.sort(key=lambda r: r["measured_s"])
    rho = spearman([r["predicted_s"] for r in rows], [r["measured_s"] for r in rows])
    pick = min(rows, key=lambda r: r["rank"])
    best = rows[0]
    header = ["layout", "M, remat", "planner rank", "predicted ms", "compute ms", "comm ms",
              "measured ms (median)"]  # fmt: skip
    write_results("plan_vs_measured", rows, header, lambda r: [
        r["layout"], ", ".join(o.split("=", 1)[1] for o in r["overrides"][3:6:2]), r["rank"],
        f"{r['predicted_s'] * 1e3:.1f}", f"{r['compute_s'] * 1e3:.1f}", f"{r['comm_s'] * 1e3:.1f}",
        f"{r['measured_s'] * 1e3:.1f}",
    ])  # fmt: skip
    summary = (
        f"Spearman rank correlation {rho:.2f} over {len(rows)} layouts; the planner's pick "
        f"({pick['layout']}) measured {pick['measured_s'] * 1e3:.1f} ms, the best measured "
        f"({best['layout']}) {best['measured_s'] * 1e3:.1f} ms "
        f"({pick['measured_s'] / best['measured_s']:.2f}x)"
    )
    with open(RESULTS / "plan_vs_measured.md", "a") as f:
        f.write(f"\n{summary}\n")
    plot(rows, rho)
    print(summary)
    print(f"total {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
