"""The collectives of one train step, per device and mesh axis, from the config alone.

`predict_traffic` gives what `jaxpar.analysis.report.analyze` reads from the compiled step's HLO
(`AxisTraffic` per (kind, axes): arrays moved and bytes moved per device, loop trip counts
applied), without compiling: the planner prices thousands of layouts with it. Every term below was
read off compiled steps (jax 0.10 and 0.12 on CPU agree) and is exact in bytes on the layouts of
tests/test_plan_traffic.py.

Dimension key: R data, P pipeline, C context, X tensor (mesh sizes); B global batch, T sequence
(t = T / C, one device's piece of it, in every activation below), D model dim, K kv heads, H head
dim, L layers, M micro-batches, v repeats, c layer slots per chunk (`StageLayout.chunk_size`). Rows:
b = B / (R M) per micro-batch and replica (what a tick carries), o = B / (R P) per (replica,
stage) outside the pipeline (embedding, head and loss of gpipe and circular). `cb` is the compute
dtype's bytes; parameters, their gradients and every reduced scalar are float32. Ticks are
`Schedule.ticks`; a layer run is one layer slot on one tick: ticks x c of them per pass, bubble
ticks included (an idle tick computes on a clamped job and drops it). For the schedules with a
hand-written backward (1f1b, interleaved_1f1b, zb_h1) every action sits in a `lax.cond` whose
branches HLO counts at every tick, so their per-tick terms are per tick, not per job.

Terms (an axis of size 1 drops out of a group; a group left empty moves nothing):

- data, gradients (no FSDP): the stage's block gradients, v c slots (padding included) split
  over tensor, all-reduced over (`data`, `context`) once where the pipeline's shard_map ends; the
  embedding, final norm and head gradients over (data, pipeline), where the outer batch is split.
- loss: one scalar all-reduce over (data, pipeline).
- context, gradients: the hand-backward schedules sum the loss and the end gradients over every
  manual axis at once, (data, pipeline, context); gpipe and circular (the ends outside the
  program, partitioned by XLA) all-reduce them over `context` separately, three arrays and the
  loss (with FSDP the final norm's and the loss: the embedding's and head's shards are summed
  over (pipeline, context) at once, below). With FSDP (`data` automatic) the block gradients'
  sum is over `context` alone, of the data shards.
- grad norm: each parameter's sum of squares is all-reduced once per mesh axis its shard is split
  over (the stage axis and a tensor or FSDP axis are separate reductions), twice: the step's
  `optax.tree.norm` for the metrics and `clip_by_global_norm` are not merged by XLA. Twelve
  parameters (nine per block: wq, wk, wv, wo, gate, up, down and two norms; embedding, final
  norm, head), so e.g. 18 scalars over `tensor` on a Megatron mesh.
- tensor (Megatron, `megatron_expected_bytes`): per layer run two all-reduces of (b, T, D)
  forward and two backward; the embedding forward and the head backward one (rows, T, D) each,
  and cross-entropy three (rows, T) float32. gpipe and circular run the ends once on o rows;
  the hand-backward schedules run them in every tick's branches, on b rows, so their step is
  ticks x Megatron's step of c layers.
- pipeline, activations: per tick one (b, T, D) collective-permute forward and one backward
  (gpipe's transposed scan, or the hand-backward tick's cotangent ring): 2 ticks of them.
- pipeline, micro-batch inputs: gpipe and circular hand the embeddings to every stage and the
  last stage's outputs back, each one all-to-all of (r, P, o, T, D) (`gather_stages`,
  `from_stage`), once forward and once (transposed) backward: four, each moved as P arrays
  (XLA:CPU splits an all-to-all into one array per peer); r = R with FSDP (the batch is then
  gathered over data too, see below), else 1. The hand-backward schedules all-gather tokens and
  targets, int32 (r, P, o, T), once each.
- FSDP (ZeRO-3 over data): per layer run each of the four matmul weights (fused q/k/v, wo, fused
  gate/up, down; float32, split over tensor only) is all-gathered over data forward and again
  backward, and the layer's gradients (six arrays, norms included) are all-reduced over data,
  full size: this CPU XLA all-reduces and slices where a GPU would reduce-scatter. The
  embedding and head are all-gathered once (gpipe, circular) or per tick (hand-backward), their
  gradients all-reduced over data full size, then their data shards over (pipeline, context);
  the final norm's over (data, pipeline) with the loss (hand-backward: over data per tick in the
  head's branch, then over (pipeline, context) at the end). With stages, gpipe and circular also
  all-gather the operand of each of their four all-to-alls over data ((R, P, o, t, D)); the
  hand-backward ones gather the tokens and targets ((R, o, t) int32).
- remat: `full` recomputes each layer's forward in the backward pass, and with it the tensor
  all-reduce of the attention output (the MLP's output is not needed), one more per layer run;
  with FSDP the recomputation reuses the backward's weight gathers (XLA merges them). The saving
  policies keep the matmul outputs the all-reduces produce: nothing more.

- context, ring (`jaxpar.model.context`), per layer run, with kv = b t K/X H: forward, C - 1 hops
  of k and v (cb); backward, C - 1 hops of k, v (cb), dk and dv (float32), and one last hop of
  dk and dv: 6 (C - 1) + 2 collective-permutes of kv elements. The same with `remat=full` and in
  the hand-backward schedules: the recomputed forward's hops of k and v are the backward's own
  (XLA merges the identical permutes), so nothing is added.
- context, all_gather: k and v move as all-to-alls of C copies (`sharding.gather_copies`), per
  layer run forward, again in the backward pass (the gather is checkpointed) and transposed for
  their gradients: six all-to-alls, each C arrays of kv elements in cb. Seven with `remat=full`
  or `dots_no_batch`, whose recomputed forward needs the attention output: the layer's
  recomputation gathers again, the checkpoint's own too, and XLA merges one of the four. With
  `tensor` > 1 XLA:CPU first gathers k and v over tensor (all kv heads then move): not
  modelled, a defect of the partitioned program to remove, not to price.

Activations move in the compute dtype (`compute_bytes`), as on an accelerator. XLA:CPU promotes
bfloat16 all-reduces to float32, and (jax 0.12, pipeline=2,tensor=4) the pipeline's permutes and
all-to-alls too, so a bfloat16 step compiled on CPU moves 4-byte activations there: compare CPU
compiles in float32, where every term is exact.

Counts are arrays moved (a combined collective of three arrays counts three), which equals what
`analyze` reports on every layout tested: XLA combines collectives differently on some meshes, but
never so as to change an array's shape. Not verified against a compile: tied embeddings and
zb_h1 with FSDP (modelled as 1f1b, W's gradient reduction in place of B's).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections import defaultdict
from collections.abc import Callable, Iterable

from jaxpar.analysis.comm import AxisTraffic, megatron_expected_bytes
from jaxpar.config import Config, ModelConfig
from jaxpar.mesh import AXES, CONTEXT, DATA, PIPELINE, TENSOR, MeshSpec
from jaxpar.model.layout import StageLayout
from jaxpar.model.llama import BLOCK_WEIGHT_AXES
from jaxpar.pipeline.schedule import layout_for
from jaxpar.plan.space import schedule_of
from jaxpar.sharding import NORM, STAGE, rules_for

F32 = 4
S32 = 4


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter of the model: its path, global shape and logical axes."""

    name: str
    shape: tuple[int, ...]
    axes: tuple[str, ...]

    @property
    def in_block(self) -> bool:
        return STAGE in self.axes

    @property
    def is_matmul(self) -> bool:
        return NORM not in self.axes


