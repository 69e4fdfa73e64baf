"""`jaxpar report`: what one or more training runs did, read back from their run folders. No jax
here (it reads files, and starts at once); matplotlib is imported by `plot_losses` alone.

For each run folder (`jaxpar.runs`): the steps done of those planned, the final and best loss and
held-out loss (finite ones only), the median tokens/s and MFU, the skipped steps and, where the run
wrote `goodput.json`, its restarts and where its wall time went (productive steps, compiling,
checkpoints, restores, steps recomputed after a restart, ...), largest first.

The tokens/s and MFU medians leave out the first step of each session (the run's first, and each
attempt's `start_step` in `goodput.json`): its time includes compiling the step.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from jaxpar.errors import JaxparError, typed
from jaxpar.runs import CONFIG, GOODPUT, METRICS

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table


@dataclass(frozen=True)
class Run:
    """A run folder read back.

    Attributes:
        path: the folder.
        rows: its metrics rows (`metrics.jsonl`), in step order.
        planned_steps: `train.steps` of its `config.yaml`; None without one.
        goodput: its `goodput.json`; None for runs that predate it.
    """

    path: Path
    rows: list[dict[str, Any]]
    planned_steps: int | None
    goodput: dict[str, Any] | None


@dataclass(frozen=True)
class Summary:
    """A run's figures: (step, value) pairs, None where the run has none."""

    final_loss: tuple[int, float] | None
    best_loss: tuple[int, float] | None
    final_eval: tuple[int, float] | None
    best_eval: tuple[int, float] | None
    tokens_per_s: float | None  # median of the steady rows
    mfu: float | None  # median of the steady rows, a fraction
    skipped: int


def read_run(path: Path) -> Run:
    """Reads a run folder (the --out of `jaxpar train`).

    Raises:
        JaxparError: `path` is not a run folder (no metrics.jsonl), or one of its files is not
            what `jaxpar train` writes (the message names the file, and the line of a bad row).
    """
    if not path.is_dir():
        raise JaxparError(f"run folder {str(path)!r} does not exist")
    if not (path / METRICS).is_file():
        raise JaxparError(
            f"{str(path)!r} is not a run folder: it has no {METRICS} (expected the --out folder "
            "of `jaxpar train`)"
        )
    return Run(path, _read_metrics(path / METRICS), _planned_steps(path / CONFIG),
               _read_goodput(path / GOODPUT))  # fmt: skip


