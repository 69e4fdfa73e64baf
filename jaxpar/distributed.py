"""Joining a multi-process job with JAX's own distributed runtime (`jax.distributed`).

A process joins when it is given a coordinator explicitly (`--coordinator HOST:PORT
--num-processes N --process-id I`, or the same in `JAXPAR_COORDINATOR`, `JAXPAR_NUM_PROCESSES` and
`JAXPAR_PROCESS_ID`, which `jaxpar launch` sets), or when it runs under a launcher that
`jax.distributed.initialize()` detects by itself: SLURM (`srun`, more than one task), Open MPI
(`mpirun`), or a multi-host Cloud TPU slice. Otherwise it is a single process and nothing happens.

This must run before JAX starts its backend; every process then sees the global device list
(`jax.devices()`), its own devices (`jax.local_devices()`), and runs the same programs in the
same order. On CPU the collectives between processes go through gloo.

A job fails as a whole, never hangs: a process that stops sending heartbeats for `HEARTBEAT_S`
seconds makes JAX end every other process, and a collective with a dead peer fails at once (gloo
sees the closed connection). JAX's preemption service is off, so SIGTERM is Python's to handle
(by default it ends the process; `train` saves a checkpoint first, `serve` drains), never
swallowed by a handler of JAX's own while a process is still starting.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jaxpar.errors import JaxparError

if TYPE_CHECKING:
    import jax

ENV = ("JAXPAR_COORDINATOR", "JAXPAR_NUM_PROCESSES", "JAXPAR_PROCESS_ID")
HEARTBEAT_S = 30  # a process silent this long is dead: JAX ends the job (its default is 100 s)


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
            _initialize(timeout_s, coordinator, num_processes, process_id)
        _current = Process(process_id, num_processes)
    elif (launcher := _detected_launcher()) is not None:
        import jax

        try:
            _initialize(timeout_s)
        except (RuntimeError, ValueError) as e:
            raise JaxparError(f"could not join the {launcher} job: {e}") from None
        _current = Process(jax.process_index(), jax.process_count())
    return _current


def _initialize(timeout_s: int, *args: Any) -> None:
    import jax

    jax.config.update("jax_enable_preemption_service", False)
    jax.distributed.initialize(
        *args, initialization_timeout=timeout_s, heartbeat_timeout_seconds=HEARTBEAT_S
    )


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


class Handoff:
    """Process 0 hands a sequence of messages (a name and named arrays) to every other process of
    the job, in order, through the key-value store of JAX's coordination service (the one every
    `jax.distributed` job already runs): process 0 `send`s without waiting, the others `receive`
    in the same order. For inputs that only process 0 knows (a server's requests) but that every
    process must pass to the same step.

    Message n is the key `{prefix}/{n}`. Process 0 deletes message n - `KEEP` as it sends n: the
    others cannot be that far behind, since they run the steps in between with it, in lockstep.
    """

    KEEP = 4096

    def __init__(self, prefix: str = "jaxpar/handoff"):
        from jax._src.distributed import global_state

        if global_state.client is None:
            raise JaxparError("a Handoff needs a jax.distributed job")
        self._client, self._prefix, self._count = global_state.client, prefix, 0

    def send(self, name: str, arrays: dict[str, Any]) -> None:
        """Process 0: message `name` with `arrays` (each a numpy array or scalar)."""
        import numpy as np

        arrays = {k: np.asarray(v) for k, v in arrays.items()}  # (tobytes: C order)
        head = [name, [(k, a.dtype.str, a.shape) for k, a in arrays.items()]]
        body = b"".join(a.tobytes() for a in arrays.values())
        self._client.key_value_set_bytes(self._key(self._count), json.dumps(head).encode() +
                                         b"\n" + body)  # fmt: skip
        if self._count >= self.KEEP:
            self._client.key_value_delete(self._key(self._count - self.KEEP))
        self._count += 1

    def receive(self, poll_s: float = 1.0, give_up: float | None = None) -> tuple[str, dict]:
        """The other processes: the next message, (name, arrays), waiting for it in `poll_s`
        slices (a dead process 0 ends the wait with an error).

        Raises:
            TimeoutError: `give_up` (a `time.monotonic()` instant) passed first.
        """
        import numpy as np

        key = self._key(self._count)
        while True:
            if give_up is not None and time.monotonic() > give_up:
                raise TimeoutError(f"no message {key} from process 0")
            try:
                value = self._client.blocking_key_value_get_bytes(key, int(poll_s * 1000))
                break
            except Exception as e:  # the wait's timeout: poll again; anything else ends it
                if "DEADLINE_EXCEEDED" not in str(e):
                    raise
        self._count += 1
        head, body = value.split(b"\n", 1)
        name, layout = json.loads(head)
        arrays, offset = {}, 0
        for k, dtype, shape in layout:
            a = np.frombuffer(body, np.dtype(dtype), int(np.prod(shape)), offset)
            arrays[k] = a.reshape(shape)
            offset += a.nbytes
        return name, arrays

    def _key(self, n: int) -> str:
        return f"{self._prefix}/{n}"