# Gradient arrays a block reduces: one per weight its matmuls consume (`BlockWeights`: wq, wk and
# wv fused into q/k/v, gate and up into gate/up), and those of the matmuls alone.
BLOCK_ARRAYS = len(BLOCK_WEIGHT_AXES)
MATMUL_ARRAYS = sum(NORM not in axes for axes in BLOCK_WEIGHT_AXES)


def params(m: ModelConfig, layout: StageLayout) -> list[Param]:
    """The model's parameters as `Llama` builds them on `layout` (blocks stored [P, v c, ...]):
    read from its abstract parameters, so they follow the model."""
    # Compute-only fields (remat, attention) do not change the parameters, nor does the split of
    # the layers beyond the slots it stores: one trace per [P, v c] stack, that of P v c layers
    # none padded (the planner prices many splits).
    slots = layout.stages * layout.slots_per_stage
    shaped = dataclasses.replace(m, layers=slots, remat="none", attention="xla")
    return _params(shaped, StageLayout(slots, layout.stages))


@functools.cache
def _params(m: ModelConfig, layout: StageLayout) -> list[Param]:
    from flax import nnx

    from jaxpar.model.llama import Llama
    from jaxpar.placement import logical_axes

    rules = rules_for(MeshSpec(), fsdp=False)  # any rules: shapes do not depend on them
    abstract = nnx.eval_shape(lambda: Llama(m, rules, rngs=nnx.Rngs(params=0), layout=layout))
    state = nnx.state(abstract, nnx.Param)
    return [
        Param(".".join(str(k) for k in path), tuple(v.get_value().shape), logical_axes(v))
        for path, v in nnx.to_flat_state(state)
    ]


