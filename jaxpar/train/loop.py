"""The training loop: a run folder, the compiled step, metrics, progress, signals, checkpoints.

`train` reads top to bottom as the run goes: restore or initialise, describe the run, compile, then
`_run_steps`, whose step-by-step decisions (a metrics row, when to stop, when to save) are small
functions of their own. What a caller does with the trained model afterwards (the closing text
sample of `jaxpar train`) is not the loop's business: `Summary` hands back the final state.
"""

from __future__ import annotations

import functools
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from jaxpar.analysis.flops import compute_overhead
from jaxpar.checkpoint import Checkpointer
from jaxpar.config import Config, dump_yaml
from jaxpar.data import Corpus, global_batch, held_out_batch
from jaxpar.distributed import agree, current
from jaxpar.errors import JaxparError
from jaxpar.placement import Placement
from jaxpar.plan.hardware import peak_flops
from jaxpar.runs import CHECKPOINTS, CONFIG, GOODPUT, METRICS, STACKS, keep_metrics_before
from jaxpar.train import balance
from jaxpar.train.bench import step_flops
from jaxpar.train.goodput import Ledger, describe
from jaxpar.train.step import Trainer, TrainState
from jaxpar.train.trackers import Tracker, check_trackers, open_trackers
from jaxpar.train.watchdog import Stragglers, Watchdog


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
    placement: Placement
    goodput: dict[str, Any] = field(repr=False)  # `goodput.Ledger.totals`, every attempt
    state: TrainState = field(repr=False)  # after the last step


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


def train(
    config: Config,
    mesh: jax.sharding.Mesh,
    out: Path,
    console: Console,
    stop_after: int | None = None,
    stage_times: Callable[[Trainer], Sequence[float]] | None = None,
    started: float | None = None,
) -> Summary:
    """Trains `config` on `mesh` in `out`, resuming from its newest intact checkpoint if any.

    Writes `out/config.yaml`, `out/metrics.jsonl` (one row per step) and the other trackers'
    files (`jaxpar.train.trackers`), `out/goodput.json` (`jaxpar.train.goodput`; the attempt
    began at `started`, a Unix time, default now) and checkpoints under `out/checkpoints/`.
    SIGTERM or SIGINT (or `stop_after` steps in total) ends the run after the current step with
    a checkpoint. With held-out text (`data.eval_path` or `data.eval_fraction`) the loss on it
    is logged every `train.eval_every` steps. A hang ends the process (`jaxpar.train.watchdog`).
    With `train.rebalance_every`, the stages' times are measured (`stage_times(trainer)`,
    default: `balance.timed_stages`) and the layers moved between stages while the run goes on
    (`jaxpar.train.balance`).

    Raises:
        JaxparError: a tracker that is not installed, or held-out text that is missing or short.
        TrainingAborted: `train.max_bad_steps` non-finite steps in a row.
    """
    t = config.train
    check_trackers(config)
    corpus, held_out = corpora(config)
    trainer = Trainer(Placement(config, mesh))
    target = trainer.abstract_state()
    out.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(out / GOODPUT if current().primary else None, started or time.time())

    def on_hang() -> None:
        ledger.charge("hang")
        ledger.end("hang")

    dog = Watchdog(out / STACKS / f"process-{current().index}.txt", t.hang_timeout_s, current(),
                   on_hang)  # fmt: skip
    checkpointer = Checkpointer(
        trainer.placement, out / CHECKPOINTS, target, config.checkpoint.keep
    )
    with dog, checkpointer as ckpt:
        ledger.charge("startup")
        state, restored = _restore_or_init(trainer, ckpt, console)
        start = restored["step"] if restored else 0
        ledger.charge("restore" if restored else "startup")
        ledger.begin(start, _open_run_folder(out, config, start))
        _describe(trainer, corpus, held_out, console)
        if restored:
            console.print(
                f"resuming from checkpoint {start} (written on mesh {restored['mesh']}) in "
                f"{out / CHECKPOINTS}"
            )
            changed = layout_change(restored["config"], config)
            if changed:
                console.print(
                    f"layout changed since the checkpoint: {changed}; the global batch stays "
                    f"{t.batch_size} x {t.seq_len}",
                    style="yellow",
                )
        compile_s = _compile(trainer, console, held_out is not None)
        ledger.charge("compile")
        last = min(t.steps, stop_after) if stop_after is not None else t.steps
        start_time = time.perf_counter()
        rebalancer = None
        if t.rebalance_every:
            measure = stage_times or balance.timed_stages()
            rebalancer = balance.Rebalancer(t.rebalance_every, t.rebalance_threshold, measure)
        watch = _Watch(
            trackers=open_trackers(config, out, start) if current().primary else [],
            ledger=ledger,
            dog=dog,
            stragglers=Stragglers(t.straggler_every, t.straggler_threshold, current(),
                                  warn=lambda msg: console.print(msg, style="yellow")),  # fmt: skip
            held_out=held_out,
        )
        try:
            run = _run_steps(trainer, corpus, ckpt, state, start, last, out, console, watch,
                             rebalancer)  # fmt: skip
        except TrainingAborted:
            ledger.end("aborted")
            raise
        finally:
            for tracker in watch.trackers:
                tracker.close()
    train_s = time.perf_counter() - start_time
    ledger.charge("checkpoint")  # the wait for the last save
    ledger.end("stopped" if run.stopped_by else "finished")
    if run.stopped_by:
        console.print(f"stopped by {run.stopped_by} after step {start + len(run.losses) - 1}; "
                      f"checkpoint {start + len(run.losses)} saved")  # fmt: skip
    goodput = ledger.totals()
    console.print(describe(goodput))
    # The first step of a session waits for nothing in flight; later steps show the steady state.
    steady = run.times[1:] or run.times
    tokens_per_step = t.batch_size * t.seq_len
    return Summary(
        start_step=start,
        steps=len(run.losses),
        first_loss=run.losses[0] if run.losses else float("nan"),
        last_loss=run.losses[-1] if run.losses else float("nan"),
        tokens_per_s=tokens_per_step * len(steady) / sum(steady) if steady else 0.0,
        compile_s=compile_s,
        train_s=train_s,
        skipped=run.skipped,
        stopped_by=run.stopped_by,
        placement=run.trainer.placement,
        goodput=goodput,
        state=run.state,
    )


