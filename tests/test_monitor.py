"""Watching a run: the trackers (metrics.jsonl and TensorBoard, read back with TensorBoard's own
reader), the held-out loss against `jaxpar eval`, MFU, goodput over a hang, a kill and two
resumes, the hang watchdog in one and two processes, SIGUSR1, the straggler alarm, bad values."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from jaxpar.cli import main
from jaxpar.config import load_config
from jaxpar.mesh import make_mesh, parse_mesh
from jaxpar.train import loop
from jaxpar.train.bench import step_flops
from jaxpar.train.step import Trainer
from jaxpar.train.trackers import Jsonl
from jaxpar.train.watchdog import HANG_EXIT

SIZES = [
    "model.layers=2", "model.dim=32", "model.heads=4", "model.kv_heads=4", "model.mlp_dim=64",
    "train.batch_size=8", "train.seq_len=16", "train.warmup_steps=2", "train.sample_tokens=0",
    "train.dtype=float32",
]  # fmt: skip
QUIET = Console(quiet=True)
WORDS = "def class return import lambda yield for while if else self data model mesh step loss ."
TIMEOUT = 300  # one subprocess run on a slow, busy machine


def _text(n: int, seed: int) -> str:
    words = np.random.default_rng(seed).choice(WORDS.split(), size=n)
    return " ".join(words)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _tensorboard(out: Path, tag: str) -> tuple[list[int], list[float]]:
    """A tag's (steps, values) as TensorBoard shows them (purged steps hidden)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = events.Scalars(tag)
    return [e.step for e in scalars], [e.value for e in scalars]


@pytest.fixture
def compiles():
    """The backend compilations while the test runs (a list that grows)."""
    import jax
    from jax._src import monitoring

    seen: list[str] = []

    def listen(event: str, *args, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            seen.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    yield seen
    monitoring.unregister_event_duration_listener(listen)


def test_trackers_held_out_loss_and_mfu(tmp_path, monkeypatch, capsys, compiles):
    # A pipeline with its own backward: the held-out loss runs its forward ticks alone.
    held = tmp_path / "held.txt"
    held.write_text(_text(400, 1)[: 2 * 8 * 16 + 1])  # exactly 2 batches of 8 windows
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(_text(3000, 2))
    monkeypatch.setattr(loop, "_peak", lambda kind, dtype: 1e12)  # a chip with a known peak
    written = []  # compilations so far, as each row is written
    log = Jsonl.log
    monkeypatch.setattr(Jsonl, "log", lambda self, *a: (written.append(len(compiles)),
                                                        log(self, *a)))  # fmt: skip
    config = load_config(None, [
        *SIZES, "train.steps=7", "checkpoint.every=7", f"data.path={corpus}",
        f"data.eval_path={held}", "train.eval_every=3", "train.eval_batches=5",
        "pipeline.schedule=1f1b", "pipeline.microbatches=2",
    ])  # fmt: skip
    out = tmp_path / "run"
    summary = loop.train(config, make_mesh(parse_mesh("data=2,pipeline=2,tensor=2")), out, QUIET)
    rows = _rows(out)
    assert [r["step"] for r in rows] == list(range(7))
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 5, 6]  # after 3, 6 and the last
    assert written[2] == written[-1], "something compiled after the first held-out loss"
    # The held-out loss is `jaxpar eval`'s on the same checkpoint and text (2 of the 5 batches
    # asked for exist).
    assert main(["eval", "--run", str(out), "--mesh", "data=8", "--text", str(held), "--json"]) == 0
    nll = json.loads(capsys.readouterr().out)["nll"]
    np.testing.assert_allclose(rows[-1]["eval_loss"], nll, rtol=1e-6)
    # MFU: the model FLOPs of `jaxpar bench` over the step time, 8 devices and the peak.
    flops = step_flops(Trainer(summary.placement))[0]
    for r in rows:
        np.testing.assert_allclose(r["mfu"], flops / r["step_time_s"] / 8 / 1e12, rtol=1e-9)
    # TensorBoard's reader sees every row's values (as float32).
    steps, losses = _tensorboard(out, "train/loss")
    assert steps == list(range(7))
    np.testing.assert_array_equal(losses, np.float32([r["loss"] for r in rows]))
    steps, evals = _tensorboard(out, "eval/loss")
    assert steps == [2, 5, 6]
    held_out = [r["eval_loss"] for r in rows if "eval_loss" in r]
    np.testing.assert_array_equal(evals, np.float32(held_out))
    assert summary.goodput["steps"] == {"productive": 7, "skipped": 0, "recomputed": 0}