def _read_metrics(file: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)  # NaN and Infinity, as Python writes a skipped step's loss
        except json.JSONDecodeError as e:
            raise JaxparError(f"{file}, line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or "step" not in row or "loss" not in row:
            raise JaxparError(f"{file}, line {n}: not a metrics row (an object with step, loss)")
        typed(row["step"], int, f"{file}, line {n}: step")
        typed(row["loss"], float, f"{file}, line {n}: loss")
        rows.append(row)
    return sorted(rows, key=lambda r: r["step"])


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise JaxparError(f"{file}: not valid JSON ({e.msg}, line {e.lineno})") from None


def _read_goodput(file: Path) -> dict[str, Any] | None:
    """`goodput.json`, its types checked; a missing part of the wall time counts 0."""
    if not file.is_file():
        return None
    goodput = typed(_read_json(file), dict, str(file))
    for key in ("wall_s", "goodput"):
        typed(goodput.get(key), float, f"{file}: {key}")
    typed(goodput.setdefault("restarts", 0), int, f"{file}: restarts")
    typed(goodput.setdefault("down_s", 0.0), float, f"{file}: down_s")  # between attempts
    for key, kind in (("seconds", float), ("steps", int)):
        for name, value in typed(goodput.setdefault(key, {}), dict, f"{file}: {key}").items():
            typed(value, kind, f"{file}: {key}.{name}")
    for attempt in typed(goodput.setdefault("attempts", []), list, f"{file}: attempts"):
        typed(attempt, dict, f"{file}: an attempt")
    return goodput


def _planned_steps(file: Path) -> int | None:
    if not file.is_file():
        return None
    try:
        config = yaml.safe_load(file.read_text())
    except yaml.YAMLError as e:
        raise JaxparError(f"{file}: not valid YAML ({str(e).splitlines()[0]})") from None
    train = typed(typed(config or {}, dict, str(file)).get("train") or {}, dict, f"{file}: train")
    steps = train.get("steps")
    return None if steps is None else typed(steps, int, f"{file}: train.steps")


def summarize(run: Run) -> Summary:
    """The figures of `run` that `render` shows."""
    losses = _finite(run.rows, "loss")
    evals = _finite(run.rows, "eval_loss")
    starts = {run.rows[0]["step"]} if run.rows else set()
    starts |= {a.get("start_step") for a in (run.goodput or {}).get("attempts", [])}
    steady = [r for r in run.rows if r["step"] not in starts] or run.rows
    return Summary(
        final_loss=losses[-1] if losses else None,
        best_loss=min(losses, key=lambda p: p[1]) if losses else None,
        final_eval=evals[-1] if evals else None,
        best_eval=min(evals, key=lambda p: p[1]) if evals else None,
        tokens_per_s=_median(steady, "tokens_per_s"),
        mfu=_median(steady, "mfu"),
        skipped=sum(bool(r.get("skipped")) for r in run.rows),
    )


def _finite(rows: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """The (step, value) of each row whose `key` is a finite number."""
    pairs = [(r["step"], r.get(key)) for r in rows]
    return [(s, float(v)) for s, v in pairs if isinstance(v, int | float) and math.isfinite(v)]


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [v for _, v in _finite(rows, key)]
    return statistics.median(values) if values else None


def labels(runs: Sequence[Run]) -> list[str]:
    """Each run's name: its folder's name, or the path as given where two runs share a name."""
    names = [r.path.resolve().name for r in runs]
    return [n if names.count(n) == 1 else str(r.path) for n, r in zip(names, runs, strict=True)]


# -- the terminal summary --------------------------------------------------------------------------


def render(runs: Sequence[Run], console: Console) -> None:
    """Prints one block per run: its steps, losses, speed and (with goodput.json) its restarts
    and where its wall time went."""
    for i, run in enumerate(runs):
        console.print(("\n" if i else "") + str(run.path), style="bold", markup=False)
        console.print(_run_table(run, summarize(run)))


def _run_table(run: Run, s: Summary) -> Table:
    from rich.table import Table

    table = Table.grid(padding=(0, 2))
    table.add_column(style="dim", min_width=11)  # the same indent in every run's block
    table.add_column()
    table.add_row("  steps", _steps_done(run))
    table.add_row("  loss", _final_and_best(s.final_loss, s.best_loss))
    if s.final_eval is not None:
        table.add_row("  eval loss", _final_and_best(s.final_eval, s.best_eval))
    if s.tokens_per_s is not None:
        table.add_row("  tokens/s", f"{s.tokens_per_s:,.0f} (median)")
    if s.mfu is not None:
        table.add_row("  MFU", f"{s.mfu:.1%} (median)")
    table.add_row("  skipped", f"{s.skipped} (non-finite loss or gradient norm)")
    if run.goodput is not None:
        _add_goodput(table, run.goodput)
    return table


def _steps_done(run: Run) -> str:
    planned = f" of {run.planned_steps} planned" if run.planned_steps is not None else ""
    if not run.rows:
        return f"none yet{planned}"
    first, last = run.rows[0]["step"], run.rows[-1]["step"]
    gaps = f", {len(run.rows)} rows" if len(run.rows) != last - first + 1 else ""
    return f"{first}..{last}{planned}{gaps}"


def _final_and_best(final: tuple[int, float] | None, best: tuple[int, float] | None) -> str:
    if final is None or best is None:
        return "no finite value"
    return f"final {final[1]:.4f} (step {final[0]}), best {best[1]:.4f} (step {best[0]})"


def _ended(attempt: dict[str, Any], last: bool) -> str:
    """How an attempt ended: as it recorded, else killed (or running: the last one, written to
    in the last minute)."""
    if attempt.get("ended"):
        return str(attempt["ended"])
    recent = time.time() - float(attempt.get("updated", 0)) < 60
    return "running" if last and recent else "killed"


def _add_goodput(table: Table, goodput: dict[str, Any]) -> None:
    """The restarts, the goodput, each non-zero part of the wall time (largest first) and the
    steps done, recomputed and skipped."""
    from rich.table import Table

    ended = Counter(_ended(a, a is goodput["attempts"][-1]) for a in goodput["attempts"])
    attempts = ", ".join(f"{n} {how}" for how, n in ended.items())
    down = goodput["down_s"]
    notes = [f"attempts: {attempts}"] if attempts else []
    notes += [f"{down:,.1f} s between attempts"] if down > 0 else []
    table.add_row(
        "  restarts", str(goodput["restarts"]) + (f" ({'; '.join(notes)})" if notes else "")
    )
    wall = goodput["wall_s"]
    table.add_row("  goodput", f"{goodput['goodput']:.1%} of {wall:,.1f} s wall time")
    parts = Table.grid(padding=(0, 2))
    parts.add_column()
    parts.add_column(justify="right")
    parts.add_column(justify="right")
    seconds = sorted(goodput["seconds"].items(), key=lambda kv: -kv[1])
    for name, s in seconds:
        if s > 0:
            parts.add_row(name, f"{s:,.1f} s", f"{s / wall:.1%}" if wall > 0 else "")
    table.add_row("", parts)
    counts = [f"{goodput['steps'].get(k, 0)} {k}" for k in ("productive", "recomputed", "skipped")]
    table.add_row("", "steps: " + ", ".join(counts))


# -- the plot -------------------------------------------------------------------------------------


def plot_losses(runs: Sequence[Run], path: Path) -> None:
    """Draws one PNG of two panels side by side: the training loss against the step, a line per
    run, and the held-out loss against the step (markers and a line per run; "no held-out loss"
    where no run has one). Non-finite losses (skipped steps) leave a gap.

    Needs matplotlib (`pip install -e ".[plot]"`)."""
    from matplotlib.figure import Figure  # no pyplot: no backend or global figure state

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    train_ax, eval_ax = fig.subplots(1, 2, sharex=True)
    any_eval = False
    for i, (run, label) in enumerate(zip(runs, labels(runs), strict=True)):
        color = f"C{i % 10}"  # a run's colour in both panels
        steps = [r["step"] for r in run.rows]
        losses = [float(r["loss"]) if math.isfinite(r["loss"]) else math.nan for r in run.rows]
        train_ax.plot(steps, losses, label=label, color=color, linewidth=1)
        evals = _finite(run.rows, "eval_loss")
        if evals:
            any_eval = True
            eval_steps, eval_losses = zip(*evals, strict=True)
            eval_ax.plot(
                eval_steps, eval_losses, marker="o", markersize=3, label=label, color=color
            )
    train_ax.set(title="training loss", xlabel="step", ylabel="loss")
    train_ax.legend(fontsize="small")
    eval_ax.set(title="held-out loss", xlabel="step", ylabel="loss")
    if any_eval:
        eval_ax.legend(fontsize="small")
    else:
        eval_ax.text(0.5, 0.5, "no held-out loss", ha="center", va="center",
                     transform=eval_ax.transAxes, color="gray")  # fmt: skip
    fig.savefig(path, dpi=110)