def param_bytes(config: Config, spec: MeshSpec) -> int:
    """Float32 parameter bytes one device holds: the blocks' [P, v c, ...] stage layout, every
    dimension divided by the mesh axes the sharding rules put it on."""
    rules = rules_for(spec, config.parallel.fsdp)
    size = dict(zip(AXES, spec.sizes, strict=True))
    layout = layout_for(config, spec.pipeline)
    total = 0
    for q in params(config.model, layout):
        axes = [a for logical in q.axes if (a := rules.mesh_axes(logical)) is not None]
        total += math.prod(q.shape) // math.prod(size[a] for a in axes)
    return total * F32


class _Tally:
    """Sums (count, bytes) per (kind, axes), keeping only the mesh axes of size > 1."""

    def __init__(self, spec: MeshSpec):
        self.size = dict(zip(AXES, spec.sizes, strict=True))
        self.count: dict[tuple[str, tuple[str, ...]], int] = defaultdict(int)
        self.bytes: dict[tuple[str, tuple[str, ...]], int] = defaultdict(int)

    def add(self, kind: str, axes: Iterable[str], count: int, nbytes: int) -> None:
        group = tuple(a for a in AXES if a in set(axes) and self.size[a] > 1)
        if group and count:
            self.count[kind, group] += count
            self.bytes[kind, group] += nbytes

    def result(self) -> list[AxisTraffic]:
        return [
            AxisTraffic(k, a, self.count[k, a], self.bytes[k, a]) for k, a in sorted(self.count)
        ]


def predict_traffic(config: Config, spec: MeshSpec, compute_bytes: int) -> list[AxisTraffic]:
    """Every collective of one train step per device, grouped as `jaxpar.analysis.comm.traffic`
    groups the compiled step's (see the module docstring for each term).

    Args:
        config: a config valid on `spec` (`validate_for_mesh`).
        spec: the resolved mesh.
        compute_bytes: bytes of `train.dtype` resolved (4 for float32, 2 for bfloat16).

    Returns:
        One `AxisTraffic` per (kind, axes) that moves anything, sorted by (kind, axes).
    """
    m, t, pipe = config.model, config.train, config.pipeline
    fsdp = config.parallel.fsdp
    r, p, cx = spec.data, spec.pipeline, spec.context
    layout = layout_for(config, p)
    schedule = schedule_of(config, p)
    hand, ticks = schedule.hand_backward, schedule.ticks
    c, seq, d = layout.chunk_size, t.seq_len // cx, m.dim  # seq: one device's piece
    b = t.batch_size // (r * pipe.microbatches)  # rows of one tick's job
    o = t.batch_size // (r * p)  # rows per (replica, stage) outside the pipeline
    runs = ticks * c  # layer runs per pass
    cb = compute_bytes
    rules = rules_for(spec, fsdp)
    size = dict(zip(AXES, spec.sizes, strict=True))
    tally = _Tally(spec)

    def split_over(param: Param) -> list[str]:
        return [a for logical in param.axes if (a := rules.mesh_axes(logical)) is not None]

    def local(param: Param, keep_data: bool = False) -> int:
        """Elements of the param on one device (with `keep_data`, as gathered over data)."""
        parts = [size[a] for a in split_over(param) if not (keep_data and a == DATA)]
        return math.prod(param.shape) // math.prod(parts)

    every = params(m, layout)
    top = [q for q in every if not q.in_block]
    block = [q for q in every if q.in_block]
    slot = lambda q, keep=True: local(q, keep) // layout.slots_per_stage  # noqa: E731  one layer

    # Grad norm: two scalars per parameter per mesh axis its shard is split over; the loss
    # (FSDP's hand-backward schedules reduce it in `_fsdp`).
    for q in every:
        for axis in split_over(q):
            tally.add("all-reduce", [axis], 2, 2 * F32)
    ends = [DATA, PIPELINE, CONTEXT] if hand else [DATA, PIPELINE]
    if not (fsdp and hand):
        tally.add("all-reduce", ends, 1, F32)

    # Gradients (FSDP's per layer run and its gathers further down).
    blocks = sum(local(q) for q in block)
    if not fsdp:
        tally.add("all-reduce", [DATA, CONTEXT], BLOCK_ARRAYS, blocks * F32)
        tally.add("all-reduce", ends, len(top), sum(local(q) for q in top) * F32)
    else:
        tally.add("all-reduce", [CONTEXT], BLOCK_ARRAYS, blocks * F32)
    if not hand:  # the ends outside the program: their gradients and the loss, over context
        alone = [q for q in top if not (fsdp and q.is_matmul)]  # FSDP's join the pipeline sum
        tally.add("all-reduce", [CONTEXT], len(alone) + 1, (sum(local(q) for q in alone) + 1) * F32)

    # Tensor: Megatron's all-reduces.
    if hand:
        step = megatron_expected_bytes(dataclasses.replace(m, layers=c), b, seq, cb)
        tally.add("all-reduce", [TENSOR], ticks * (4 * c + 5), ticks * step)
    else:
        ends = megatron_expected_bytes(dataclasses.replace(m, layers=0), o, seq, cb)
        layers = 4 * runs * b * seq * d * cb
        tally.add("all-reduce", [TENSOR], 4 * runs + 5, ends + layers)
    if m.remat == "full":  # the recomputed attention output (the MLP's output is not needed)
        tally.add("all-reduce", [TENSOR], runs, runs * b * seq * d * cb)

    # Pipeline: activations and cotangents per tick; the micro-batch inputs and outputs.
    row = seq * d * cb
    tally.add("collective-permute", [PIPELINE], 2 * ticks, 2 * ticks * b * row)
    rows = r if fsdp else 1  # the replicas a stage's shard_map sees
    if p > 1 and hand:
        tally.add("all-gather", [PIPELINE], 2, 2 * rows * p * o * seq * S32)
        if fsdp:
            tally.add("all-gather", [DATA], 2, 2 * rows * o * seq * S32)
    elif p > 1:  # XLA:CPU moves each all-to-all as P arrays, one per peer
        tally.add("all-to-all", [PIPELINE], 4 * p, 4 * rows * p * o * row)
        if fsdp:  # each all-to-all's operand is first gathered over data
            tally.add("all-gather", [DATA], 4, 4 * rows * p * o * row)

    if fsdp:
        _fsdp(tally, top, block, slot, local, runs, ticks, hand)
    if cx > 1:
        kv = b * seq * m.kv_heads // size[TENSOR] * m.head_dim
        _context(tally, m.context_attention, m.remat, runs, kv, cx, cb)
    return tally.result()


