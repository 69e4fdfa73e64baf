"""Load balancing on real imbalance: a pipeline=2 job as two processes, each pinned to its own CPU
core (`jaxpar launch -n 2 --pin-cores`), and a CPU-bound helper process that shares the second
core with stage 1 from step 20 on (it stops by itself after `--helper-s` seconds, and is stopped
when each run ends).

Usage: python experiments/load_balance.py [--steps N] [--every K]
(Needs 2 free cores. Three runs of the same model and batch, each with the helper started once
step 20's metrics row is written:
- even: `pipeline.stage_layers=balanced`;
- auto: the split `jaxpar bench --stages` proposes, measured (under launch) while the helper
  runs, given as `parallel.stage_speeds=[...] pipeline.stage_layers=auto`;
- rebalanced: balanced at the start, `train.rebalance_every=K`.
Reports each run's median step time before the helper starts (steps 5-19) and while it runs
(the last half of the run; for the rebalanced run, from the step after its move), the speed-up
over the even split, and what the rebalancer logged. Writes results/load_balance.json, .md and
.png; the planner's uneven splits for Llama-3-8B are `load_balance_plan.py`'s.)
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
from tempfile import TemporaryDirectory

from common import RESULTS, write_results

MODEL = [
    "model.layers=12", "model.dim=256", "model.heads=8", "model.kv_heads=4", "model.mlp_dim=768",
    "model.vocab=256", "train.seq_len=128", "train.batch_size=32", "train.dtype=float32",
    "pipeline.schedule=gpipe", "pipeline.microbatches=8", "train.sample_tokens=0",
    "checkpoint.every=0",
]  # fmt: skip
HELPER_AFTER = 20  # the helper starts once this step's metrics row is written
LAUNCH = [sys.executable, "-m", "jaxpar", "launch", "-n", "2", "--devices-per-process", "1",
          "--pin-cores", "--"]  # fmt: skip


def helper(seconds: float) -> subprocess.Popen:
    """A CPU-bound process on core 1 that stops by itself after `seconds`."""
    code = (
        "import os, time\n"
        "os.sched_setaffinity(0, {1})\n"
        f"end = time.monotonic() + {seconds}\n"
        "while time.monotonic() < end:\n"
        "    sum(i * i for i in range(20000))\n"
    )
    return subprocess.Popen([sys.executable, "-c", code])


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=10)


def stage_speeds(helper_s: float) -> dict:
    """`jaxpar bench --stages` under launch while the helper runs: process 0's JSON."""
    busy = helper(helper_s)
    try:
        time.sleep(1.0)
        command = [*LAUNCH, "bench", "--stages", "--mesh", "pipeline=2", "--steps", "5",
                   "--json", *MODEL]  # fmt: skip
        out = subprocess.run(command, capture_output=True, text=True, timeout=900)
    finally:
        stop(busy)
    if out.returncode != 0:
        raise SystemExit(f"bench --stages failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    lines = [line[4:] for line in out.stdout.splitlines() if line.startswith("[0] ")]
    start = next(i for i, line in enumerate(lines) if line.startswith("{"))
    return json.loads("\n".join(lines[start:]))


def train(name: str, extra: list[str], steps: int, helper_s: float, folder: Path) -> dict:
    """One run under launch; the helper starts after step HELPER_AFTER. Returns its step times
    and log."""
    out = folder / name
    command = [*LAUNCH, "train", "--mesh", "pipeline=2", "--out", str(out), *MODEL,
               f"train.steps={steps}", *extra]  # fmt: skip
    log_path = folder / f"{name}.log"
    busy = None
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 1800
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                if busy is None and _rows(out) and _rows(out)[-1]["step"] >= HELPER_AFTER:
                    busy = helper(helper_s)
                    print(f"  {name}: helper started after step {_rows(out)[-1]['step']}",
                          flush=True)  # fmt: skip
                time.sleep(0.2)
            if proc.poll() is None:
                proc.kill()
                raise SystemExit(f"{name} did not finish in 30 minutes")
        finally:
            stop(busy)
    text = log_path.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{text[-3000:]}")
    rows = _rows(out)
    moved = [line[4:] for line in text.splitlines()
             if line.startswith("[0] ") and "rebalanced at step" in line]  # fmt: skip
    return {"run": name, "times_s": [r["step_time_s"] for r in rows], "moved": moved}


def _rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    for r in results:
        ax.plot([t * 1e3 for t in r["times_s"]], label=f"{r['run']} ({r['split']})")
        if r.get("moved_at") is not None:
            ax.axvline(r["moved_at"], color="gray", ls=":", lw=1)
    ax.axvline(HELPER_AFTER, color="red", ls="--", lw=1, label="helper starts on core 1")
    ax.set_xlabel("step")
    ax.set_ylabel("step time (ms)")
    ax.set_title("pipeline=2, one core per stage; a CPU-bound helper shares stage 1's core")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=70)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--helper-s", type=float, default=600.0)
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs 2 cores")
    print("bench --stages with the helper on core 1:", flush=True)
    bench = stage_speeds(args.helper_s)
    speeds = ",".join(str(s) for s in bench["speeds"])
    print(f"  times {bench['times_s']}, speeds {bench['speeds']}, proposed {bench['proposed']}")
    runs = {
        "even": [],
        "auto": [f"parallel.stage_speeds=[{speeds}]", "pipeline.stage_layers=auto"],
        "rebalanced": [f"train.rebalance_every={args.every}"],
    }
    results = []
    with TemporaryDirectory() as tmp:
        for name, extra in runs.items():
            print(f"{name}: {' '.join(extra) or 'balanced'}", flush=True)
            r = train(name, extra, args.steps, args.helper_s, Path(tmp))
            results.append(r)
    for r in results:
        times = r["times_s"]
        r["moved_at"] = None
        r["split"] = {"even": "6,6", "auto": ",".join(map(str, bench["proposed"]))}.get(r["run"])
        from_step = len(times) // 2
        if r["moved"]:
            line = r["moved"][0]
            r["moved_at"] = int(line.split("rebalanced at step ")[1].split(":")[0])
            r["split"] = "6,6 -> " + line.split(" -> ")[1].split(" ")[0]
            from_step = max(from_step, r["moved_at"] + 1)
        r["before_ms"] = statistics.median(times[5:HELPER_AFTER]) * 1e3
        r["helper_ms"] = statistics.median(times[from_step:]) * 1e3
        r["helper_from_step"] = from_step
    even = results[0]["helper_ms"]
    for r in results:
        r["speedup_vs_even"] = even / r["helper_ms"]
    header = ["run", "split", "median step ms, steps 5-19 (no helper)",
              "median step ms with the helper", "from step", "speed-up over even"]  # fmt: skip
    out = write_results("load_balance", results, header, lambda r: [
        r["run"], r["split"], f"{r['before_ms']:.0f}", f"{r['helper_ms']:.0f}",
        r["helper_from_step"], f"{r['speedup_vs_even']:.2f}x",
    ])  # fmt: skip
    for r in results:
        for line in r["moved"]:
            print(f"{r['run']} logged: {line}")
    plot(results, out / "load_balance.png")
    print(f"wrote {RESULTS / 'load_balance.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
