"""The planner's cost model: memory per device and step time of a candidate layout, term by term.

Nothing here compiles or touches a device; a candidate costs well under a millisecond:

    memory   = `jaxpar.analysis.memory.estimate_memory` (parameters, optimizer state, gradients,
               activations by schedule and remat; checked against XLA's peak by the tests), with
               the parameters per device counted from the sharding rules; every stage stores
               v c layer slots, c the largest chunk of the split.
    compute  = the slowest stage's matmul FLOPs summed over the schedule's ticks (every tick lasts
               as long as its slowest stage: `Schedule.lockstep_cost`, so bubbles are paid),
               each job priced by the real layers of its chunk (a padded slot computes
               nothing; `pipeline.stage_layers`, and each stage at its `parallel.stage_speeds`)
               with the recomputed forward matmuls of `model.remat` and of attention's own
               backward; the embedding, LM head and loss where the schedule runs them: in the
               ticks of the first and last chunk's stage for the schedules with their own
               backward (with a 128K vocabulary Llama-3's head costs about two layers), else
               outside the pipeline on this device's share of the batch; all over the profile's
               sustained FLOP/s for the compute dtype, but for attention's matmuls in cuDNN's
               fused kernel (where `jaxpar.model.attention.implementation` runs it for the
               profile's platform and dtype): the causal half of the keys and the kernel's own
               recomputation, over the profile's `attention_tflops`. A remat policy that
               recomputes the layer's elementwise work (norms, RoPE, SwiGLU's activation) but
               not its matmuls (`dots*`) adds those bytes, read and written, over the memory
               bandwidth; the sustained rate of a step covers the elementwise work that goes
               with its matmuls.
               With `context` a device holds T / C positions of each row, and its attention
               computes the blocks `jaxpar.analysis.flops.attention_work` counts: balanced,
               (2C + 1) blocks of (T / 2C)^2, 1/C of one device's blocked causal attention.
    overhead = the profile's `layer_overhead_us` per layer pass (one layer's F, B or W on one
               micro-batch) on the slowest stage, tick by tick as the compute is counted.
    comm     = for every (kind, axes) of `jaxpar.plan.traffic.predict_traffic` (the collectives
               the compiled step runs, per device): latency x count + bus bytes / bandwidth, on the
               node link when the axes' device group fits in one node, else on the network link.
               Bus bytes are NCCL's: 2 (g - 1) / g of the array for an all-reduce over g devices,
               (g - 1) / g for an all-gather or reduce-scatter, the array for a send.
    hidden   = the profile's `overlap` share of the data-axis traffic (gradient reduction and
               FSDP gathers run asynchronously beside the backward pass), at most the backward
               compute; and the ring attention's sends over `context`, at most the attention
               compute of the hops they run beside (`step_time`). Tensor and pipeline traffic and
               all_gather's gathers over `context` wait on the critical path.
    step     = compute + overhead + comm - hidden.

The MFU is the model's FLOPs (causal attention counted half, as `jaxpar bench` counts them) over
the step time and the devices' peak.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from jaxpar.analysis.comm import AxisTraffic
from jaxpar.analysis.flops import attention_work, model_flops
from jaxpar.analysis.memory import MemoryEstimate, estimate_memory
from jaxpar.config import Config
from jaxpar.mesh import AXES, CONTEXT, DATA, MeshSpec
from jaxpar.model.attention import implementation
from jaxpar.model.flops import RECOMPUTED, layer_forward, top_costs
from jaxpar.pipeline.schedule import layout_for
from jaxpar.plan.hardware import Hardware, Link
from jaxpar.plan.space import Candidate
from jaxpar.plan.traffic import param_bytes, predict_traffic
from jaxpar.schedule_rules import schedule_rule


@dataclass(frozen=True)
class CommTerm:
    """One (kind, axes) of the step's collectives and what it costs."""

    kind: str
    axis: str
    count: int
    bytes: int
    link: str
    seconds: float