def _context(
    tally: _Tally, strategy: str, remat: str, runs: int, kv: int, pieces: int, cb: int
) -> None:
    """Attention's traffic over `context` (see the module docstring): `kv` elements of one
    piece's keys (or values) per layer run."""
    if strategy == "ring":
        hops = pieces - 1
        per_run = 2 * hops * kv * cb + hops * kv * (2 * cb + 2 * F32) + 2 * kv * F32
        tally.add("collective-permute", [CONTEXT], runs * (6 * hops + 2), runs * per_run)
    else:  # XLA:CPU moves each all-to-all as C arrays, one per peer
        moves = 7 if remat in ("full", "dots_no_batch") else 6
        tally.add("all-to-all", [CONTEXT], moves * pieces * runs, moves * pieces * runs * kv * cb)


def _fsdp(
    tally: _Tally,
    top: list[Param],
    block: list[Param],
    slot: Callable[[Param], int],
    local: Callable[..., int],
    runs: int,
    ticks: int,
    hand: bool,
) -> None:
    """FSDP's weight gathers and gradient reductions over data (see the module docstring)."""
    matmuls = [q for q in block if q.is_matmul]
    gathered = sum(slot(q) for q in matmuls) * F32  # one layer's, before the compute-dtype cast
    tally.add("all-gather", [DATA], 2 * runs * MATMUL_ARRAYS, 2 * runs * gathered)
    layer_grads = sum(slot(q) for q in block) * F32
    tally.add("all-reduce", [DATA], runs * BLOCK_ARRAYS, runs * layer_grads)
    ends = [q for q in top if q.is_matmul]
    norms = [q for q in top if not q.is_matmul]
    times = ticks if hand else 1  # the ends run in every tick's branches
    full = sum(local(q, True) for q in ends) * F32
    tally.add("all-gather", [DATA], times * len(ends), times * full)
    tally.add("all-reduce", [DATA], times * len(ends), times * full)
    final = [PIPELINE, CONTEXT]
    tally.add("all-reduce", final, len(ends), sum(local(q) for q in ends) * F32)
    norm = sum(local(q) for q in norms) * F32
    if hand:
        tally.add("all-reduce", [DATA], ticks * (len(norms) + 1), ticks * (norm + F32))
        tally.add("all-reduce", final, len(norms) + 1, norm + F32)
    else:
        tally.add("all-reduce", [DATA, PIPELINE], len(norms), norm)
