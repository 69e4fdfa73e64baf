"""Which layer lives where: L layers over P stages, v chunks (repeats) per stage.

The layer stack is cut into P * v chunks of consecutive layers whose sizes differ by at most one;
chunk j runs on stage j % P as that stage's repeat j // P (the circular assignment; v = 1 is GPipe's
one contiguous block per stage), or, in the V shape of zero-bubble V schedules (v = 2), on stage j
for j < P and on stage 2P - 1 - j after the turn (`chunk_places`). Every chunk is padded to the
largest chunk size c with identity layers, because SPMD stages run the same program: parameters
are stored as [P, v * c, ...] with the stage axis on `pipeline`, slot r * c + i of stage s holding
layer i of the chunk that runs there as repeat r (or padding).
Padded slots hold zeros, are masked to the identity, and get zero gradients; the compute they
waste is reported by `imbalance`.
"""

from __future__ import annotations

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

    def __post_init__(self) -> None:
        if self.shape == "v" and self.repeats != 2:
            raise JaxparError(f"a V-shaped layout has 2 chunks per stage, not {self.repeats}")
        if self.layers < self.chunks:
            raise JaxparError(f"{self.layers} layers cannot fill {self.chunks} chunks")

    @property
    def chunks(self) -> int:
        return self.stages * self.repeats

    @cached_property
    def chunk_sizes(self) -> tuple[int, ...]:
        """Real layers per chunk, in chunk (= logical) order; the larger chunks come first."""
        base, extra = divmod(self.layers, self.chunks)
        return tuple(base + (j < extra) for j in range(self.chunks))

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
        real = (self.slot_layer >= 0).sum(axis=1).tolist()
        total = self.stages * self.slots_per_stage
        padded = total - self.layers
        return (
            f"layers per stage {real} in {self.slots_per_stage} slots each; "
            f"{padded}/{total} slots padded ({padded / total:.0%} of stage compute is identity)"
        )