@dataclass
class Estimate:
    """A candidate's predicted memory and speed, with every term; `compiled` once the compile
    check has replaced the memory and traffic with the compiled program's."""

    candidate: Candidate
    memory: dict[str, int]
    memory_bytes: int
    compute_s: float
    overhead_s: float
    recompute_s: float
    attention_s: float
    bubble: float
    comm: list[CommTerm]
    hidden_s: float
    step_s: float
    tokens_per_s: float
    mfu: float
    fits: bool
    compiled: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def comm_s(self) -> float:
        return sum(c.seconds for c in self.comm)

    def to_json(self) -> dict[str, Any]:
        c = self.candidate
        return {
            "mesh": c.mesh,
            "overrides": c.overrides[1:],
            "fsdp": c.fsdp,
            "schedule": c.schedule,
            "microbatches": c.microbatches,
            "repeats": c.repeats,
            "remat": c.remat,
            "stage_layers": c.split,
            "memory_bytes": self.memory_bytes,
            "fits": self.fits,
            "step_s": self.step_s,
            "tokens_per_s": self.tokens_per_s,
            "mfu": self.mfu,
            "compiled": self.compiled,
            "terms": {
                "compute_s": self.compute_s,
                "overhead_s": self.overhead_s,
                "recompute_s": self.recompute_s,
                "attention_s": self.attention_s,
                "bubble": self.bubble,
                "comm_s": self.comm_s,
                "hidden_s": self.hidden_s,
                "comm": [vars(t) for t in self.comm],
                "memory": self.memory,
            },
            "notes": self.notes,
        }


def _span(spec: MeshSpec, axes: tuple[str, ...]) -> tuple[int, int]:
    """(group size, extent): the devices a collective over `axes` joins, and the span of device
    ids one group covers (axes are laid out data-major, tensor fastest)."""
    sizes = dict(zip(AXES, spec.sizes, strict=True))
    group = math.prod(sizes[a] for a in axes)
    outer = min((AXES.index(a) for a in axes), default=len(AXES))
    extent = math.prod(spec.sizes[outer:]) if axes else 1
    return group, extent


_BUS = {
    "all-reduce": lambda g: 2 * (g - 1) / g,
    "all-gather": lambda g: (g - 1) / g,
    "reduce-scatter": lambda g: (g - 1) / g,
    "all-to-all": lambda g: (g - 1) / g,
    "collective-permute": lambda g: 1.0,
}


def comm_terms(traffic: list[AxisTraffic], spec: MeshSpec, hw: Hardware) -> list[CommTerm]:
    terms = []
    for t in traffic:
        group, extent = _span(spec, t.axes)
        if group <= 1:
            continue
        inside = extent <= hw.devices_per_node
        link: Link = hw.node_link if inside else hw.network_link
        seconds = link.seconds(_BUS[t.kind](group) * t.bytes, t.count)
        terms.append(CommTerm(t.kind, t.axis, t.count, t.bytes, "node" if inside else "network",
                              seconds))  # fmt: skip
    return terms


@dataclass(frozen=True)
class StackFlops:
    """The layer stack's FLOPs on the slowest stage, summed over the schedule's ticks.

    Attributes:
        total: every matmul, bubbles and recomputation included.
        recomputed: of which run again in the backward pass (remat, attention's own).
        attention: of which attention's (scores and values, forward and backward).
        bubble: the lockstep bubble.
        passes: the slowest stage's layer passes over the ticks.
        elementwise_bytes: the bytes of elementwise work its backward passes redo without
            their matmuls (`elementwise_redone`), tick by tick.
    """

    total: float
    recomputed: float
    attention: float
    bubble: float
    passes: float
    elementwise_bytes: float


def attention_impl(config: Config, hw: Hardware) -> str:
    """The attention `model.attention` runs on the profile's devices in its compute dtype."""
    dtype = compute_dtype_for(config.train.dtype, hw)
    return implementation(config.model.attention, hw.platform, dtype)


def elementwise_redone(config: Config, tensor: int, compute_bytes: int) -> float:
    """Bytes per token of one layer that `model.remat` recomputes without their matmuls: under
    the `dots*` policies the two RMSNorms (input and output, D each), RoPE on q and k, and
    SwiGLU's activation (gate and up in, its output out), read and written once."""
    m = config.model
    if m.remat == "none" or "qkv" in RECOMPUTED[m.remat]:
        return 0.0
    rope = 2 * (m.heads + m.kv_heads) * m.head_dim / tensor
    return (4 * m.dim + rope + 3 * m.mlp_dim / tensor) * compute_bytes


