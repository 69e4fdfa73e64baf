"""Model FLOPs, and the measured compute overhead of a compiled step (bubbles, padding, remat).

`model_flops` counts the matmuls one train step of this model needs, no more: the forward pass,
twice that backward, except the embedding's one-hot contraction, whose input (token ids) needs no
gradient. `dot_flops` of a one-device compiled step equals it exactly (tested), so the ratio of a
layout's per-device dot FLOPs to `model_flops / devices` is pure overhead: pipeline bubbles, padded
layer slots and recomputation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jaxpar.analysis.hlo import HloModule, dot_flops
from jaxpar.config import Config, ModelConfig
from jaxpar.mesh import MeshSpec
from jaxpar.model.flops import RECOMPUTED, layer_forward, recomputed

if TYPE_CHECKING:
    from jaxpar.pipeline.schedule import Schedule
    from jaxpar.placement import Placement


def layer_stack_flops(cfg: ModelConfig, batch: int, seq: int, causal: bool = False) -> int:
    """Matmul FLOPs of the decoder blocks in one train step: forward, and twice that backward."""
    per_layer = sum(layer_forward(cfg, seq, causal).values())
    return int(3 * batch * seq * cfg.layers * per_layer)


def model_flops(cfg: ModelConfig, batch: int, seq: int, causal: bool = False) -> int:
    """Matmul FLOPs of one train step (forward + backward) over a (batch, seq) token batch.

    Beyond the blocks: the LM head (2 V D per token forward, twice that backward) and the one-hot
    embedding (forward and weight gradient only: token ids have no gradient). `causal`: count
    attention's causal half only (see `jaxpar.model.flops.layer_forward`); without it the count
    is exactly what a one-device step of the XLA path runs.
    """
    v, d = cfg.vocab, cfg.dim
    outer = batch * seq * (3 * 2 * d * v + 2 * 2 * v * d)
    return layer_stack_flops(cfg, batch, seq, causal) + outer


def recompute_flops(
    cfg: ModelConfig, batch: int, seq: int, remat: str, impl: str = "xla"
) -> int:
    """Matmul FLOPs a train step runs again in its backward pass under `remat` with the
    attention implementation `impl` (flash attention's and cuDNN's kernel's included,
    `jaxpar.model.flops.recomputed`): what hardware FLOPs (HFU) add to the model's."""
    forward = layer_forward(cfg, seq, causal=impl == "cudnn")
    per_layer = sum(forward[name] for name in recomputed(cfg, seq, remat, impl))
    return int(batch * seq * cfg.layers * per_layer)


# Attention's einsums batch over rows and kv heads (`jaxpar.model.attention`); the weights'
# matmuls over at most one dimension (the zero-bubble W's layer slots).
ATTENTION_BATCH_DIMS = 2


def attention_work(
    config: Config, spec: MeshSpec, impl: str = "xla"
) -> tuple[float, tuple[str, ...]]:
    """(the keys each query on one device computes scores for, on average; the forward matmuls
    its backward pass computes again, `model.remat`'s and attention's own), with the attention
    implementation `impl` (`jaxpar.model.attention.implementation`).

    One device holds T / C positions of each row. cuDNN's causal kernel computes the visible
    half (T / 2). The XLA path computes every key (T), in query blocks for flash attention (a
    block of a causal call computes its masked keys, the blocks running in one loop;
    `jaxpar.model.flops.recomputed`). The ring computes 3 + 2 (C - 1) blocks of c x c,
    c = T / 2C, per device (3 + 4 (C - 1) unbalanced), and recomputes the scores; all_gather
    computes every key and recomputes both matmuls (the gather is checkpointed).
    """
    m, seq, c = config.model, config.train.seq_len, spec.context
    if c == 1:
        keys = seq / 2 if impl == "cudnn" else float(seq)
        return keys, tuple(recomputed(m, seq, impl=impl))
    if m.context_attention == "all_gather":
        return float(seq), (*RECOMPUTED[m.remat], "scores", "values")
    half = seq // (2 * c)
    blocks = 3 + (2 if m.context_load_balance else 4) * (c - 1)
    return blocks * half / 2, (*RECOMPUTED[m.remat], "scores")


def useful_attention_pairs(config: Config, spec: MeshSpec) -> list[int]:
    """Per piece of the sequence over `context`: the (query, key) pairs of one row that causal
    attention needs (key position at or before the query's), whatever is computed."""
    from jaxpar.model.context import sequence_order

    c, seq = spec.context, config.train.seq_len
    order = sequence_order(seq, c, config.model.context_load_balance).reshape(c, -1)
    return [int((piece + 1).sum()) for piece in order]


@dataclass(frozen=True)
class AttentionFlops:
    """Attention's matmul FLOPs per device in one train step.

    Attributes:
        computed_per_device: what the compiled step runs (every device the same program: in
            lockstep each computes what the busiest needs), masked blocks and the backward's
            recomputation included.
        useful: per device along `context`: the FLOPs of the (query, key) pairs causal attention
            needs, forward and backward (twice the forward), the layers split evenly over the
            stages. Their max over the mean is the imbalance; load balancing makes it 1.
    """

    computed_per_device: int
    useful: tuple[float, ...]

    @property
    def useful_max(self) -> float:
        return max(self.useful)

    @property
    def useful_mean(self) -> float:
        return sum(self.useful) / len(self.useful)


def attention_flops(placement: Placement, hlo: str | HloModule) -> AttentionFlops:
    """A compiled train step's attention FLOPs per device (its dots batched over rows and
    heads), and the useful share of each device along `context`."""
    m, t, spec = placement.config.model, placement.config.train, placement.spec
    per_pair = 3 * 2 * 2 * m.head_dim * m.heads * m.layers * t.batch_size
    share = spec.data * spec.pipeline * spec.tensor
    useful = [per_pair * pairs / share for pairs in useful_attention_pairs(placement.config, spec)]
    return AttentionFlops(dot_flops(hlo, ATTENTION_BATCH_DIMS), tuple(useful))


