"""Per-parameter layout: shape, logical axes, PartitionSpec and bytes on each device."""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
from flax import nnx


@dataclass(frozen=True)
class ParamRow:
    name: str
    shape: tuple[int, ...]
    logical_axes: tuple[str, ...]
    spec: jax.sharding.PartitionSpec
    bytes: int
    bytes_per_device: int


def param_rows(abstract_params: nnx.State, shardings: nnx.State) -> list[ParamRow]:
    """One row per parameter, in tree order; bytes per device from the sharding's shard shape."""
    rows = []
    flat_params = nnx.to_flat_state(abstract_params)
    flat_shardings = dict(nnx.to_flat_state(shardings))
    for path, v in flat_params:
        value = v.get_value()
        sharding = flat_shardings[path].get_value()
        itemsize = value.dtype.itemsize
        rows.append(
            ParamRow(
                name=".".join(str(p) for p in path),
                shape=tuple(value.shape),
                logical_axes=tuple(v.get_metadata()["logical_axes"]),
                spec=sharding.spec,
                bytes=math.prod(value.shape) * itemsize,
                bytes_per_device=math.prod(sharding.shard_shape(value.shape)) * itemsize,
            )
        )
    return rows


def tree_bytes_per_device(abstract_tree, shardings_tree) -> int:
    """Bytes one device holds of a tree of arrays laid out by a matching tree of shardings."""
    leaves = jax.tree.leaves(abstract_tree)
    shards = jax.tree.leaves(shardings_tree)
    return sum(
        math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
        for x, s in zip(leaves, shards, strict=True)
    )
