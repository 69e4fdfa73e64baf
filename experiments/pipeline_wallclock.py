"""Wall-clock of the pipeline schedules on real parallel hardware: two processes of one job, one
device each, each pinned to its own CPU core (`jaxpar launch -n 2 --pin-cores`), mesh pipeline=2.

Usage: python experiments/pipeline_wallclock.py [--rounds R] [--steps N]
(Needs 2 free cores. For M in 4, 8 and each schedule (1F1B and ZB-H1 at both tick
granularities), runs `jaxpar bench` under launch; rounds turn the order of the schedules around so
that drift in the host's speed hits them alike. Reports per (schedule, M) the median over rounds
of each run's median step time, the spread (min..max over rounds), the lockstep bubble with the
model's F, B and W FLOPs, and the planner's predicted step (`jaxpar.plan.cost.estimate`, shipped
`cpu` profile). Writes results/pipeline_wallclock.json, .md and .png.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import write_results

SCHEDULES = {
    "gpipe": ["pipeline.schedule=gpipe"],
    "1f1b fused": ["pipeline.schedule=1f1b", "pipeline.tick=fused"],
    "1f1b single": ["pipeline.schedule=1f1b", "pipeline.tick=single"],
    "zb_h1 fused": ["pipeline.schedule=zb_h1", "pipeline.tick=fused"],
    "zb_h1 single": ["pipeline.schedule=zb_h1", "pipeline.tick=single"],
    "zb_v": ["pipeline.schedule=zb_v", "pipeline.repeats=2"],
}
MICROBATCHES = [4, 8]
ROWS = 4  # per micro-batch
COMMON = [
    "model.layers=8", "model.dim=256", "model.heads=8", "model.kv_heads=4", "model.mlp_dim=768",
    "model.vocab=256", "train.seq_len=128", "train.dtype=float32",
]  # fmt: skip


def overrides(schedule: str, m: int) -> list[str]:
    return [*COMMON, *SCHEDULES[schedule], f"pipeline.microbatches={m}",
            f"train.batch_size={ROWS * m}"]  # fmt: skip


def predicted(schedule: str, m: int) -> tuple[float, float]:
    """(the planner's step time in ms for this layout on the `cpu` profile, the lockstep bubble
    with the model's per-job F, B and W FLOPs)."""
    from jaxpar.config import load_config
    from jaxpar.plan.cost import estimate
    from jaxpar.plan.hardware import load_hardware
    from jaxpar.plan.space import Candidate

    config = load_config(None, overrides(schedule, m))
    pipe = config.pipeline
    candidate = Candidate(1, 2, 1, 1, False, pipe.schedule, m, pipe.repeats, "none")
    e = estimate(config, candidate, load_hardware("cpu"))
    return e.step_s * 1e3, e.bubble


def run(schedule: str, m: int, steps: int) -> dict:
    command = [
        sys.executable, "-m", "jaxpar", "launch", "-n", "2", "--devices-per-process", "1",
        "--pin-cores", "--", "bench", "--mesh", "pipeline=2", "--steps", str(steps),
        "--warmup", "2", "--json", *overrides(schedule, m),
    ]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"{schedule} M={m} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    # process 0's JSON document: the lines prefixed "[0] " from its opening brace on
    lines = [line[4:] for line in out.stdout.splitlines() if line.startswith("[0] ")]
    start = next(i for i, line in enumerate(lines) if line.startswith("{"))
    return json.loads("\n".join(lines[start:]))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(SCHEDULES)
    for i, name in enumerate(SCHEDULES):
        rs = [r for r in rows if r["schedule"] == name]
        xs = [MICROBATCHES.index(r["M"]) + (i - (len(SCHEDULES) - 1) / 2) * width for r in rs]
        med = [r["median_ms"] for r in rs]
        err = [
            [r["median_ms"] - r["min_ms"] for r in rs],
            [r["max_ms"] - r["median_ms"] for r in rs],
        ]
        ax.bar(xs, med, width, yerr=err, capsize=3, label=name)
    ax.set_xticks(range(len(MICROBATCHES)), [f"M={m}" for m in MICROBATCHES])
    ax.set_ylabel("median step time (ms); bars: min..max over rounds")
    ax.set_title("pipeline=2, two processes pinned to one core each")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs 2 cores")
    times: dict[tuple[str, int], list[float]] = {}
    start = time.monotonic()
    total = args.rounds * len(MICROBATCHES) * len(SCHEDULES)
    done = 0
    for r in range(args.rounds):
        for m in MICROBATCHES:
            names = list(SCHEDULES)
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                result = run(name, m, args.steps)
                times.setdefault((name, m), []).append(result["median_step_s"] * 1e3)
                done += 1
                print(f"[{done}/{total}, {time.monotonic() - start:.0f}s] round {r} {name} M={m}: "
                      f"{times[name, m][-1]:.1f} ms", flush=True)  # fmt: skip
    rows = []
    for m in MICROBATCHES:
        for name in SCHEDULES:
            ts = times[name, m]
            plan_ms, bubble = predicted(name, m)
            rows.append({"schedule": name, "M": m, "runs_ms": ts,
                         "median_ms": statistics.median(ts), "min_ms": min(ts),
                         "max_ms": max(ts), "planned_ms": plan_ms,
                         "bubble_lockstep": bubble})  # fmt: skip
    header = ["schedule", "M", "median step ms", "min..max over rounds", "vs gpipe",
              "lockstep bubble", "planner ms", "measured / planner"]  # fmt: skip
    base = {r["M"]: r["median_ms"] for r in rows if r["schedule"] == "gpipe"}
    out = write_results("pipeline_wallclock", rows, header, lambda r: [
        r["schedule"], r["M"], f"{r['median_ms']:.1f}", f"{r['min_ms']:.1f}..{r['max_ms']:.1f}",
        f"{r['median_ms'] / base[r['M']]:.3f}", f"{r['bubble_lockstep']:.1%}",
        f"{r['planned_ms']:.1f}", f"{r['median_ms'] / r['planned_ms']:.2f}",
    ])  # fmt: skip
    plot(rows, out / "pipeline_wallclock.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