@dataclass(frozen=True)
class ComputeOverhead:
    """Per-device FLOPs of a compiled step against the ideal share of the model's FLOPs.

    Attributes:
        flops_per_device: matmul FLOPs one device runs per step, loop trip counts applied.
        ideal_flops_per_device: the model's FLOPs over the number of devices.
        ideal_stack_flops_per_device: the same for the layer stack alone, the part a pipeline
            schedule runs (embedding and LM head run outside it, with no bubble).
        recomputed_flops_per_device: what the stack's backward runs again over the number of
            devices (`recompute_flops`: `model.remat` and flash attention).
    """

    flops_per_device: int
    ideal_flops_per_device: float
    ideal_stack_flops_per_device: float
    recomputed_flops_per_device: float

    @property
    def ratio(self) -> float:
        return self.flops_per_device / self.ideal_flops_per_device

    @property
    def bubble(self) -> float:
        """Share of the step's computed FLOPs that are not the model's: 1 - ideal / measured."""
        return 1 - self.ideal_flops_per_device / self.flops_per_device

    @property
    def stack_bubble(self) -> float:
        """The share of the layer stack's computed FLOPs that no job needed: the stack's ideal
        share and its recomputation (`model.remat`, flash attention's backward) against what
        it computed. It equals the schedule's bubble unless padded layer slots add work."""
        outer = self.ideal_flops_per_device - self.ideal_stack_flops_per_device
        needed = self.ideal_stack_flops_per_device + self.recomputed_flops_per_device
        return 1 - needed / (self.flops_per_device - outer)


def compute_overhead(placement: Placement, hlo: str | HloModule) -> ComputeOverhead:
    """A compiled train step's per-device matmul FLOPs (trip counts applied) against the ideal
    for `placement`'s model, batch and device count; `hlo` is the step's optimized HLO."""
    m, t = placement.config.model, placement.config.train
    n = placement.mesh.devices.size
    return ComputeOverhead(
        flops_per_device=dot_flops(hlo),
        ideal_flops_per_device=model_flops(m, t.batch_size, t.seq_len) / n,
        ideal_stack_flops_per_device=layer_stack_flops(m, t.batch_size, t.seq_len) / n,
        recomputed_flops_per_device=recompute_flops(m, t.batch_size, t.seq_len, m.remat) / n,
    )


@dataclass(frozen=True)
class ActionCosts:
    """Matmul FLOPs of one job's actions on one stage (one chunk of layers, one micro-batch),
    read from compiled programs with trip counts applied: F the forward, B the input gradient,
    W the weight gradient from B's tap cotangents (`jaxpar.model.taps`), and the unsplit
    backward. With remat, B includes the recomputed forward."""

    f: int
    b: int
    w: int
    full_backward: int

    def lockstep_bubble(self, schedule: Schedule) -> float:
        """The schedule's bubble when every tick lasts as long as its slowest stage."""
        if schedule.split:
            return schedule.lockstep_bubble(self.f, self.b, self.w)
        return schedule.lockstep_bubble(self.f, self.full_backward, 0)

    def lockstep_cost(self, schedule: Schedule) -> float:
        """FLOPs of the slowest stage summed over ticks: comparable across schedules."""
        if schedule.split:
            return schedule.lockstep_cost(self.f, self.b, self.w)
        return schedule.lockstep_cost(self.f, self.full_backward, 0)


def action_costs(placement: Placement) -> ActionCosts:
    """Compiles one job's F, B and W for one device (a chunk of the placement's layers on a
    micro-batch of its shapes) and counts their dot FLOPs."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxpar.model.taps import einsum
    from jaxpar.pipeline.executor import layer_taps, stage_chunk, weight_grads

    config, layout, schedule = placement.config, placement.layout, placement.schedule
    t, c = config.train, layout.chunk_size
    rows = t.batch_size // (placement.spec.data * schedule.microbatches)
    h = jax.ShapeDtypeStruct((rows, t.seq_len, config.model.dim), placement.dtype)
    params = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), placement.abstract_params
    )

    def run(kind: str, params: nnx.State, h_bTD: jax.Array) -> Any:
        model = nnx.merge(placement.graphdef, params)
        # the first chunk of stage 0: one job's layers, as one repeat
        weights = jax.tree.map(lambda a: a[0, :c], model.blocks.weights(jnp.float32))
        real = jnp.asarray(layout.valid)[0, 0]

        def layer(w, x, project=einsum):
            return model.blocks.apply(w, x, project=project)[0]

        chunk = stage_chunk(layer, 1, c, config.model.remat)
        if kind == "full":
            y, pull = jax.vjp(lambda x, w: chunk(w, jnp.int32(0), real, x), h_bTD, weights)
            return pull(jnp.ones_like(y))
        eqs, taps = layer_taps(layer, weights, h_bTD, c)
        y, pull = jax.vjp(lambda x, taps: chunk(weights, jnp.int32(0), real, x, taps), h_bTD, taps)
        if kind == "f":
            return y
        dx, held = pull(jnp.ones_like(y))
        return (dx, held) if kind == "b" else (dx, weight_grads(weights, eqs, held))

    def flops(kind: str) -> int:
        lowered = jax.jit(run, static_argnums=0).lower(kind, params, h)
        return dot_flops(lowered.compile().as_text())

    f, b, bw = flops("f"), flops("b"), flops("w")
    return ActionCosts(f, b - f, bw - b, flops("full") - f)
