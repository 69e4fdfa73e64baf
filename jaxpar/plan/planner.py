"""`jaxpar plan`: every layout the model allows on N devices, ranked by the cost model, the best
ones compiled and ranked again.

The search is exhaustive (a few thousand candidates for 8 devices, tens of thousands for 64, at
well under a millisecond each), so the analytic ranking is exact for the model; the compile check
then replaces the best candidates' memory and traffic with the compiled program's. A candidate
whose memory exceeds the profile's is dropped, with the reason. A pipelined candidate takes the
uneven split `jaxpar.plan.space.uneven` proposes where that shortens its layer stack's time and
fits, else the balanced one (`estimate_split`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from jaxpar.config import Config
from jaxpar.errors import JaxparError
from jaxpar.plan.cost import Estimate, attention_impl, estimate, stack_seconds
from jaxpar.plan.hardware import Hardware
from jaxpar.plan.space import Candidate, candidates, uneven

Progress = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass(frozen=True)
class Plan:
    devices: int
    hardware: Hardware
    searched: int
    ranked: list[Estimate]  # best first, those that fit only
    dropped: list[Estimate]  # compiled and over the memory
    compiled: bool  # whether the best ones were compile-checked
    search_s: float
    compile_s: float
    attention: str  # the implementation the cost model priced (`attention_impl`)

    @property
    def best(self) -> Estimate:
        return self.ranked[0]

    def to_json(self, top: int) -> dict:
        return {
            "devices": self.devices,
            "hardware": self.hardware.name,
            "searched": self.searched,
            "compile_checked": self.compiled,
            "attention": self.attention,
            "search_s": self.search_s,
            "compile_s": self.compile_s,
            "candidates": [e.to_json() for e in self.ranked[:top]],
            "dropped": [e.to_json() for e in self.dropped],
        }


def _rank_key(e: Estimate) -> tuple[float, int]:
    return (e.step_s, e.memory_bytes)


def estimate_split(config: Config, candidate: Candidate, hw: Hardware) -> Estimate:
    """The estimate of `candidate` on the split `uneven` proposes where its layer stack (compute
    and per-layer overhead, slowest stage tick by tick) takes less time than the balanced
    split's and it fits (it stores its largest chunk's slots on every stage), else balanced."""
    split = uneven(config, candidate)
    if split == candidate or stack_seconds(config, split, hw) >= stack_seconds(
        config, candidate, hw
    ):
        return estimate(config, candidate, hw)
    e = estimate(config, split, hw)
    return e if e.fits else estimate(config, candidate, hw)


def plan(
    config: Config,
    devices: int,
    hw: Hardware,
    top: int = 5,
    compile_top: int = 0,
    progress: Progress = lambda phase, done, total: None,
) -> Plan:
    """Ranks every layout of `config` on `devices` devices for the profile `hw`.

    Args:
        top: how many to keep ranked (all are searched).
        compile_top: compile-check the best this many by the model (0: the model alone); a
            dropped candidate's place goes to the next best, so up to `compile_top` survive.

    Raises:
        JaxparError: `top` < 1; no layout at all (why, by axis); no layout fits the memory (the
            smallest any layout needs).
    """
    import time

    if top < 1:
        raise JaxparError(f"--top {top} must be at least 1")
    start = time.perf_counter()
    found = candidates(config, devices)
    estimates = []
    for i, c in enumerate(found):
        estimates.append(estimate_split(config, c, hw))
        if i % 256 == 0 or i == len(found) - 1:
            progress("cost model", i + 1, len(found))
    fitting = sorted((e for e in estimates if e.fits), key=_rank_key)
    if not fitting:
        least = min(estimates, key=lambda e: e.memory_bytes)
        raise JaxparError(
            f"no layout of {devices} devices fits {hw.name}'s {hw.memory_gib:g} GiB per device: "
            f"the smallest needs {least.memory_bytes / 2**30:,.2f} GiB "
            f"({least.candidate.describe()}, M={least.candidate.microbatches}, "
            f"remat={least.candidate.remat}); use more devices or a smaller batch or model"
        )
    search_s = time.perf_counter() - start
    dropped: list[Estimate] = []
    checked: list[Estimate] = []
    if compile_top:
        from jaxpar.plan.check import compile_check

        for e in fitting:
            if len(checked) >= compile_top:
                break
            progress("compiling", len(checked) + len(dropped), compile_top)
            done = compile_check(config, e, hw)
            (checked if done.fits else dropped).append(done)
        progress("compiling", compile_top, compile_top)
        seen = {e.candidate for e in checked + dropped}
        rest = [e for e in fitting if e.candidate not in seen]
        fitting = sorted(checked, key=_rank_key) + rest
    return Plan(
        devices=devices,
        hardware=hw,
        searched=len(found),
        ranked=fitting,
        dropped=dropped,
        compiled=bool(compile_top),
        search_s=search_s,
        compile_s=time.perf_counter() - start - search_s,
        attention=attention_impl(config, hw),
    )


def auto_layout(config: Config, devices: int, hw: Hardware) -> tuple[Config, Plan]:
    """`--mesh auto`: `config` laid out as the cost model's best layout for `devices` devices
    (the global batch, model and everything else kept), and the plan it came from."""
    result = plan(config, devices, hw, top=1)
    return result.best.candidate.apply(config), result


def describe_choice(p: Plan) -> str:
    """One line: which layout `--mesh auto` took, and why."""
    best = p.best
    return (
        f"--mesh auto took {' '.join(best.candidate.overrides)} (the best of {p.searched:,} "
        f"layouts for {p.devices} x {p.hardware.name}: predicted {best.step_s * 1e3:,.1f} ms per "
        f"step, {_size(best.memory_bytes)} per device)"
    )


def _size(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def render(p: Plan, top: int, console: Console) -> None:
    """The ranked table, one row per layout, with the terms that decide it."""
    console.print(
        f"[bold]plan for {p.devices} x {p.hardware.name}[/bold] ({p.hardware.description}): "
        f"{p.searched:,} layouts searched in {p.search_s:.2f}s (attention: {p.attention})"
        + (
            f"; the best {sum(e.compiled for e in p.ranked) + len(p.dropped)} compiled in "
            f"{p.compile_s:.1f}s"
            if p.compiled
            else "; ranked by the cost model alone (nothing compiled)"
        )
    )
    table = Table()
    columns = ("#", "layout", "M", "remat", "memory/dev", "step ms", "tokens/s", "MFU",
               "compute", "overhead", "bubble", "recompute", "comm exposed", "checked")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column in ("layout", "remat") else "right")
    for i, e in enumerate(p.ranked[:top]):
        c = e.candidate
        comm = ", ".join(f"{t.axis} {t.seconds * 1e3:,.2f}" for t in e.comm if t.seconds > 0)
        table.add_row(
            str(i + 1), c.describe(), str(c.microbatches), c.remat, _size(e.memory_bytes),
            f"{e.step_s * 1e3:,.2f}", f"{e.tokens_per_s:,.0f}", f"{e.mfu:.1%}",
            f"{e.compute_s * 1e3:,.2f}", f"{e.overhead_s * 1e3:,.2f}", f"{e.bubble:.1%}",
            f"{e.recompute_s * 1e3:,.2f}",
            f"{(e.comm_s - e.hidden_s) * 1e3:,.2f} ({comm or '-'})",
            "compiled" if e.compiled else "model",
        )  # fmt: skip
    console.print(table)
    for e in p.dropped:
        console.print(f"  {e.candidate.describe()} M={e.candidate.microbatches} "
                      f"remat={e.candidate.remat}: {'; '.join(e.notes)}")  # fmt: skip
    console.print(f"best: jaxpar train {' '.join(p.best.candidate.overrides)}")
