"""Which layer lives where: L layers over P stages, v chunks (repeats) per stage.

The layer stack is cut into P * v chunks of consecutive layers, balanced (sizes differing by at
most one) or as given per stage (`sizes`: stage s holds sizes[s] layers, cut evenly into its v
chunks; `choose_split` picks sizes for stages of unequal speed). Chunk j runs on stage j % P as
that stage's repeat j // P (the circular assignment; v = 1 is GPipe's one contiguous block per
stage), or, in the V shape of zero-bubble V schedules (v = 2), on stage j for j < P and on stage
2P - 1 - j after the turn (`chunk_places`). Every chunk is padded to the largest chunk size c,
because SPMD stages run the same program: parameters are stored as [P, v * c, ...] with the stage
axis on `pipeline`, slot r * c + i of stage s holding layer i of the chunk that runs there as
repeat r (or padding). Padded slots hold zeros and compute nothing (the layer scan's slots are
`lax.cond`s, `jaxpar.pipeline.executor.stage_chunk`), so a stage with fewer layers finishes its
tick sooner, and they get zero gradients; they still take memory: every stage stores v * c slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from jaxpar.errors import JaxparError


def chunk_places(stages: int, repeats: int, shape: str = "circular") -> list[tuple[int, int]]:
    """(stage, repeat) of each chunk of the stack, in logical order: where chunk j runs."""
    p = stages
    if shape == "v":  # down the stages and back up: stage s holds chunks s and 2P - 1 - s
        return [(j, 0) if j < p else (2 * p - 1 - j, 1) for j in range(2 * p)]
    return [(j % p, j // p) for j in range(p * repeats)]


@dataclass(frozen=True)
class StageLayout:
    layers: int
    stages: int = 1
    repeats: int = 1
    shape: str = "circular"  # or "v" (two repeats)
    sizes: tuple[int, ...] | None = None  # layers per stage; None: balanced

    def __post_init__(self) -> None:
        if self.shape == "v" and self.repeats != 2:
            raise JaxparError(f"a V-shaped layout has 2 chunks per stage, not {self.repeats}")
        if self.layers < self.chunks:
            raise JaxparError(f"{self.layers} layers cannot fill {self.chunks} chunks")
        if self.sizes is not None and (
            len(self.sizes) != self.stages or sum(self.sizes) != self.layers
            or min(self.sizes) < self.repeats
        ):  # fmt: skip
            raise JaxparError(
                f"layers per stage {list(self.sizes)} do not split {self.layers} layers over "
                f"{self.stages} stages of {self.repeats} chunk(s) each"
            )

    @property
    def chunks(self) -> int:
        return self.stages * self.repeats

    @cached_property
    def chunk_sizes(self) -> tuple[int, ...]:
        """Real layers per chunk, in chunk (= logical) order. Balanced: the larger chunks come
        first; with `sizes`, a stage's larger chunks are its earlier repeats."""
        if self.sizes is None:
            base, extra = divmod(self.layers, self.chunks)
            return tuple(base + (j < extra) for j in range(self.chunks))
        places = chunk_places(self.stages, self.repeats, self.shape)
        return tuple(
            self.sizes[stage] // self.repeats + (repeat < self.sizes[stage] % self.repeats)
            for stage, repeat in places
        )

    @property
    def stage_sizes(self) -> tuple[int, ...]:
        """Real layers per stage."""
        return tuple(int(n) for n in (self.slot_layer >= 0).sum(axis=1))

    @property
    def chunk_size(self) -> int:
        """c: layer slots per chunk, padding included."""
        return max(self.chunk_sizes)

    @property
    def slots_per_stage(self) -> int:
        return self.repeats * self.chunk_size

    @cached_property
    def slot_layer(self) -> np.ndarray:
        """[P, v * c] int: the logical layer in each slot, -1 for padding."""
        table = np.full((self.stages, self.slots_per_stage), -1, dtype=np.int64)
        first = 0
        places = chunk_places(self.stages, self.repeats, self.shape)
        for (stage, repeat), size in zip(places, self.chunk_sizes, strict=True):
            start = repeat * self.chunk_size
            table[stage, start : start + size] = np.arange(first, first + size)
            first += size
        return table

    @property
    def valid(self) -> np.ndarray:
        """[P, v, c] bool: which slots hold a real layer."""
        return (self.slot_layer >= 0).reshape(self.stages, self.repeats, self.chunk_size)

    def to_stages(self, x_L: np.ndarray) -> np.ndarray:
        """[L, ...] logical order -> [P, v * c, ...] stage order, zeros in padded slots."""
        import jax.numpy as jnp

        index = np.maximum(self.slot_layer, 0)
        mask = (self.slot_layer >= 0).reshape(self.slot_layer.shape + (1,) * (x_L.ndim - 1))
        return jnp.where(mask, jnp.asarray(x_L)[index], 0).astype(x_L.dtype)

    def to_logical(self, x_SC: np.ndarray) -> np.ndarray:
        """[P, v * c, ...] stage order -> [L, ...] logical order (padding dropped)."""
        import jax.numpy as jnp

        stage, slot = np.nonzero(self.slot_layer >= 0)
        order = np.argsort(self.slot_layer[stage, slot])
        return jnp.asarray(x_SC)[stage[order], slot[order]]

    def imbalance(self) -> str:
        """A one-line report: real layers per stage and the share of padded slots."""
        real = list(self.stage_sizes)
        total = self.stages * self.slots_per_stage
        padded = total - self.layers
        return (
            f"layers per stage {real} in {self.slots_per_stage} slots each; "
            f"{padded}/{total} slots padded (stored, not computed)"
        )


def choose_split(layers: int, repeats: int, layer_time: Sequence[float],
                 extra_time: Sequence[float] | None = None,
                 max_layers: int | None = None) -> tuple[int, ...]:  # fmt: skip
    """Layers per stage that minimise the slowest stage's time, where stage s takes
    `layer_time[s]` per layer plus `extra_time[s]` (the embedding, head or loss it runs); each
    stage gets at least `repeats` layers (one per chunk) and at most `max_layers` (what its memory
    holds). Greedy: each layer goes to the stage that would finish it soonest (exact for a
    min-max of increasing costs); ties go to the earlier stage, so equal stages give the
    balanced split.

    Raises:
        JaxparError: the layers do not fit: fewer than one per chunk, or more than `max_layers`
            per stage allows.
    """
    p = len(layer_time)
    extra = list(extra_time) if extra_time is not None else [0.0] * p
    cap = layers if max_layers is None else max_layers
    if layers < p * repeats or cap < repeats or layers > p * cap:
        raise JaxparError(
            f"{layers} layers do not fit {p} stages of {repeats} to {cap} layers each"
        )
    counts = [repeats] * p
    for _ in range(layers - p * repeats):
        open_ = [s for s in range(p) if counts[s] < cap]
        s = min(open_, key=lambda s: ((counts[s] + 1) * layer_time[s] + extra[s], s))
        counts[s] += 1
    return tuple(counts)
