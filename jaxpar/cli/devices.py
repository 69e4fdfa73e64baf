"""The devices a command runs on, set up before JAX starts.

The number of simulated CPU devices has to be set before JAX starts, so these functions prepare
the mesh first and import the library (and with it JAX) only afterwards.
"""

from __future__ import annotations

import argparse
import sys

from jaxpar.config import Config, load_config
from jaxpar.mesh import MeshSpec, parse_mesh, prepare

AUTO = "auto"
SIMULATED = 8  # CPU devices `plan` and `--mesh auto` simulate when not told a count
MAX_SIMULATED = 64  # the most CPU devices `plan` simulates to compile-check its candidates


def prepare_devices(spec: MeshSpec, devices: int | None) -> MeshSpec:
    """`mesh.prepare` with `jaxpar.runtime`'s process-wide settings: every command runs with them
    (the library leaves them to its caller)."""
    return prepare(spec, devices, tune_runtime=True)


def config_and_mesh(args: argparse.Namespace) -> tuple[Config, MeshSpec]:
    """Loads the config and sets up the devices its mesh needs (the placement checks the rest).

    The config comes back with the resolved mesh and compute dtype, as a run records them."""
    overrides = list(args.overrides)
    if args.mesh is not None:
        overrides.append(f"parallel.mesh={args.mesh}")
    config = load_config(args.config, overrides)
    if config.parallel.mesh == AUTO:
        config, spec = _auto_layout(config, args.devices)
    else:
        spec = prepare_devices(parse_mesh(config.parallel.mesh), args.devices)
    from jaxpar.placement import compute_dtype

    resolved_dtype = compute_dtype(config.train.dtype).name
    return config.replace(**{"parallel.mesh": str(spec), "train.dtype": resolved_dtype}), spec


def _auto_layout(config: Config, devices: int | None) -> tuple[Config, MeshSpec]:
    """`--mesh auto`: the planner's best layout (by the cost model) for the devices present."""
    prepare_devices(MeshSpec(data=-1), devices or SIMULATED)
    import jax

    from jaxpar.distributed import current
    from jaxpar.plan.hardware import detect_hardware
    from jaxpar.plan.planner import auto_layout, describe_choice

    config, result = auto_layout(
        config, jax.device_count(), detect_hardware(config.parallel.hardware)
    )
    if current().primary:
        print(f"jaxpar: {describe_choice(result)}", file=sys.stderr)
    return config, result.best.candidate.spec


def placement_of(args: argparse.Namespace):
    """The `Placement` of the config and mesh that --config, --mesh, --devices and the overrides
    name (`config_and_mesh`)."""
    config, spec = config_and_mesh(args)
    from jaxpar.mesh import make_mesh
    from jaxpar.placement import Placement

    return Placement(config, make_mesh(spec))
