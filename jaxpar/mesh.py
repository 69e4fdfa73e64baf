"""Mesh specs (`data=2,pipeline=2,tensor=2`), simulated CPU devices, and the `jax.sharding.Mesh`.

Parsing and device simulation work without importing jax: the simulated device count has to be in
`XLA_FLAGS` before JAX initialises its backend, so the CLI calls `simulate_devices` first.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from jaxpar import runtime
from jaxpar.errors import JaxparError

if TYPE_CHECKING:
    import jax

# The mesh axes, in mesh order: every module names them through these constants, so an axis
# added later is added here (and as a field of `MeshSpec`) and nowhere else.
DATA = "data"  # data parallelism (and FSDP's parameter shards)
PIPELINE = "pipeline"  # pipeline stages
CONTEXT = "context"  # the sequence, split for long context (ring or all-gather attention)
TENSOR = "tensor"  # Megatron tensor parallelism
# `context` sits next to `tensor`, the innermost axes, so that its ring runs over the fastest links.
AXES = (DATA, PIPELINE, CONTEXT, TENSOR)
_DEVICE_FLAG = "--xla_force_host_platform_device_count"


@dataclass(frozen=True)
class MeshSpec:
    """Axis sizes in mesh order (one field per name in `AXES`); at most one may be -1 (filled
    later). Passed whole wherever a mesh's shape matters, never as loose sizes."""

    data: int = 1
    pipeline: int = 1
    context: int = 1
    tensor: int = 1

    @classmethod
    def of(cls, sizes: Sequence[int]) -> MeshSpec:
        """The spec with these sizes, in `AXES` order."""
        return cls(**dict(zip(AXES, sizes, strict=True)))

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(getattr(self, axis) for axis in AXES)

    @property
    def is_resolved(self) -> bool:
        return -1 not in self.sizes

    @property
    def size(self) -> int:
        """Number of devices; only for a resolved spec."""
        assert self.is_resolved, self
        return math.prod(self.sizes)

    def resolve(self, num_devices: int) -> MeshSpec:
        """Fills a -1 axis from `num_devices` and checks that the mesh uses every device.

        Raises:
            JaxparError: the product differs from `num_devices`, or -1 cannot be filled evenly.
        """
        known = math.prod(s for s in self.sizes if s != -1)
        if not self.is_resolved:
            if num_devices % known:
                raise JaxparError(
                    f"mesh {self} cannot fill its -1 axis: {num_devices} devices are not "
                    f"divisible by the other axes' product {known}"
                )
            fill = num_devices // known
            return MeshSpec.of([fill if s == -1 else s for s in self.sizes])
        if known != num_devices:
            raise JaxparError(
                f"mesh {self} needs {known} devices but {num_devices} are available; make the "
                f"axis sizes multiply to {num_devices}, or on CPU pass --devices {known}"
            )
        return self

    def __str__(self) -> str:
        """`data=2,pipeline=1,tensor=4`: every axis, `context` only where it is split."""
        return ",".join(
            f"{a}={s}" for a, s in zip(AXES, self.sizes, strict=True) if a != CONTEXT or s != 1
        )


def parse_mesh(spec: str) -> MeshSpec:
    """Parses `data=2,pipeline=2,tensor=2`; omitted axes are 1 and one axis may be -1.

    Raises:
        JaxparError: unknown or repeated axis, a size that is not an integer, a size below 1
            (other than a single -1), or two -1s.
    """
    sizes: dict[str, int] = {}
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        axis, sep, value = part.partition("=")
        if not sep:
            raise JaxparError(
                f"mesh spec {spec!r}: {part!r} must look like AXIS=SIZE, e.g. tensor=2"
            )
        if axis not in AXES:
            raise JaxparError(
                f"mesh spec {spec!r}: unknown axis {axis!r} (valid axes: {', '.join(AXES)})"
            )
        if axis in sizes:
            raise JaxparError(f"mesh spec {spec!r}: axis {axis!r} is given twice")
        if not re.fullmatch(r"-?\d+", value):
            raise JaxparError(
                f"mesh spec {spec!r}: size {value!r} of axis {axis!r} is not an integer "
                "(use a positive integer, or -1 to fill from the device count)"
            )
        size = int(value)
        if size < 1 and size != -1:
            raise JaxparError(
                f"mesh spec {spec!r}: size {size} of axis {axis!r} must be a positive integer or -1"
            )
        sizes[axis] = size
    if list(sizes.values()).count(-1) > 1:
        raise JaxparError(f"mesh spec {spec!r}: at most one axis may be -1")
    return MeshSpec(**sizes)


def with_device_count(flags: str, num_devices: int) -> str:
    """`flags` (an `XLA_FLAGS` value) with the simulated CPU device count set to `num_devices`:
    the user's other flags kept, any earlier count replaced rather than followed by a second one,
    so that the same count always gives the same flags (and compilation cache keys)."""
    kept = re.sub(rf"{_DEVICE_FLAG}=\S*", "", flags).split()
    return " ".join([*kept, f"{_DEVICE_FLAG}={num_devices}"])


