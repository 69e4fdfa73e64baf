"""`jaxpar analyze`: memory, FLOPs, collectives and bubble of a compiled train step, per device.

Everything here is read from the compiled program without running it, so the figures are exact on
any host: the memory XLA assigned, the matmul FLOPs with loop trip counts applied, and every
collective with the mesh axes its replica groups span.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import jax
from rich.console import Console
from rich.table import Table

from jaxpar.analysis.comm import AxisTraffic, traffic
from jaxpar.analysis.flops import (
    ActionCosts,
    AttentionFlops,
    ComputeOverhead,
    action_costs,
    attention_flops,
    compute_overhead,
)
from jaxpar.analysis.hlo import HloModule, collectives, parse
from jaxpar.analysis.memory import MemoryEstimate, estimate_memory
from jaxpar.analysis.params import ParamRow, param_rows, tree_bytes_per_device
from jaxpar.mesh import AXES
from jaxpar.pipeline.schedule import split_costs
from jaxpar.placement import Placement


@dataclass(frozen=True)
class CompiledMemory:
    """Bytes per device: the state as laid out, and XLA's buffer assignment of the step."""

    params_bytes: int
    params_total_bytes: int
    opt_state_bytes: int
    opt_state_total_bytes: int
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int

    @property
    def peak_bytes(self) -> int:
        """Arguments, plus outputs not written in place of a donated argument, plus temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


@dataclass(frozen=True)
class SplitCosts:
    """A pipelined step's lockstep cost by the cost model (`layout_cost` times one job's tokens on
    one device: matmul FLOPs of the slowest stage summed over the ticks) on the balanced split
    (`even`) and on `choose_split`'s (`sizes`, `cost`)."""

    sizes: tuple[int, ...]
    even: float
    cost: float

    def to_json(self) -> dict[str, Any]:
        return {"layers": list(self.sizes), "even_lockstep_flops": self.even,
                "lockstep_flops": self.cost}  # fmt: skip


@dataclass(frozen=True)
class Analysis:
    mesh: str
    devices: int
    rules: str
    dtype: str
    model_params: int
    tokens_per_step: int
    schedule: str
    ticks: int
    memory: CompiledMemory
    estimate: MemoryEstimate
    overhead: ComputeOverhead
    attention: AttentionFlops
    bubble_theory: float
    bubble_lockstep: float
    split: SplitCosts | None
    actions: ActionCosts
    collectives: list[AxisTraffic]
    compile_s: float
    parameters: list[ParamRow]

    def to_json(self) -> dict[str, Any]:
        """One JSON document; every key is listed in the README (`jaxpar analyze --json`)."""
        o = self.overhead
        return {
            "mesh": self.mesh,
            "devices": self.devices,
            "rules": self.rules,
            "dtype": self.dtype,
            "model_params": self.model_params,
            "tokens_per_step": self.tokens_per_step,
            "schedule": self.schedule,
            "ticks": self.ticks,
            "compile_s": self.compile_s,
            "flops_per_device": o.flops_per_device,
            "ideal_flops_per_device": o.ideal_flops_per_device,
            "flops_ratio": o.ratio,
            "bubble_theory": self.bubble_theory,
            "bubble_lockstep": self.bubble_lockstep,
            "stage_split": self.split.to_json() if self.split else None,
            "action_flops": {
                "f": self.actions.f,
                "b": self.actions.b,
                "w": self.actions.w,
                "full_backward": self.actions.full_backward,
            },
            "attention_flops": {
                "computed_per_device": self.attention.computed_per_device,
                "useful_per_device_max": self.attention.useful_max,
                "useful_per_device_mean": self.attention.useful_mean,
            },
            "bubble_measured": o.stack_bubble,
            "overhead_measured": o.bubble,
            "memory": {
                "params_bytes": self.memory.params_bytes,
                "params_total_bytes": self.memory.params_total_bytes,
                "opt_state_bytes": self.memory.opt_state_bytes,
                "opt_state_total_bytes": self.memory.opt_state_total_bytes,
                "argument_bytes": self.memory.argument_bytes,
                "output_bytes": self.memory.output_bytes,
                "temp_bytes": self.memory.temp_bytes,
                "alias_bytes": self.memory.alias_bytes,
                "peak_bytes": self.memory.peak_bytes,
                "estimate": self.estimate.to_json(),
            },
            "collectives": [
                {"kind": c.kind, "axis": c.axis, "count": c.count, "bytes": c.bytes}
                for c in self.collectives
            ],
            "parameters": [
                {
                    "name": r.name,
                    "shape": list(r.shape),
                    "logical_axes": list(r.logical_axes),
                    "spec": [a if a is None or isinstance(a, str) else list(a) for a in r.spec],
                    "bytes": r.bytes,
                    "bytes_per_device": r.bytes_per_device,
                }
                for r in self.parameters
            ],
        }


