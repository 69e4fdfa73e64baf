"""What watching a run costs, and how fast the hang watchdog ends a job.

1. The default `jaxpar train` (its model, batch and data=2,tensor=4 mesh on 8 simulated CPU
   devices; 50 of its 150 steps, no closing sample) with `train.tracker=jsonl` (metrics.jsonl
   alone), `tensorboard` (the default) and, where it is installed, `wandb` (offline), and with
   a held-out loss every 25 steps
   (`data.eval_fraction=0.01`). Runs alternate, `--repeats` rounds; the figure is the median step
   time (which includes writing the previous step's row) and its ratio to jsonl's, and for the
   held-out loss its share of the steps' time (from goodput.json).
   Each tracker's cost per row is also timed directly (2000 rows): steps this noisy (a 2-core
   host simulating 8 devices) cannot show a cost under a millisecond.
2. A hang injected before step 20 (`train.fault_hang_step`) with `train.hang_timeout_s=5`, in one
   process and in a two-process `jaxpar launch`: the seconds from the injected hang to the job's
   exit.

    python experiments/monitor_overhead.py [--repeats 3]

Writes experiments/results/monitor_overhead.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS

BASE = ["train.sample_tokens=0", "train.steps=50"]
VARIANTS = {
    "jsonl": ["train.tracker=jsonl"],
    "tensorboard": ["train.tracker=tensorboard"],
    "wandb": ["train.tracker=wandb"],
    "tensorboard + held-out loss every 25": [
        "train.tracker=tensorboard", "data.eval_fraction=0.01", "train.eval_every=25",
    ],
}  # fmt: skip


def _env() -> dict[str, str]:
    return dict(os.environ, JAX_PLATFORMS="cpu", WANDB_MODE="offline", WANDB_SILENT="true")


def _train(out: Path, extra: list[str]) -> dict:
    argv = [sys.executable, "-m", "jaxpar", "train", "--out", str(out), *BASE, *extra]
    subprocess.run(argv, env=_env(), check=True, capture_output=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    goodput = json.loads((out / "goodput.json").read_text())
    steps = goodput["seconds"]["productive"]
    return {
        "median_step_s": statistics.median(r["step_time_s"] for r in rows[1:]),
        "eval_share": goodput["seconds"]["eval"] / steps,
    }


def overhead(repeats: int) -> dict:
    variants = {k: v for k, v in VARIANTS.items()
                if k != "wandb" or importlib.util.find_spec("wandb") is not None}  # fmt: skip
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for v, (name, extra) in enumerate(variants.items()):
                out = Path(tmp) / f"variant{v}-round{r}"
                runs[name].append(_train(out, extra))
                print(f"round {r + 1}/{repeats} {name}: {runs[name][-1]}", flush=True)
    base = statistics.median(x["median_step_s"] for x in runs["jsonl"])
    return {
        name: {
            "median_step_ms": statistics.median(x["median_step_s"] for x in rs) * 1e3,
            "ratio_to_jsonl": statistics.median(x["median_step_s"] for x in rs) / base,
            "eval_share_of_step_time": statistics.median(x["eval_share"] for x in rs),
        }
        for name, rs in runs.items()
    }


def row_cost(rows: int = 2000) -> dict[str, float]:
    """Microseconds a tracker takes to log one row (the default train's row, with MFU and a
    held-out loss), timed directly: what each step pays, without the step's noise."""
    from jaxpar.config import load_config
    from jaxpar.train.trackers import open_trackers

    config = load_config(None, ["train.tracker=jsonl,tensorboard" + (
        ",wandb" if importlib.util.find_spec("wandb") is not None else "")])  # fmt: skip
    row = {"step": 0, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.7, "step_time_s": 0.4,
           "tokens_per_s": 5000.0, "skipped": False, "bad_in_row": 0, "mfu": 0.4,
           "eval_loss": 2.6}  # fmt: skip
    costs = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ |= {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
        trackers = open_trackers(config, Path(tmp), 0)
        names = ["jsonl", "tensorboard", "wandb"][: len(trackers)]
        for name, tracker in zip(names, trackers, strict=True):
            start = time.perf_counter()
            for step in range(rows):
                tracker.log(step, dict(row, step=step))
            costs[name] = (time.perf_counter() - start) / rows * 1e6
        for tracker in trackers:
            tracker.close()
    return costs


def hang_to_exit(processes: int) -> float:
    """Seconds from the injected hang (its line on stderr) to the job's exit."""
    with tempfile.TemporaryDirectory() as tmp:
        train = ["train", "--out", f"{tmp}/run", *BASE, "train.steps=40",
                 "train.fault_hang_step=20", "train.hang_timeout_s=5", "train.fault_process=0"]
        argv = ([sys.executable, "-m", "jaxpar", *train] if processes == 1 else
                [sys.executable, "-m", "jaxpar", "launch", "-n", str(processes),
                 "--devices-per-process", "4", "--", *train])  # fmt: skip
        proc = subprocess.Popen(argv, env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip
        hung = None
        for line in proc.stdout:
            if "fault injection:" in line and hung is None:
                hung = time.monotonic()
        proc.wait()
        assert hung is not None and proc.returncode != 0, proc.returncode
        return time.monotonic() - hung


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    result = {"row_cost_us": row_cost(), "trackers": overhead(args.repeats),
              "hang_to_exit_s": {"1 process": hang_to_exit(1), "2 processes": hang_to_exit(2)},
              "hang_timeout_s": 5}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "monitor_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
