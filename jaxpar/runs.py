"""A run folder: what `jaxpar train --out OUT` writes, and what `eval`, `generate`, `chat` and
`export-hf` read back. No jax here.

    OUT/config.yaml     the resolved config of the run
    OUT/metrics.jsonl   one JSON object per step
    OUT/checkpoints/    orbax checkpoints (`jaxpar.checkpoint`)
    OUT/tensorboard/    TensorBoard event files (`train.tracker`, `jaxpar.train.trackers`)
    OUT/goodput.json    where the run's wall time went, every attempt (`jaxpar.train.goodput`)
    OUT/stacks/         each process's threads' stacks on a hang or SIGUSR1 (`train.watchdog`)
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from jaxpar.errors import JaxparError

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
GOODPUT = "goodput.json"
STACKS = "stacks"


def new_run_dir(root: Path = Path("runs")) -> Path:
    """A folder under `root` named by the time, that does not exist yet."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = root / stamp, 1
    while path.exists():
        n += 1
        path = root / f"{stamp}-{n}"
    return path


def check_train_dir(out: Path) -> None:
    """Refuses an --out that training would damage: a file, or a run without checkpoints (which
    cannot be resumed and is never overwritten)."""
    if out.exists() and not out.is_dir():
        raise JaxparError(f"--out {str(out)!r} is a file; give a folder")
    if (out / METRICS).exists() and not (out / CHECKPOINTS).is_dir():
        raise JaxparError(
            f"--out {str(out)!r} already holds a run without checkpoints to resume from; "
            "choose a new folder"
        )


def check_run_dir(run: Path) -> None:
    """Refuses a path that is not a run folder with checkpoints (for export)."""
    if not run.is_dir():
        raise JaxparError(f"run directory {str(run)!r} does not exist")
    if not (run / CONFIG).is_file():
        raise JaxparError(
            f"{str(run)!r} has no {CONFIG}; expected the --out directory of `jaxpar train`"
        )
    if not (run / CHECKPOINTS).is_dir():
        raise JaxparError(f"{str(run)!r} holds no checkpoints (no {CHECKPOINTS}/ folder)")


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl (none if it does not exist), without a line torn by a kill
    mid-write."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in rows if isinstance(r, dict) and "step" in r]


def keep_metrics_before(path: Path, step: int) -> list[dict]:
    """Drops the rows of steps >= `step` (they will be run again), atomically; returns the rows
    there were (what an earlier attempt had done)."""
    rows = read_metrics(path)
    if rows:
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] < step))
        tmp.replace(path)
    return rows