class CompiledStep(Protocol):
    """What `analyze` reads: a train step on a placement (`jaxpar.train.step.Trainer` is one)."""

    placement: Placement

    def compile(self) -> tuple[jax.stages.Compiled, float]:
        """The compiled step and the seconds its compilation took."""
        ...

    def abstract_state(self) -> Any:
        """The state as ShapeDtypeStructs with shardings; its `opt_state` is counted."""
        ...


@dataclass(frozen=True)
class CompiledFigures:
    """What one compile of a step tells without compiling anything else."""

    memory: CompiledMemory
    collectives: list[AxisTraffic]
    module: HloModule
    compile_s: float


def compiled_figures(step: CompiledStep) -> CompiledFigures:
    """Compiles `step` (nothing runs) and reads XLA's memory assignment and its collectives."""
    placement = step.placement
    compiled, compile_s = step.compile()
    opt_state = step.abstract_state().opt_state
    module = parse(compiled.as_text())
    rows = param_rows(placement.abstract_params, placement.param_shardings)
    stats = compiled.memory_analysis()
    memory = CompiledMemory(
        params_bytes=sum(r.bytes_per_device for r in rows),
        params_total_bytes=sum(r.bytes for r in rows),
        opt_state_bytes=tree_bytes_per_device(
            opt_state, jax.tree.map(lambda x: x.sharding, opt_state)
        ),
        opt_state_total_bytes=sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt_state)),
        argument_bytes=stats.argument_size_in_bytes,
        output_bytes=stats.output_size_in_bytes,
        temp_bytes=stats.temp_size_in_bytes,
        alias_bytes=stats.alias_size_in_bytes,
    )
    found = traffic(collectives(module, placement.spec.sizes, AXES))
    return CompiledFigures(memory, found, module, compile_s)


def placement_estimate(placement: Placement) -> MemoryEstimate:
    """The analytic memory estimate for a placement (parameters per device from its shardings)."""
    rows = param_rows(placement.abstract_params, placement.param_shardings)
    return estimate_memory(
        placement.config, placement.spec, placement.schedule,
        sum(r.bytes_per_device for r in rows), compute_bytes=placement.dtype.itemsize,
        attention=placement.attention,
    )  # fmt: skip


def split_flops(placement: Placement) -> SplitCosts | None:
    """`SplitCosts` of a pipelined placement (None without stages)."""
    config, spec, schedule = placement.config, placement.spec, placement.schedule
    if spec.pipeline == 1:
        return None
    t = config.train
    rows = t.batch_size // (spec.data * schedule.microbatches)
    tokens = rows * t.seq_len / (spec.context * spec.tensor)  # one job's, on one device
    sizes, even, cost = split_costs(config, spec.pipeline, schedule)
    return SplitCosts(sizes, even * tokens, cost * tokens)


def analyze(step: CompiledStep) -> Analysis:
    """Compiles `step` (nothing runs) and reads its figures."""
    placement = step.placement
    config, mesh, spec = placement.config, placement.mesh, placement.spec
    figures = compiled_figures(step)
    memory, module = figures.memory, figures.module
    rows = param_rows(placement.abstract_params, placement.param_shardings)
    estimate = placement_estimate(placement)
    actions = action_costs(placement)
    return Analysis(
        mesh=str(spec),
        devices=mesh.devices.size,
        rules=placement.rules.name,
        dtype=placement.dtype.name,
        model_params=config.model.num_params,
        tokens_per_step=config.train.batch_size * config.train.seq_len,
        schedule=placement.schedule.describe(),
        ticks=placement.schedule.ticks,
        memory=memory,
        estimate=estimate,
        overhead=compute_overhead(placement, module),
        attention=attention_flops(placement, module),
        bubble_theory=placement.schedule.bubble,
        bubble_lockstep=actions.lockstep_bubble(placement.schedule),
        split=split_flops(placement),
        actions=actions,
        collectives=figures.collectives,
        compile_s=figures.compile_s,
        parameters=rows,
    )


