"""The training loop: data, the compiled step, metrics, progress, and a closing text sample."""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from jaxpar.checkpoint import CHECKPOINTS, Checkpointer
from jaxpar.config import Config, dump_yaml
from jaxpar.data import Corpus, global_batch
from jaxpar.distributed import agree, current
from jaxpar.infer.sample import generate
from jaxpar.mesh import mesh_spec_of
from jaxpar.train.step import Trainer


@dataclass(frozen=True)
class Summary:
    start_step: int
    steps: int  # run in this session
    first_loss: float
    last_loss: float
    tokens_per_s: float
    compile_s: float
    train_s: float
    skipped: int
    stopped_by: str | None
    sample: str


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tps]:,.0f} tok/s"),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
    )


class TrainingAborted(RuntimeError):
    """Too many non-finite steps in a row; the last good checkpoint is left as it was."""


class _Signals:
    """SIGTERM and SIGINT ask the loop to finish its step, save and stop (a second SIGINT
    interrupts at once). orbax's own preemption check only works under jax.distributed."""

    def __init__(self) -> None:
        self.received: str | None = None

    def __enter__(self) -> _Signals:
        self._old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in self._old:
            signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.received == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


def _keep_metrics_before(path: Path, step: int) -> None:
    """Drops the rows of steps >= `step` (they will be run again), atomically."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line)["step"] < step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def train(
    config: Config,
    mesh: jax.sharding.Mesh,
    out: Path,
    console: Console,
    stop_after: int | None = None,
) -> Summary:
    """Trains `config` on `mesh` in `out`, resuming from its newest intact checkpoint if any.

    Writes `out/config.yaml`, `out/metrics.jsonl` (one row per step) and checkpoints under
    `out/checkpoints/`. SIGTERM or SIGINT (or `stop_after` steps in total) ends the run after the
    current step with a checkpoint.

    Raises:
        TrainingAborted: `train.max_bad_steps` non-finite steps in a row.
    """
    t, c = config.train, config.checkpoint
    corpus = Corpus.from_glob(config.data.path)
    corpus.check_fits(t.seq_len)
    trainer = Trainer(config, mesh)
    checkpoints = Checkpointer(trainer, out / CHECKPOINTS, keep=c.keep)
    restored = checkpoints.restore_latest(
        model=config.model, warn=lambda msg: console.print(msg, style="yellow")
    )
    primary = current().primary  # process 0 alone writes files; checkpoints are collective
    out.mkdir(parents=True, exist_ok=True)
    if primary:
        (out / "config.yaml").write_text(dump_yaml(config))

    m = config.model
    console.print(
        f"model: {m.num_params / 1e6:.2f}M params ({m.layers} layers, dim {m.dim}, "
        f"{m.heads} heads / {m.kv_heads} kv), {trainer.dtype.name} compute"
    )
    console.print(
        f"mesh: {mesh_spec_of(mesh)} on {mesh.devices.size} {jax.default_backend()} devices, "
        f"rules '{trainer.rules.name}'; data: {corpus.files} files, {len(corpus.tokens):,} bytes"
    )
    if restored is None:
        state, start = trainer.init_state(), 0
    else:
        state, meta = restored
        start = meta["step"]
        console.print(
            f"resuming from checkpoint {start} (written on mesh {meta['mesh']}) in "
            f"{out / CHECKPOINTS}"
        )
    if primary:
        _keep_metrics_before(out / "metrics.jsonl", start)
    step_fn, compile_s = trainer.compile()
    console.print(f"compiled the train step in {compile_s:.1f}s")
    overhead = trainer.compute_overhead()
    console.print(
        f"pipeline: {trainer.schedule.describe()}; {trainer.layout.imbalance()}\n"
        f"compute: {overhead.flops_per_device / 1e9:.3f} GFLOP per device per step = "
        f"{overhead.ratio:.3f} x ideal; overhead {overhead.bubble:.1%} of the step, "
        f"{overhead.stack_bubble:.1%} of the layer stack (theoretical bubble "
        f"{trainer.schedule.bubble:.1%})"
    )

    shape = trainer.batch_shape()
    tokens_per_step = t.batch_size * t.seq_len
    meta = {"config": config.to_dict(), "mesh": str(mesh_spec_of(mesh)), "seed": t.seed}
    last = min(t.steps, stop_after) if stop_after is not None else t.steps
    losses, times, bad_in_row, skipped = [], [], 0, 0
    log_every = max(1, t.steps // 10)
    stopped_by = None
    start_time = time.perf_counter()
    with (
        (out / "metrics.jsonl").open("a") if primary else open(os.devnull, "w") as metrics_file,
        _progress(console) as progress,
        _Signals() as signals,
    ):
        task = progress.add_task(
            "train", total=t.steps, completed=start, loss=float("nan"), tps=0.0
        )
        for step in range(start, last):
            batch = global_batch(corpus, t.seed, step, shape, trainer.batch_sharding)
            poison = float("nan") if step in t.nan_steps else 0.0
            t0 = time.perf_counter()
            state, metrics = trainer.step(state, batch, poison)
            metrics = jax.device_get(metrics)  # waits for the step's results
            dt = time.perf_counter() - t0
            bad_in_row = bad_in_row + 1 if metrics["skipped"] else 0
            skipped += int(metrics["skipped"])
            row = {
                "step": step,
                "loss": float(metrics["loss"]),
                "lr": float(metrics["lr"]),
                "grad_norm": float(metrics["grad_norm"]),
                "step_time_s": dt,
                "tokens_per_s": tokens_per_step / dt,
                "skipped": bool(metrics["skipped"]),
                "bad_in_row": bad_in_row,
            }
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
            losses.append(row["loss"])
            times.append(dt)
            progress.update(task, advance=1, loss=row["loss"], tps=row["tokens_per_s"])
            if not console.is_terminal and (step % log_every == 0 or step == t.steps - 1):
                console.print(
                    f"step {step:>5}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
                    f"grad_norm {row['grad_norm']:.3f}  {row['tokens_per_s']:,.0f} tok/s"
                )
            if bad_in_row >= t.max_bad_steps:
                checkpoints.close()
                raise TrainingAborted(
                    f"{bad_in_row} steps in a row (up to step {step}) had a non-finite loss or "
                    f"gradient (train.max_bad_steps={t.max_bad_steps}); stopped without saving, "
                    f"the last good checkpoint is in {out / CHECKPOINTS}"
                )
            done = step + 1
            # Read the signal flag once: one that arrives during the save below stops the
            # run after the next step, which saves again. Every process stops at the same step.
            received = signals.received
            if agree(received is not None) and received is None:
                received = "a signal to another process"
            stopped_by = received or ("stop_after" if done == last < t.steps else None)
            if stopped_by or done == t.steps or (c.every and done % c.every == 0):
                checkpoints.save(done, state, meta)
            if stopped_by:
                break
    checkpoints.close()
    train_s = time.perf_counter() - start_time
    if stopped_by:
        console.print(f"stopped by {stopped_by} after step {start + len(losses) - 1}; "
                      f"checkpoint {start + len(losses)} saved")  # fmt: skip

    sample = ""
    if t.sample_tokens and not stopped_by and losses:
        prompt = np.frombuffer(t.sample_prompt.encode(), dtype=np.uint8).astype(np.int32)
        spec = mesh_spec_of(mesh)
        rows = spec.data * spec.pipeline  # the batch is split over both outside the layers
        with jax.set_mesh(mesh):
            ids = generate(
                trainer.graphdef, state.params, np.tile(prompt, (rows, 1)), t.sample_tokens,
                t.seq_len, seed=t.seed, dtype=trainer.dtype,
            )  # fmt: skip
        text = bytes(np.asarray(ids[0], dtype=np.uint8)).decode("utf-8", errors="replace")
        sample = t.sample_prompt + text
    # The first step of a session waits for nothing in flight; later steps show the steady state.
    steady = times[1:] or times
    return Summary(
        start_step=start,
        steps=len(losses),
        first_loss=losses[0] if losses else float("nan"),
        last_loss=losses[-1] if losses else float("nan"),
        tokens_per_s=tokens_per_step * len(steady) / sum(steady) if steady else 0.0,
        compile_s=compile_s,
        train_s=train_s,
        skipped=skipped,
        stopped_by=stopped_by,
        sample=sample,
    )