def stack_flops(
    config: Config, candidate: Candidate, impl: str = "xla", compute_bytes: int = 4
) -> StackFlops:
    """One layer's F, B and W from the model's shapes on one device (B and W each as F; remat and
    attention's backward add their recomputed matmuls to B), charged tick by tick as
    `Schedule.lockstep_cost` does: each job by its chunk's real layers, the embedding and head
    on the stages that run them (`top_costs`). With `context` a job is T / C positions of its
    rows, and attention computes `attention_work`'s keys per query (for the attention
    implementation `impl`); `compute_bytes` sizes the redone elementwise work."""
    m, t = config.model, config.train
    applied = candidate.apply(config)
    schedule = candidate.schedule_in(config)
    layout = layout_for(applied, candidate.pipeline)
    layers, speeds = layout.chunk_sizes, applied.parallel.speeds
    rows = t.batch_size / (candidate.data * candidate.microbatches)
    keys, redone = attention_work(applied, candidate.spec, impl)
    forward = {**layer_forward(m, t.seq_len), "scores": 2 * keys * m.heads * m.head_dim,
               "values": 2 * keys * m.heads * m.head_dim}  # fmt: skip
    per_job = rows * t.seq_len / candidate.context / candidate.tensor  # one layer's tokens
    f = per_job * sum(forward.values())
    redo = per_job * sum(forward[name] for name in redone)
    if schedule.split:
        b, w = f + redo, f
    else:
        b, w = 2 * f + redo, 0.0
    ends = tuple(per_job * x for x in top_costs(m))
    passes = (schedule.lockstep_cost(1, 1, 1, layers) if schedule.split else
              schedule.lockstep_cost(1, 1, 0, layers))  # fmt: skip
    # attention's share of each action, by the same ticks
    a_f = per_job * (forward["scores"] + forward["values"])
    a_redo = per_job * sum(forward[name] for name in redone if name in ("scores", "values"))
    a_b, a_w = (a_f + a_redo, 0.0) if schedule.split else (2 * a_f + a_redo, 0.0)
    redo_bytes = per_job * elementwise_redone(applied, candidate.tensor, compute_bytes)
    return StackFlops(
        total=schedule.lockstep_cost(f, b, w, layers, speeds, ends),
        recomputed=schedule.microbatches * max(layout.stage_sizes) * redo,
        attention=schedule.lockstep_cost(a_f, a_b, a_w, layers, speeds),
        bubble=schedule.lockstep_bubble(f, b, w, layers, speeds, ends),
        passes=passes,
        elementwise_bytes=schedule.lockstep_cost(0.0, redo_bytes, 0.0, layers, speeds),
    )


@dataclass(frozen=True)
class ComputeSeconds:
    """The time of the layer stack's and the outer matmuls (`total`), of which attention's and
    the recomputation's."""

    total: float
    attention: float
    recomputed: float


def compute_seconds(stack: StackFlops, outer: float, hw: Hardware, dtype: str,
                    impl: str) -> ComputeSeconds:  # fmt: skip
    """`stack` and `outer` FLOPs at the profile's rates: attention's at the fused kernel's where
    `impl` is cuDNN's, the rest at the sustained rate; the redone elementwise bytes over the
    memory bandwidth (where the profile gives one)."""
    rate = hw.sustained_flops(dtype)
    attention_s = stack.attention / (hw.attention_flops(dtype) if impl == "cudnn" else rate)
    bandwidth = hw.memory_gbytes_per_s * 1e9
    elementwise_s = stack.elementwise_bytes / bandwidth if bandwidth else 0.0
    matmuls_s = (stack.total - stack.attention + outer) / rate
    return ComputeSeconds(
        total=matmuls_s + attention_s + elementwise_s,
        attention=attention_s,
        recomputed=stack.recomputed / rate + elementwise_s,
    )


def stack_seconds(config: Config, candidate: Candidate, hw: Hardware) -> float:
    """The layer stack's compute and per-layer overhead on the slowest stage, tick by tick (as
    `estimate` counts them): the terms a split of the layers over the stages changes."""
    impl = attention_impl(config, hw)
    dtype = compute_dtype_for(config.train.dtype, hw)
    stack = stack_flops(config, candidate, impl, 4 if dtype == "float32" else 2)
    seconds = compute_seconds(stack, 0.0, hw, dtype, impl)
    return seconds.total + stack.passes * hw.layer_overhead_us * 1e-6


