"""Logical axis names, the rules that map them to mesh axes, and spec resolution.

Model code names the logical axes of every parameter and key activation (constants below) and
never a mesh axis. A frozen `Rules` object, one preset per strategy, decides where each logical axis
lands. Parameters and activations use different names for the model dimension (`embed` vs
`act_embed`, ...) because FSDP shards a weight's `embed` over `data` while the activations keep
`batch` there. Likewise two batch names: `batch` inside the layer stack, where `pipeline` is a
manual axis of the pipeline's shard_map, and `outer_batch` for the embedding, LM head and loss,
which run outside the pipeline with the batch split over `data` and `pipeline` together (no stage
repeats that work). On a mesh with a `context` axis the activations' `sequence` is split over it:
everything but attention is per token, and attention itself (`jaxpar.model.context`) moves keys
and values between the sequence's pieces.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from jaxpar.errors import JaxparError
from jaxpar.mesh import AXES, CONTEXT, DATA, PIPELINE, TENSOR, MeshSpec

if TYPE_CHECKING:
    import jax

# Parameter axes.
STAGE = "stage"
LAYERS = "layers"
EMBED = "embed"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
MLP = "mlp"
VOCAB = "vocab"
NORM = "norm"
# Activation axes.
BATCH = "batch"
OUTER_BATCH = "outer_batch"
SEQ = "sequence"  # the sequence dimension of activations: split over `context`
ACT_EMBED = "act_embed"
ACT_HEADS = "act_heads"
ACT_KV_HEADS = "act_kv_heads"
ACT_MLP = "act_mlp"
ACT_VOCAB = "act_vocab"

LOGICAL_AXES = (
    STAGE, LAYERS, EMBED, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB, NORM,
    BATCH, OUTER_BATCH, SEQ, ACT_EMBED, ACT_HEADS, ACT_KV_HEADS, ACT_MLP, ACT_VOCAB,
)  # fmt: skip

MeshAxes = str | tuple[str, ...] | None


@dataclass(frozen=True)
class Rules:
    """Maps logical axis names to mesh axes (None: replicated). Hashable, so usable as jit static.

    Attributes:
        name: the preset's name, for printing.
        mapping: (logical, mesh axes) pairs; every logical name in `LOGICAL_AXES` appears once.
    """

    name: str
    mapping: tuple[tuple[str, MeshAxes], ...]

    def __post_init__(self) -> None:
        seen = [logical for logical, _ in self.mapping]
        for logical in seen:
            if logical not in LOGICAL_AXES:
                raise JaxparError(
                    f"rules {self.name!r}: unknown logical axis {logical!r} "
                    f"(valid: {', '.join(LOGICAL_AXES)})"
                )
            if seen.count(logical) > 1:
                raise JaxparError(f"rules {self.name!r}: logical axis {logical!r} is mapped twice")
        for logical, target in self.mapping:
            for axis in _as_tuple(target):
                if axis not in AXES:
                    raise JaxparError(
                        f"rules {self.name!r}: {logical!r} maps to unknown mesh axis {axis!r} "
                        f"(valid: {', '.join(AXES)})"
                    )

    def mesh_axes(self, logical: str | None) -> MeshAxes:
        if logical is None:
            return None
        for name, target in self.mapping:
            if name == logical:
                return target
        if logical in LOGICAL_AXES:
            return None
        raise JaxparError(f"unknown logical axis {logical!r} (valid: {', '.join(LOGICAL_AXES)})")

    def spec(self, logical_axes: Sequence[str | None]) -> jax.sharding.PartitionSpec:
        """The PartitionSpec for an array whose dimensions carry `logical_axes`.

        Raises:
            JaxparError: an unknown logical name, or two dimensions landing on one mesh axis.
        """
        from jax.sharding import PartitionSpec

        targets = [self.mesh_axes(a) for a in logical_axes]
        used: dict[str, str | None] = {}
        for logical, target in zip(logical_axes, targets, strict=True):
            for axis in _as_tuple(target):
                if axis in used:
                    raise JaxparError(
                        f"rules {self.name!r}: logical axes {used[axis]!r} and {logical!r} of "
                        f"{tuple(logical_axes)} both map to mesh axis {axis!r}"
                    )
                used[axis] = logical
        return PartitionSpec(*targets)

    def constrain(self, x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
        """Pins an activation's sharding (inside jit, under `jax.set_mesh`).

        Inside a shard_map, the axes it made manual are already split by hand, so the constraint
        speaks only of the remaining automatic axes.
        """
        import jax
        from jax.sharding import PartitionSpec

        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return x
        spec = self.spec(logical_axes)
        manual = set(mesh.manual_axes)
        if manual:
            kept = [tuple(a for a in _as_tuple(t) if a not in manual) for t in spec]
            spec = PartitionSpec(*(k[0] if len(k) == 1 else (k or None) for k in kept))
        return jax.lax.with_sharding_constraint(x, spec)

    def per_shard(
        self, f: Callable[[jax.Array], jax.Array], x: jax.Array, logical_axes: Sequence[str | None]
    ) -> jax.Array:
        """`f` applied to each device's shard of `x`, laid out by `logical_axes` (inside jit,
        under `jax.set_mesh`; without a mesh, to `x` whole). `f` must keep the shape and compute
        each element from that element alone, so the result is the same as `f(x)`."""
        import jax

        if jax.sharding.get_abstract_mesh().empty:
            return f(x)
        spec = self.spec(logical_axes)
        return jax.shard_map(f, in_specs=spec, out_specs=spec)(x)


def _as_tuple(target: MeshAxes) -> tuple[str, ...]:
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def _rules(name: str, **mapping: MeshAxes) -> Rules:
    return Rules(name, tuple(mapping.items()))


# Parameters are never split over `context`: only activations' `sequence` is, so a checkpoint
# does not depend on it, and the weights' gradients are summed over it as over `data`.
_DATA = {STAGE: PIPELINE, BATCH: DATA, OUTER_BATCH: (DATA, PIPELINE), SEQ: CONTEXT}
_MEGATRON = {
    HEADS: TENSOR, KV_HEADS: TENSOR, MLP: TENSOR, VOCAB: TENSOR,
    ACT_HEADS: TENSOR, ACT_KV_HEADS: TENSOR, ACT_MLP: TENSOR, ACT_VOCAB: TENSOR,
}  # fmt: skip

REPLICATED = _rules("replicated")
DATA_PARALLEL = _rules("data-parallel", **_DATA)
MEGATRON = _rules("megatron", **_DATA, **_MEGATRON)
# ZeRO-3: every weight's model dimension is also split over `data`; XLA gathers each layer's
# weights just before use and reduce-scatters their gradients. Norm scales stay replicated.
FSDP = _rules("fsdp", **_DATA, **_MEGATRON, **{EMBED: DATA})

PRESETS: Mapping[str, Rules] = {r.name: r for r in (REPLICATED, DATA_PARALLEL, MEGATRON, FSDP)}


def rules_for(spec: MeshSpec, fsdp: bool) -> Rules:
    """The preset for a mesh: FSDP when asked, else Megatron, data-parallel or replicated.

    Every preset but `replicated` puts `stage` on `pipeline`, so pipelining needs no preset of its
    own; `replicated` is only chosen for a mesh of one device.
    """
    if fsdp:
        return FSDP
    if spec.tensor > 1:
        return MEGATRON
    return DATA_PARALLEL if spec.size > 1 else REPLICATED


def serving_rules(rules: Rules) -> Rules:
    """A preset with the embedding's and head's batch over `data` only: a serving batch is small
    and need not divide over `data` x `pipeline`."""
    mapping = tuple((k, DATA if k == OUTER_BATCH else v) for k, v in rules.mapping)
    return Rules(rules.name, mapping)


def gather_copies(x: jax.Array, axis_name: str, dim: int) -> jax.Array:
    """`all_gather(x, axis_name, axis=dim, tiled=True)` inside a shard_map manual over
    `axis_name`, moved as an all-to-all of one copy per peer: the same bytes, and its transpose
    sums the cotangents each device gets back locally, where the all-gather's would be a
    reduce-scatter. On XLA:CPU a bfloat16 reduction (psum, psum_scatter, pmax) in a shard_map
    that leaves some mesh axes automatic aborts the process: jax lowers the reducer with a
    sharding annotation, a `copy` at its root, and the CPU pass that promotes bfloat16
    all-reduces to float32 CHECK-fails on it ("Invalid binary instruction opcode copy"; jax 0.10
    and 0.12)."""
    import jax

    n = jax.lax.axis_size(axis_name)
    copies = jax.numpy.broadcast_to(
        jax.numpy.expand_dims(x, dim), (*x.shape[:dim], n, *x.shape[dim:])
    )
    gathered = jax.lax.all_to_all(copies, axis_name, dim, dim, tiled=True)
    return gathered.reshape(*x.shape[:dim], n * x.shape[dim], *x.shape[dim + 1 :])