def corpora(config: Config) -> tuple[Corpus, Corpus | None]:
    """The training text, and the held-out text (None without `data.eval_path` or
    `data.eval_fraction`), checked against the batch shape.

    Raises:
        JaxparError: no files, too little training text, or too little held-out text for one
            batch.
    """
    d, t = config.data, config.train
    corpus, held_out = Corpus.from_glob(d.path), None
    if d.eval_path:
        held_out = Corpus.from_glob(d.eval_path, "data.eval_path")
    elif d.eval_fraction:
        corpus, held_out = corpus.split(d.eval_fraction)
    corpus.check_fits(t.seq_len)
    if held_out is not None and held_out.windows(t.seq_len) < t.batch_size:
        given = f"data.eval_path={d.eval_path!r}" if d.eval_path else (
            f"data.eval_fraction={d.eval_fraction}")  # fmt: skip
        raise JaxparError(
            f"{given} holds {len(held_out.tokens):,} bytes, too few for one held-out batch of "
            f"{t.batch_size} x {t.seq_len + 1} tokens (windows overlapping by one: "
            f"{t.batch_size * t.seq_len + 1:,} bytes)"
        )
    return corpus, held_out


LAYOUT_KEYS = (
    ("parallel", "mesh"), ("parallel", "fsdp"), ("pipeline", "schedule"),
    ("pipeline", "microbatches"), ("pipeline", "repeats"), ("pipeline", "stage_layers"),
    ("model", "remat"),
)  # fmt: skip


def layout_change(saved: dict[str, dict[str, Any]], config: Config) -> str:
    """The layout keys that differ between a checkpoint's config and `config`, as
    `key old -> new` (empty when none does): what a resumed run re-planned."""
    now = config.to_dict()
    return ", ".join(
        f"{section}.{key} {saved[section][key]} -> {now[section][key]}"
        for section, key in LAYOUT_KEYS
        if saved.get(section, {}).get(key, now[section][key]) != now[section][key]
    )


def _restore_or_init(
    trainer: Trainer, checkpoints: Checkpointer, console: Console
) -> tuple[TrainState, dict[str, Any] | None]:
    """The newest intact checkpoint and its metadata, or a new state and None."""
    warn = lambda msg: console.print(msg, style="yellow")  # noqa: E731
    restored = checkpoints.restore_latest(warn=warn)
    return (trainer.init_state(), None) if restored is None else restored


