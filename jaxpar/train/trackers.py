"""Where a run's scalars go: OUT/metrics.jsonl (always), TensorBoard, Weights & Biases.

Each step's metrics row (loss, learning rate, gradient norm, tokens/s, step time, skipped, MFU
where the chip's peak is known, and `eval_loss` on the steps after which the held-out loss ran)
goes to every tracker of `train.tracker`, on process 0 alone.

A resumed run continues the same run in each: metrics.jsonl drops its rows from the checkpoint's
step on (`runs.keep_metrics_before`) before they are computed again; the TensorBoard writer opens
the same folder with a new event file that starts with a restart marker at that step (what
tensorboardX's `purge_step` writes), so TensorBoard's reader hides what the earlier attempt wrote
from there on (the recomputed steps replace it, never doubled); W&B resumes the
run whose id OUT/wandb-id.txt holds, and ignores a step it already has.

Trackers are flushed before each checkpoint, so a step before a checkpoint is on disk once the
checkpoint is.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import IO, Any, Protocol

from jaxpar.config import Config, dump_yaml
from jaxpar.errors import JaxparError
from jaxpar.runs import METRICS, TENSORBOARD

WANDB_ID = "wandb-id.txt"
EXTRAS = {"tensorboard": ("tensorboardX", "tensorboardX"), "wandb": ("wandb", "wandb")}


class Tracker(Protocol):
    def log(self, step: int, row: dict[str, Any]) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


def check_trackers(config: Config) -> None:
    """Refuses a tracker whose package is not installed, before anything compiles.

    Raises:
        JaxparError: naming the tracker and the install command.
    """
    for name in config.train.trackers:
        if name not in EXTRAS:
            continue
        module, extra = EXTRAS[name]
        try:
            __import__(module)
        except ImportError:
            raise JaxparError(
                f"train.tracker={name} needs the {module} package: pip install {extra} (or "
                "choose train.tracker=jsonl)"
            ) from None


def open_trackers(config: Config, out: Path, start: int) -> list[Tracker]:
    """The run's trackers (metrics.jsonl first), continuing from step `start`."""
    trackers: list[Tracker] = [Jsonl(out / METRICS)]
    for name in config.train.trackers:
        if name == "tensorboard":
            trackers.append(TensorBoard(out / TENSORBOARD, config, start))
        elif name == "wandb":
            trackers.append(WandB(out, config, start))
    return trackers


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """A metrics row's numbers under the tags the dashboards show: train/NAME, and eval/loss."""
    tags = {}
    for key, value in row.items():
        if key == "step" or not isinstance(value, (int, float)):
            continue
        tags["eval/loss" if key == "eval_loss" else f"train/{key}"] = float(value)
    return tags


class Jsonl:
    """OUT/metrics.jsonl: one JSON object per step, appended."""

    def __init__(self, path: Path):
        self._file: IO[str] = path.open("a")

    def log(self, step: int, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoard:
    """Event files under OUT/tensorboard/, one per attempt, written with tensorboardX's protocol
    buffers (no TensorFlow) synchronously: a row is on disk when `log` returns (tensorboardX's
    own `SummaryWriter` queues to a thread whose `flush` does not wait for it). The resolved
    config is a text summary at the attempt's first step."""

    def __init__(self, folder: Path, config: Config, start: int):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.proto.summary_pb2 import Summary
        from tensorboardX.summary import text

        folder.mkdir(parents=True, exist_ok=True)
        attempt = len(list(folder.glob("events.out.tfevents.*")))  # names sort in attempt order
        self._writer = EventsWriter(str(folder / "events"), f".{attempt:04d}")
        self._event, self._summary = Event, Summary
        if start:  # TensorBoard's reader hides what an earlier attempt wrote from here on
            restart = SessionLog(status=SessionLog.START)
            self._writer.write_event(Event(step=start, session_log=restart))
        self._writer.write_event(
            Event(step=start, summary=text("config", "```\n" + dump_yaml(config) + "```"))
        )
        self._writer.flush()

    def log(self, step: int, row: dict[str, Any]) -> None:
        values = [self._summary.Value(tag=k, simple_value=v) for k, v in scalars(row).items()]
        event = self._event(wall_time=time.time(), step=step, summary=self._summary(value=values))
        self._writer.write_event(event)
        self._writer.flush()

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandB:
    """A Weights & Biases run in OUT/wandb/, resumed by the id kept in OUT/wandb-id.txt. Project
    and entity come from WANDB_PROJECT (default "jaxpar") and WANDB_ENTITY; WANDB_MODE=offline
    writes locally for `wandb sync` later."""

    def __init__(self, out: Path, config: Config, start: int):
        import wandb

        id_file = out / WANDB_ID
        if not id_file.exists():
            id_file.write_text(uuid.uuid4().hex[:16] + "\n")
        self._run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "jaxpar"),
            name=out.name,
            id=id_file.read_text().strip(),
            resume="allow",
            dir=str(out),
            config=config.to_dict(),
        )

    def log(self, step: int, row: dict[str, Any]) -> None:
        if step >= self._run.step:  # a resumed run has the recomputed steps already
            self._run.log(scalars(row), step=step)

    def flush(self) -> None:
        pass  # wandb's own process writes as it goes

    def close(self) -> None:
        self._run.finish()