# --- subprocesses --------------------------------------------------------------------------------

STEPS, EVERY = 14, 4
RUN = [*SIZES, f"train.steps={STEPS}", f"checkpoint.every={EVERY}", "train.fault_nan_steps=[2, 3]"]


def _env() -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = flags.strip()
    return env


class Job:
    """A `jaxpar ARGV` subprocess, its output in files, its wall time measured from outside."""

    def __init__(self, tmp: Path, name: str, argv: list[str]):
        self.stdout, self.stderr = tmp / f"{name}.stdout", tmp / f"{name}.stderr"
        self.started = time.time()
        with self.stdout.open("w") as so, self.stderr.open("w") as se:
            self.proc = subprocess.Popen([sys.executable, "-m", "jaxpar", *argv], stdout=so,
                                         stderr=se, env=_env(), start_new_session=True)  # fmt: skip
        self.ended: float | None = None

    def describe(self) -> str:
        return (f"exit {self.proc.poll()}\n--- stdout:\n{self.stdout.read_text()[-3000:]}\n"
                f"--- stderr:\n{self.stderr.read_text()[-3000:]}")  # fmt: skip

    def wait(self, timeout: float = TIMEOUT) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"no exit within {timeout}s: {self.describe()}") from None
        self.ended = self.ended or time.time()
        return code

    def until(self, condition, what: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not condition():
            assert self.proc.poll() is None, f"ended before {what}: {self.describe()}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.01)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.ended = time.time()
        self.proc.wait(30)

    @property
    def wall(self) -> float:
        assert self.ended is not None
        return self.ended - self.started


def _train(tmp: Path, name: str, out: Path, *extra: str) -> Job:
    return Job(tmp, name, ["train", "--out", str(out), "--mesh", "data=2,tensor=4", *RUN, *extra])


def _goodput(out: Path) -> dict:
    return json.loads((out / "goodput.json").read_text())


def test_a_hang_and_a_kill_lose_nothing_and_are_accounted(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(_text(3000, 3))
    data = f"data.path={corpus}"
    out = tmp_path / "run"
    reference = _train(tmp_path, "reference", tmp_path / "reference", data)
    # 1. A hang before step 7: the watchdog ends the run 2 s after step 5, the last one read.
    hung = _train(tmp_path, "hung", out, data, "train.fault_hang_step=7",
                  "train.hang_timeout_s=2")  # fmt: skip
    hung.until(lambda: "fault injection" in hung.stderr.read_text(), "the hang")
    began = time.monotonic()
    assert hung.wait() == HANG_EXIT, hung.describe()
    assert time.monotonic() - began < 2 + 60
    line = hung.stderr.read_text().strip().splitlines()[-1]
    assert line.startswith("jaxpar: hang: step 6 did not finish in "), line
    assert "process 0 was waiting in " in line and "_dispatch" in line, line
    stacks = (out / "stacks" / "process-0.txt").read_text()
    assert "--- hang: no step finished" in stacks and "in _dispatch" in stacks, stacks
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [4]
    # 2. Resumed from checkpoint 4 (steps 4-5 recomputed), then SIGKILLed after checkpoint 8
    # (its steps slowed down on the host, so that the kill lands before the end).
    killed = _train(tmp_path, "killed", out, data, "train.fault_slow_s=0.25")
    killed.until(lambda: _goodput(out)["attempts"][-1]["end_step"] >= 10
                 and (out / "checkpoints" / "8" / "meta").is_dir(), "step 9")  # fmt: skip
    killed.kill()
    reached = max(r["step"] for r in _rows(out)) + 1
    # 3. Resumed from checkpoint 8 to the end; SIGUSR1 on the way writes the stacks only.
    last = _train(tmp_path, "last", out, data)
    last.until(lambda: "model:" in last.stdout.read_text(), "the model line")
    size = (out / "stacks" / "process-0.txt").stat().st_size
    last.proc.send_signal(signal.SIGUSR1)
    assert last.wait() == 0, last.describe()
    assert (out / "stacks" / "process-0.txt").stat().st_size > size
    assert reference.wait() == 0, reference.describe()

    # Every step once, bit-identical to the uninterrupted run, in metrics.jsonl and TensorBoard.
    rows, ref = _rows(out), _rows(tmp_path / "reference")
    assert [r["step"] for r in rows] == list(range(STEPS))
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref]
    steps, losses = _tensorboard(out, "train/loss")
    assert steps == list(range(STEPS))
    np.testing.assert_array_equal(losses, np.float32([r["loss"] for r in ref]))
    # Goodput: three attempts, the skipped and recomputed steps exact, the parts adding up to
    # the wall time measured from outside.
    goodput = _goodput(out)
    assert [a["ended"] for a in goodput["attempts"]] == ["hang", None, "finished"]
    assert goodput["restarts"] == 2
    assert goodput["steps"] == {
        "productive": STEPS - 2, "skipped": 2, "recomputed": (6 - 4) + (reached - 8),
    }  # fmt: skip
    assert goodput["seconds"]["hang"] >= 2
    parts = sum(v for k, v in goodput["seconds"].items() if k != "other")
    walls = hung.wall + killed.wall + last.wall
    assert abs(parts - walls) < 0.05 * walls, (parts, walls, goodput["seconds"])
    summary = subprocess.run([sys.executable, "-m", "jaxpar", "report", str(out)], env=_env(),
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "restarts" in summary and "recomputed" in summary, summary


def test_two_processes_name_the_straggler_and_the_process_that_hung(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(_text(3000, 4))
    out = tmp_path / "run"
    job = Job(tmp_path, "launch", [
        "launch", "-n", "2", "--devices-per-process", "4", "--", "train", "--out", str(out),
        "--mesh", "data=2,tensor=4", *SIZES, "train.steps=40", "checkpoint.every=5",
        f"data.path={corpus}", "train.fault_process=1", "train.fault_slow_s=0.15",
        "train.fault_hang_step=12", "train.straggler_every=2", "train.hang_timeout_s=3",
    ])  # fmt: skip
    job.until(lambda: "fault injection" in job.stdout.read_text(), "the hang")
    began = time.monotonic()
    code = job.wait()
    assert time.monotonic() - began < 3 + 60, "the job did not end within a minute of the timeout"
    text = job.stdout.read_text()
    assert code == HANG_EXIT, job.describe()
    warnings = [line for line in text.splitlines() if "straggler:" in line]
    assert len(warnings) == 1 and "straggler: process 1 spends" in warnings[0], text
    hang = [line for line in text.splitlines() if line.startswith("[0] jaxpar: hang:")]
    assert len(hang) == 1, text
    assert "step 12 did not finish" in hang[0] and "process 1 never dispatched it" in hang[0]
    assert "[launch] process" in text and "hang watchdog" in text, text
    for i in range(2):
        assert "--- hang: no step finished" in (out / "stacks" / f"process-{i}.txt").read_text()
    assert "[1] fault injection: process 1 hangs before step 12" in text
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir())[-1] == 10


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["train.tracker=nope"], "train.tracker='nope' is not one of jsonl, tensorboard, wandb"),
        (["train.eval_every=0"], "train.eval_every=0 must be at least 1"),
        (["data.eval_path=/no/such/*.txt"], "data.eval_path='/no/such/*.txt' matches no files"),
        (["train.tracker=jsonl,wandb"], "train.tracker=wandb needs the wandb package"),
    ],
)
def test_bad_values_are_one_line_before_anything_compiles(tmp_path, capsys, monkeypatch, extra,
                                                          message):  # fmt: skip
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    monkeypatch.setattr(Trainer, "compile", lambda self: pytest.fail("compiled"))
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--mesh", "data=2,tensor=4", *SIZES, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"jaxpar: error: {message}") and err.count("\n") == 1, err
    assert not (out / "checkpoints").exists()