def _open_run_folder(out: Path, config: Config, start: int) -> list[dict]:
    """Writes the config and drops the metrics rows a resumed run will write again (process 0
    alone writes files; checkpoints are collective); returns the rows there were (process 0's;
    none elsewhere)."""
    if not current().primary:
        return []
    (out / CONFIG).write_text(dump_yaml(config))
    return keep_metrics_before(out / METRICS, start)


def _describe(trainer: Trainer, corpus: Corpus, held_out: Corpus | None,
              console: Console) -> None:  # fmt: skip
    p = trainer.placement
    m = p.config.model
    console.print(
        f"model: {m.num_params / 1e6:.2f}M params ({m.layers} layers, dim {m.dim}, "
        f"{m.heads} heads / {m.kv_heads} kv), {p.dtype.name} compute, {p.attention} attention"
    )
    console.print(
        f"mesh: {p.spec} on {p.mesh.devices.size} {jax.default_backend()} devices, "
        f"rules '{p.rules.name}'; data: {corpus.files} files, {len(corpus.tokens):,} bytes"
    )
    if held_out is not None:
        t = p.config.train
        batches = min(t.eval_batches, held_out.windows(t.seq_len) // t.batch_size)
        console.print(
            f"held-out loss every {t.eval_every} steps on {batches} batches of {t.batch_size} x "
            f"{t.seq_len} ({len(held_out.tokens):,} bytes held out)"
        )
    if p.spec.context > 1:
        t = p.config.train.seq_len
        order = "load-balanced" if m.context_load_balance else "in order, not balanced"
        console.print(
            f"context: each sequence of {t:,} tokens in {p.spec.context} pieces of "
            f"{t // p.spec.context:,} ({order}), {m.context_attention} attention"
        )


def _compile(trainer: Trainer, console: Console, evaluates: bool = False) -> float:
    """Compiles the step (and the held-out loss where the run `evaluates`) and prints what the
    step computes against the ideal; returns the seconds."""
    compiled, compile_s = trainer.compile()
    if evaluates:
        compile_s += trainer.compile_eval()
    what = "the train step and the held-out loss" if evaluates else "the train step"
    console.print(f"compiled {what} in {compile_s:.1f}s")
    p = trainer.placement
    overhead = compute_overhead(p, compiled.as_text())
    console.print(
        f"pipeline: {p.schedule.describe()}; {p.layout.imbalance()}\n"
        f"compute: {overhead.flops_per_device / 1e9:.3f} GFLOP per device per step = "
        f"{overhead.ratio:.3f} x ideal; overhead {overhead.bubble:.1%} of the step, "
        f"{overhead.stack_bubble:.1%} of the layer stack (theoretical bubble "
        f"{p.schedule.bubble:.1%})"
    )
    return compile_s


@dataclass
class _Run:
    """What the step loop leaves behind."""

    state: TrainState
    trainer: Trainer  # changes when the layers move between stages
    losses: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    skipped: int = 0
    bad_in_row: int = 0
    stopped_by: str | None = None
    last_done: float = 0.0  # when the last step's metrics were read (or the loop began)
    extra: dict[str, float] = field(default_factory=dict)  # for the next row (stragglers')
    part: str = "productive"  # the goodput part of the last step read


@dataclass
class _Watch:
    """What watches the loop: the trackers (process 0's), the goodput ledger, the hang
    watchdog, the straggler alarm, and the held-out text."""

    trackers: list[Tracker]
    ledger: Ledger
    dog: Watchdog
    stragglers: Stragglers
    held_out: Corpus | None


def _run_steps(
    trainer: Trainer,
    corpus: Corpus,
    checkpoints: Checkpointer,
    state: TrainState,
    start: int,
    last: int,
    out: Path,
    console: Console,
    watch: _Watch,
    rebalancer: balance.Rebalancer | None = None,
) -> _Run:
    """Steps `start` .. `last` - 1: one metrics row each, progress, the held-out loss every
    `train.eval_every` steps, and a checkpoint every `checkpoint.every` steps, at the end and
    when stopped.

    The host never waits for a step before the next is queued (as MaxText's loop, metrics are
    read one step behind): while the devices run step s, the host builds step s + 1's batch and
    dispatches it, then reads step s's metrics. It waits for a step only to save or evaluate
    after it, since the next step takes (donates) its state, and to check the stages' balance."""
    p = trainer.placement
    t, every = p.config.train, p.config.checkpoint.every
    meta = {"config": p.config.to_dict(), "mesh": str(p.spec), "seed": t.seed}
    run = _Run(state, trainer, last_done=time.perf_counter())
    ledger, dog = watch.ledger, watch.dog
    dog.arm()
    with _progress(console) as progress, _Signals() as signals:
        task = progress.add_task(
            "train", total=t.steps, completed=start, loss=float("nan"), tps=0.0
        )

        def finish(step: int, metrics: dict, evaluate: bool = False) -> None:
            """Reads a dispatched step's metrics (waiting for it), the held-out loss after it
            when `evaluate`, writes its row, and aborts after too many non-finite steps in a
            row."""
            row = _row(run.trainer, run, step, metrics)
            part = run.part = ledger.step(step, row["skipped"])
            dog.finished(step, row["step_time_s"])
            if evaluate:
                with dog.long():
                    row["eval_loss"] = _held_out_loss(run.trainer, run.state, watch.held_out)
                ledger.charge("eval")
                run.last_done = time.perf_counter()  # the evaluation is not the next step's
            for tracker in watch.trackers:
                tracker.log(step, row)
            ledger.charge(part)
            progress.update(task, advance=1, loss=row["loss"], tps=row["tokens_per_s"])
            _log(console, row, t.steps)
            if run.bad_in_row >= t.max_bad_steps:
                raise TrainingAborted(
                    f"{run.bad_in_row} steps in a row (up to step {step}) had a non-finite loss "
                    f"or gradient (train.max_bad_steps={t.max_bad_steps}); stopped without "
                    f"saving, the last good checkpoint is in {out / CHECKPOINTS}"
                )

        pending: tuple[int, dict] | None = None
        for step in range(start, last):
            metrics, own = _dispatch(run.trainer, corpus, run, step, ledger, dog)
            if pending is not None:
                finish(*pending)
            watch.stragglers.add(own, run.times[-1] if run.times else own)
            pending = (step, metrics)
            done = step + 1
            run.extra |= watch.stragglers.check(done)
            run.stopped_by = _stop_reason(signals, done, last, t.steps)
            ledger.charge(run.part)  # the checks (collectives on many processes): step time
            save = run.stopped_by or done == t.steps or (every and done % every == 0)
            evaluate = watch.held_out is not None and (done % t.eval_every == 0 or
                                                       done == t.steps)  # fmt: skip
            if save or evaluate:
                finish(*pending, evaluate=evaluate)
                pending = None
            if save:
                for tracker in watch.trackers:  # a step before a checkpoint is on disk
                    tracker.flush()
                with dog.long():
                    checkpoints.save(done, run.state, meta)
                ledger.charge("checkpoint")
                ledger.write()
                run.last_done = time.perf_counter()  # the save is not the next step's time
            if run.stopped_by:
                break
            if rebalancer is not None and rebalancer.due(done, last):
                if pending is not None:
                    finish(*pending)
                    pending = None
                with dog.long():
                    if _rebalance(rebalancer, run, checkpoints, done, console):
                        meta["config"] = run.trainer.placement.config.to_dict()
                ledger.charge("rebalance")
        if pending is not None:
            finish(*pending)
    return run


def _rebalance(rebalancer: balance.Rebalancer, run: _Run, checkpoints: Checkpointer, done: int,
               console: Console) -> bool:  # fmt: skip
    """Checks the stages' balance after step `done`; moves the layers when the check says so.
    A move that fails leaves the run on its split (the old state is untouched until the new one
    is complete). Returns whether the layers moved. The stages' times go to the next row."""
    proposal = rebalancer.check(run.trainer)
    run.extra |= {f"stage_time_s/{i}": t for i, t in enumerate(rebalancer.times)}
    run.last_done = time.perf_counter()  # the check (and a move) is not the next step's time
    if proposal is None:
        return False
    try:
        run.trainer, run.state = balance.move(run.trainer, run.state, proposal.best)
    except Exception as e:  # noqa: BLE001 (any failure: the run goes on as it was)
        console.print(
            f"rebalance at step {done} failed, staying on stages "
            f"{','.join(map(str, proposal.now))}: {type(e).__name__}: {e}",
            style="yellow",
        )
        return False
    checkpoints.moved_to(run.trainer.placement, run.trainer.abstract_state())
    console.print(f"rebalanced at step {done}: {proposal.describe()}")
    run.last_done = time.perf_counter()
    return True


def _dispatch(trainer: Trainer, corpus: Corpus, run: _Run, step: int, ledger: Ledger,
              dog: Watchdog) -> tuple[dict[str, jax.Array], float]:  # fmt: skip
    """Queues step `step` on its batch (`run.state` becomes its result); returns its metrics,
    still on the devices, and the host's own time on it (building the batch)."""
    t = trainer.placement.config.train
    began = time.perf_counter()
    if t.fault_process in (-1, current().index):  # fault injection
        if step == t.fault_hang_step:
            print(f"fault injection: process {current().index} hangs before step {step}",
                  file=sys.stderr, flush=True)  # fmt: skip
            threading.Event().wait()  # for ever: the watchdog's to end
        time.sleep(t.fault_slow_s)
    dog.dispatched(step)
    batch = global_batch(
        corpus, t.seed, step, trainer.batch_shape(), trainer.placement.batch_sharding
    )
    own = time.perf_counter() - began
    ledger.charge("data")
    run.state, metrics = trainer.step(run.state, batch)
    return metrics, own


def _held_out_loss(trainer: Trainer, state: TrainState, held_out: Corpus) -> float:
    """The mean loss of the first `train.eval_batches` held-out batches (all dispatched, then
    read), with `state`'s parameters."""
    t, p = trainer.placement.config.train, trainer.placement
    batches = min(t.eval_batches, held_out.windows(t.seq_len) // t.batch_size)
    losses = [
        trainer.eval_loss(
            state.params, held_out_batch(held_out, i, trainer.batch_shape(), p.batch_sharding)
        )
        for i in range(batches)
    ]
    return sum(float(x) for x in jax.device_get(losses)) / batches


@functools.cache
def _peak(device_kind: str, dtype: str) -> float | None:
    return peak_flops(device_kind, dtype)


def _row(trainer: Trainer, run: _Run, step: int, metrics: dict[str, jax.Array]) -> dict[str, Any]:
    """Waits for a step's metrics, updates `run`, and returns its metrics row. Its time is from
    the end of the step before (in the steady state, the time the devices spent on it). MFU as
    `jaxpar bench` counts it, where the chip's datasheet peak is known."""
    p = trainer.placement
    t = p.config.train
    metrics = jax.device_get(metrics)
    now = time.perf_counter()
    dt, run.last_done = now - run.last_done, now
    skipped = bool(metrics["skipped"])
    run.bad_in_row = run.bad_in_row + 1 if skipped else 0
    run.skipped += skipped
    run.losses.append(float(metrics["loss"]))
    run.times.append(dt)
    row = {
        "step": step,
        "loss": float(metrics["loss"]),
        "lr": float(metrics["lr"]),
        "grad_norm": float(metrics["grad_norm"]),
        "step_time_s": dt,
        "tokens_per_s": t.batch_size * t.seq_len / dt,
        "skipped": skipped,
        "bad_in_row": run.bad_in_row,
    }
    peak = _peak(p.mesh.devices.flat[0].device_kind, p.dtype.name)
    if peak:
        row["mfu"] = step_flops(trainer)[0] / dt / p.mesh.devices.size / peak
    row |= run.extra
    run.extra = {}
    return row


def _stop_reason(signals: _Signals, done: int, last: int, steps: int) -> str | None:
    """Why the run stops after `done` steps, or None to go on.

    The signal flag is read once: one that arrives during the save that follows stops the run
    after the next step, which saves again. Every process stops at the same step."""
    received = signals.received
    if agree(received is not None) and received is None:
        received = "a signal to another process"
    return received or ("stop_after" if done == last < steps else None)


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


def _log(console: Console, row: dict[str, Any], steps: int) -> None:
    """A line every tenth of the run, when there is no progress bar (output to a file)."""
    step = row["step"]
    if not console.is_terminal and (step % max(1, steps // 10) == 0 or step == steps - 1):
        console.print(
            f"step {step:>5}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
            f"grad_norm {row['grad_norm']:.3f}  {row['tokens_per_s']:,.0f} tok/s"
        )
