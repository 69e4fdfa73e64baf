"""Joining a multi-process job with JAX's own distributed runtime (`jax.distributed`).

A process joins when it is given a coordinator explicitly (`--coordinator HOST:PORT
--num-processes N --process-id I`, or the same in `JAXPAR_COORDINATOR`, `JAXPAR_NUM_PROCESSES` and
`JAXPAR_PROCESS_ID`, which `jaxpar launch` sets), or when it runs under a launcher that
`jax.distributed.initialize()` detects by itself: SLURM (`srun`, more than one task), Open MPI
(`mpirun`), or a multi-host Cloud TPU slice. Otherwise it is a single process and nothing happens.

This must run before JAX starts its backend; every process then sees the global device list
(`jax.devices()`), its own devices (`jax.local_devices()`), and runs the same programs in the
same order. On CPU the collectives between processes go through gloo.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jaxpar.errors import JaxparError

if TYPE_CHECKING:
    import jax

ENV = ("JAXPAR_COORDINATOR", "JAXPAR_NUM_PROCESSES", "JAXPAR_PROCESS_ID")


@dataclass(frozen=True)
class Process:
    """This process's place in the job."""

    index: int = 0
    count: int = 1

    @property
    def primary(self) -> bool:
        """Process 0 writes the metrics and draws the progress bar."""
        return self.index == 0


_current = Process()


def current() -> Process:
    return _current


def _detected_launcher() -> str | None:
    """The multi-process launcher this process runs under, if jax.distributed can detect it."""
    env = os.environ
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return "SLURM"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI"
    if env.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
        return "Cloud TPU"
    return None


def join(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: int = 300,
) -> Process:
    """Joins the job if there is one (arguments, then JAXPAR_* variables, then a detected
    launcher) and returns this process's place in it.

    Raises:
        JaxparError: the explicit settings are incomplete or out of range.
    """
    global _current
    env = os.environ
    coordinator = coordinator or env.get("JAXPAR_COORDINATOR")
    if num_processes is None and env.get("JAXPAR_NUM_PROCESSES"):
        num_processes = _int("JAXPAR_NUM_PROCESSES", env["JAXPAR_NUM_PROCESSES"])
    if process_id is None and env.get("JAXPAR_PROCESS_ID"):
        process_id = _int("JAXPAR_PROCESS_ID", env["JAXPAR_PROCESS_ID"])
    explicit = (coordinator, num_processes, process_id)
    if any(x is not None for x in explicit):
        if any(x is None for x in explicit):
            raise JaxparError(
                "--coordinator HOST:PORT, --num-processes N and --process-id I go together; "
                f"got coordinator={coordinator}, num_processes={num_processes}, "
                f"process_id={process_id}"
            )
        assert num_processes is not None and process_id is not None
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise JaxparError(
                f"--process-id {process_id} must be in [0, {num_processes}) and --num-processes "
                f"{num_processes} at least 1"
            )
        if ":" not in coordinator:
            raise JaxparError(f"--coordinator {coordinator!r} must look like HOST:PORT")
        if num_processes > 1:
            import jax

            jax.distributed.initialize(
                coordinator, num_processes, process_id, initialization_timeout=timeout_s
            )
        _current = Process(process_id, num_processes)
    elif (launcher := _detected_launcher()) is not None:
        import jax

        try:
            jax.distributed.initialize(initialization_timeout=timeout_s)
        except (RuntimeError, ValueError) as e:
            raise JaxparError(f"could not join the {launcher} job: {e}") from None
        _current = Process(jax.process_index(), jax.process_count())
    return _current


def _int(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise JaxparError(f"{name}={value!r} is not an integer") from None


def agree(flag: bool) -> bool:
    """True on every process when it is true on any (a stop request must stop all of them at the
    same step, or the others would wait forever in the next step's collectives)."""
    if _current.count == 1:
        return flag
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def global_array(value: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """A host value that every process holds whole, as a global array laid out by `sharding`:
    each process places the pieces its own devices hold (`jax.device_put` refuses a sharding
    over other processes' devices)."""
    import jax
    import numpy as np

    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