def simulate_devices(num_devices: int) -> None:
    """Makes JAX's host (CPU) platform expose `num_devices` devices.

    Keeps the user's other XLA_FLAGS and replaces any device count they hold. Only affects the
    CPU platform, so it is harmless on GPU hosts. Must run before JAX initialises its backend;
    afterwards it only checks that the count already matches.

    Raises:
        JaxparError: JAX already started with a different number of CPU devices.
    """
    if "jax" in sys.modules:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            import jax

            have = len(jax.devices("cpu"))
            if have != num_devices and jax.default_backend() == "cpu":
                raise JaxparError(
                    f"the mesh needs {num_devices} devices but JAX already started with {have} "
                    "CPU devices in this process; use a mesh of that size"
                )
            return
    flags = os.environ.get("XLA_FLAGS", "")
    current = re.findall(rf"{_DEVICE_FLAG}=(\d+)", flags)
    if current == [str(num_devices)]:
        return
    os.environ["XLA_FLAGS"] = with_device_count(flags, num_devices)


def make_mesh(spec: MeshSpec, devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
    """Builds a mesh with axes `AXES`, all of type Auto (GSPMD propagation).

    Args:
        spec: the axis sizes; a -1 is filled from the number of devices.
        devices: the devices to use, all of them; defaults to `jax.devices()`. Passing a list is
            the explicit way to run on fewer devices than the host has (tests do this).

    Raises:
        JaxparError: the mesh does not use exactly the given devices.
    """
    import jax
    import numpy as np

    devices = list(jax.devices()) if devices is None else list(devices)
    spec = spec.resolve(len(devices))
    grid = np.array(devices, dtype=object).reshape(spec.sizes)
    return jax.sharding.Mesh(grid, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def mesh_spec_of(mesh: jax.sharding.Mesh) -> MeshSpec:
    return MeshSpec.of([mesh.shape[a] for a in AXES])


def groups(mesh: jax.sharding.Mesh, axis: str) -> list[list[int]]:
    """Device ids that communicate over `axis`: one list per group, ordered along the axis."""
    import numpy as np

    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    k = AXES.index(axis)
    moved = np.moveaxis(ids, k, -1).reshape(-1, ids.shape[k])
    return [list(map(int, g)) for g in moved]


def describe(mesh: jax.sharding.Mesh) -> str:
    """A human-readable picture of the mesh: sizes, the device at each coordinate, the groups."""
    import numpy as np

    spec = mesh_spec_of(mesh)
    platform = mesh.devices.flat[0].platform
    lines = [f"mesh {spec}  ({spec.size} {platform} devices)", ""]
    lines.append(f"device id at each ({', '.join(AXES)}) coordinate:")
    for coord in np.ndindex(*spec.sizes):
        d = mesh.devices[coord]
        lines.append(f"  ({', '.join(map(str, coord))})  ->  device {d.id}")
    ids = np.vectorize(lambda d: d.id)(mesh.devices)

    def holding(axis: str, index: int) -> list[int]:
        """The devices at coordinate `index` of `axis`."""
        return sorted(np.take(ids, index, axis=AXES.index(axis)).flatten().tolist())

    lines += [
        "",
        f"tensor groups (devices sharing one layer's shards), {spec.tensor} devices each:",
    ]
    lines += [f"  {g}" for g in groups(mesh, TENSOR)]
    lines += ["", "pipeline stages (devices holding each stage's layers):"]
    lines += [f"  stage {s}: {holding(PIPELINE, s)}" for s in range(spec.pipeline)]
    if spec.context > 1:
        lines += [
            "",
            f"context groups (devices holding one sequence's pieces), {spec.context} each:",
        ]
        lines += [f"  {g}" for g in groups(mesh, CONTEXT)]
    lines += ["", "data replicas (devices holding one whole copy of the model):"]
    lines += [f"  replica {r}: {holding(DATA, r)}" for r in range(spec.data)]
    return "\n".join(lines)


def prepare(spec: MeshSpec, devices: int | None = None, *, tune_runtime: bool = False) -> MeshSpec:
    """Simulates the CPU devices a mesh needs (before JAX starts), then resolves the spec.

    Args:
        spec: the parsed spec; a -1 axis is filled from the device count.
        devices: the device count to simulate on CPU, over all processes of a multi-process
            job; defaults to the spec's product. With a -1 axis and no count, the devices JAX
            already sees are used.
        tune_runtime: also apply `jaxpar.runtime`'s process-wide settings: XLA flags appended to
            `XLA_FLAGS` (before JAX starts) and, on CPU, glibc's `mallopt` settings that keep
            freed memory in the process. The CLI and `experiments/` pass True; a library caller
            opts in, since both change the whole process (see `jaxpar.runtime`).

    Raises:
        JaxparError: the mesh does not use exactly the available devices.
    """
    if devices is not None and devices < 1:
        raise JaxparError(f"--devices must be a positive integer, got {devices}")
    count = devices if devices is not None else (spec.size if spec.is_resolved else None)
    if count is not None:
        from jaxpar.distributed import current

        processes = current().count  # in a multi-process job each simulates its own share
        if count % processes:
            raise JaxparError(
                f"mesh {spec} needs {count} devices, which {processes} processes cannot share "
                f"evenly; use a multiple of {processes}"
            )
        simulate_devices(count // processes)
    if tune_runtime:
        runtime.xla_flags()
    import jax

    if tune_runtime and jax.default_backend() == "cpu":
        runtime.tune_host_allocator()
    return spec.resolve(jax.device_count())