def outer_flops(config: Config, spec: MeshSpec) -> float:
    """Matmul FLOPs per device outside the layer stack's ticks: for gpipe and circular the one-hot
    embedding (forward and weight gradient) and the LM head (forward and
    backward) on this device's rows, vocabulary split over `tensor`; none for the schedules
    with their own backward, whose ticks run them (`stack_flops`)."""
    m, t = config.model, config.train
    if schedule_rule(config.pipeline.schedule).hand_backward:
        return 0.0
    tokens = t.batch_size * t.seq_len / spec.size
    return tokens * sum(top_costs(m))


def step_time(
    compute_s: float,
    overhead_s: float,
    comm: list[CommTerm],
    hw: Hardware,
    attention_s: float,
    pieces: int,
) -> tuple[float, float]:
    """(hidden, step) seconds: the profile's `overlap` share of the data-axis traffic, at most the
    backward pass's two thirds of the compute, is hidden; so is the ring's traffic over
    `context` (its collective-permutes), at most the attention compute it runs beside: each hop
    sends the next keys while it attends to these, so all hops but the last (C - 1 of C) hide
    their sends, and the backward's final hop of dk and dv (2 of its 6 (C - 1) + 2 permutes)
    hides nothing. all_gather's gathers wait on the critical path. The rest adds up."""
    data_s = sum(c.seconds for c in comm if c.axis == DATA)
    hidden_s = min(hw.overlap * data_s, compute_s * 2 / 3)
    ring_s = sum(c.seconds for c in comm if c.axis == CONTEXT and c.kind == "collective-permute")
    if ring_s:
        hops = pieces - 1
        hidden_s += min(ring_s * 6 * hops / (6 * hops + 2), attention_s * hops / pieces)
    return hidden_s, compute_s + overhead_s + sum(c.seconds for c in comm) - hidden_s


def compute_dtype_for(name: str, hw: Hardware) -> str:
    """`train.dtype` on the profile's devices: `auto` is float32 on CPU, bfloat16 elsewhere (as
    `jaxpar.placement.compute_dtype` resolves it on the devices themselves)."""
    if name == "auto":
        return "float32" if hw.platform == "cpu" else "bfloat16"
    return "bfloat16" if name == "float16" else name


def estimate(config: Config, candidate: Candidate, hw: Hardware) -> Estimate:
    """The cost model for one candidate (see the module docstring)."""
    m, t = config.model, config.train
    layout = candidate.apply(config)
    spec, schedule = candidate.spec, candidate.schedule_in(config)
    dtype = compute_dtype_for(t.dtype, hw)
    impl = attention_impl(config, hw)
    compute_bytes = 4 if dtype == "float32" else 2
    memory: MemoryEstimate = estimate_memory(
        layout, spec, schedule, param_bytes(layout, spec), compute_bytes, impl
    )
    stack = stack_flops(config, candidate, impl, compute_bytes)
    seconds = compute_seconds(stack, outer_flops(layout, spec), hw, dtype, impl)
    comm = comm_terms(predict_traffic(layout, spec, compute_bytes), spec, hw)
    overhead_s = stack.passes * hw.layer_overhead_us * 1e-6
    hidden_s, step_s = step_time(seconds.total, overhead_s, comm, hw, seconds.attention,
                                 spec.context)  # fmt: skip
    tokens = t.batch_size * t.seq_len
    useful = model_flops(m, t.batch_size, t.seq_len, causal=True)
    devices = spec.size
    return Estimate(
        candidate=candidate,
        memory=memory.to_json(),
        memory_bytes=memory.total_bytes,
        compute_s=seconds.total,
        overhead_s=overhead_s,
        recompute_s=seconds.recomputed,
        attention_s=seconds.attention,
        bubble=stack.bubble,
        comm=comm,
        hidden_s=hidden_s,
        step_s=step_s,
        tokens_per_s=tokens / step_s,
        mfu=useful / (step_s * devices * hw.peak_flops(dtype)),
        fits=memory.total_bytes <= hw.memory_bytes,
    )