def _mb(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB"


def render(a: Analysis, console: Console) -> None:
    """Prints the analysis as tables: memory, compute, collectives and the parameter layout."""
    console.print(
        f"[bold]train step on mesh {a.mesh}[/bold] ({a.devices} devices, rules '{a.rules}', "
        f"{a.dtype}); {a.model_params:,} parameters, {a.tokens_per_step:,} tokens per step; "
        f"compiled in {a.compile_s:.1f}s"
    )
    m, e = a.memory, a.estimate
    table = Table(title="memory per device")
    for column in ("", "compiled", "estimate", "difference", "note"):
        table.add_column(column, justify="left" if column in ("", "note") else "right")

    def row(name: str, compiled: int | None, estimated: int | None, note: str = "") -> None:
        diff = "" if compiled is None or estimated is None else _mb(compiled - estimated)
        table.add_row(
            name,
            "" if compiled is None else _mb(compiled),
            "" if estimated is None else _mb(estimated),
            diff,
            note,
        )

    def sharded(total: int, per_device: int) -> str:
        return f"total {_mb(total)} / {total / per_device:.2f}"

    row("parameters", m.params_bytes, e.params_bytes, sharded(m.params_total_bytes, m.params_bytes))
    row("optimizer state", m.opt_state_bytes, e.opt_state_bytes,
        sharded(m.opt_state_total_bytes, m.opt_state_bytes))  # fmt: skip
    row("arguments", m.argument_bytes, e.state_bytes, "state + token batch")
    row("  token batch", None, e.batch_bytes, "int32 token ids")
    row("outputs", m.output_bytes, None, f"{_mb(m.alias_bytes)} written in place (donated)")
    row("temporaries", m.temp_bytes, e.temp_bytes, "estimate: the terms below")
    for name, value, note in _temporaries(e):
        row(f"  {name}", None, value, note)
    row("peak", m.peak_bytes, e.total_bytes, "arguments + outputs - aliased + temporaries")
    console.print(table)

    o = a.overhead
    console.print(
        f"[bold]compute[/bold] per device: {o.flops_per_device / 1e9:,.3f} GFLOP (loop trip counts "
        f"applied) vs ideal {o.ideal_flops_per_device / 1e9:,.3f} GFLOP = {o.ratio:.3f} x; "
        f"{a.schedule}\n  bubble: theory {a.bubble_theory:.2%}, lockstep {a.bubble_lockstep:.2%} "
        f"(every tick as long as its slowest stage; one job's F {a.actions.f / 1e6:,.1f}, "
        f"B {a.actions.b / 1e6:,.1f}, W {a.actions.w / 1e6:,.1f} MFLOP), measured "
        f"{o.stack_bubble:.2%} of the layer stack ({o.bubble:.2%} of the whole step)"
    )
    if a.split is not None:
        sp = a.split
        console.print(
            f"  stage split (cost model, embedding and head where the schedule runs them): "
            f"lockstep {sp.even / 1e9:,.3f} GFLOP (the slowest stage, tick by tick) with the "
            f"layers balanced, {sp.cost / 1e9:,.3f} with pipeline.stage_layers="
            f"[{','.join(map(str, sp.sizes))}] ({sp.cost / sp.even - 1:+.1%})"
        )
    at = a.attention
    console.print(
        f"  attention: {at.computed_per_device / 1e9:,.3f} GFLOP computed per device (every "
        f"device the same), of which useful (causal) {at.useful_max / 1e9:,.3f} on the busiest "
        f"device, {at.useful_mean / 1e9:,.3f} on average: imbalance "
        f"{at.useful_max / at.useful_mean:.2f} x"
    )
    table = Table(title="collectives per device per step")
    for column in ("kind", "axis", "count", "bytes"):
        table.add_column(column, justify="right" if column in ("count", "bytes") else "left")
    for c in a.collectives:
        table.add_row(c.kind, c.axis, f"{c.count:,}", f"{c.bytes:,}")
    if not a.collectives:
        table.add_row("(none)", "", "", "")
    console.print(table)

    console.print(param_table(a.parameters, "parameters"))


def _temporaries(e: MemoryEstimate) -> list[tuple[str, int, str]]:
    """The estimate's temporaries, term by term (`jaxpar.analysis.memory` defines each)."""
    return [
        ("guard copy", e.guard_copy_bytes, "old optimizer state kept by the non-finite guard"),
        ("gradients", e.grads_bytes, "weight-gradient accumulators"),
        ("derived weights", e.derived_weights_bytes, "fused q k v and gate up, once per step"),
        ("residuals", e.residuals_bytes, "what the backward pass reads, every job held"),
        ("weight-gradient inputs", e.weight_grad_inputs_bytes, "zb_h1: what each W waits on"),
        ("pipeline buffers", e.pipeline_buffers_bytes, "micro-batch inputs, outputs, cotangents"),
        ("layer working set", e.layer_working_bytes, "one layer's weights and activations"),
        ("attention mask", e.mask_bytes, "built once outside the layer loop"),
        ("logits", e.logits_bytes, "one-hot input, logits and their gradient"),
    ]


def param_table(rows: list[ParamRow], title: str) -> Table:
    """One row per parameter: shape, logical axes, PartitionSpec and bytes per device."""
    table = Table(title=title)
    for column in ("parameter", "shape", "logical axes", "PartitionSpec", "bytes/device"):
        table.add_column(column, justify="right" if column == "bytes/device" else "left")
    for r in rows:
        spec_text = "P(" + ", ".join(repr(x) for x in r.spec) + ")"
        table.add_row(
            r.name, str(r.shape), ", ".join(r.logical_axes), spec_text, f"{r.bytes_per_device:,}"
        )
    return table
