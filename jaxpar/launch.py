"""`jaxpar launch`: one jaxpar command as N local processes of one `jax.distributed` job.

For trying multi-host behaviour on one machine: each process gets K simulated CPU devices and the
coordinator's address in `JAXPAR_COORDINATOR` (process 0 serves it on a free local port); CPU
collectives between processes go through gloo. Every output line is prefixed with its process's
rank. If a process exits with an error or is killed, the others are stopped (SIGTERM, then SIGKILL
after a grace period: a process blocked in a collective with a dead peer cannot act on SIGTERM),
and `launch` exits with the failed process's code, so a job never hangs.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from jaxpar.errors import JaxparError
from jaxpar.mesh import with_device_count
from jaxpar.train.watchdog import HANG_EXIT

GRACE_S = 5.0  # between SIGTERM and SIGKILL when stopping the others after a failure
INTERRUPT_GRACE_S = 120.0  # after Ctrl-C or SIGTERM: healthy processes save a checkpoint first


_GLOO_CONNECTED = re.compile(r"\[Gloo\] Rank \d+ is connected to \d+ peer ranks")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(rank: int, stream, lock: threading.Lock) -> None:
    """Copies a process's output to ours line by line, each line prefixed with its rank (without
    gloo's line per peer connection)."""
    for line in iter(stream.readline, b""):
        text = line.decode(errors="replace").rstrip("\n")
        if _GLOO_CONNECTED.match(text):
            continue
        with lock:
            print(f"[{rank}] {text}", flush=True)
    stream.close()


def _stop(procs: list[subprocess.Popen], grace_s: float = GRACE_S) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch(
    argv: Sequence[str], num_processes: int, devices_per_process: int | None, pin: bool = False
) -> int:
    """Runs `jaxpar ARGV` as `num_processes` processes; returns 0 when all succeed, else the exit
    code of the first to fail (1 for a process killed by a signal). `pin`: process r runs on CPU
    core r alone (every thread of it), so the processes are truly parallel and do not share a
    core: needs a core per process."""
    cores = _check(argv, num_processes, devices_per_process, pin)
    coordinator = f"127.0.0.1:{_free_port()}"
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    pumps = []
    for rank in range(num_processes):
        env = _environment(coordinator, rank, num_processes, devices_per_process)
        proc = subprocess.Popen(
            [sys.executable, "-m", "jaxpar", *argv],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # our Ctrl-C reaches them through us, once
            preexec_fn=(lambda core=cores[rank]: os.sched_setaffinity(0, {core})) if pin else None,
        )
        procs.append(proc)
        pump = threading.Thread(target=_pump, args=(rank, proc.stdout, lock), daemon=True)
        pump.start()
        pumps.append(pump)
        with lock:
            print(f"[launch] process {rank} of {num_processes}: pid {proc.pid}", flush=True)

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    failed: tuple[int, int] | None = None
    try:
        failed = _first_failure(procs)
    except KeyboardInterrupt:
        with lock:
            print("[launch] interrupted: asking every process to stop", flush=True)
        _stop(procs, INTERRUPT_GRACE_S)
        return 130
    finally:
        if failed is not None:
            rank, code = failed
            with lock:
                how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited {code}"
                if code == HANG_EXIT:
                    how += " (its hang watchdog: see its line above and the stacks it wrote)"
                print(f"[launch] process {rank} {how}; stopping the others", flush=True)
        _stop(procs)
        for pump in pumps:
            pump.join(timeout=GRACE_S)
        signal.signal(signal.SIGTERM, previous)
    if failed is None:
        return 0
    return failed[1] if failed[1] > 0 else 1


def _check(
    argv: Sequence[str], num_processes: int, devices_per_process: int | None, pin: bool
) -> list[int]:
    """Refuses a launch that cannot run, in one line; returns the CPU cores this process may use."""
    if not argv:
        raise JaxparError("launch needs a command after --, e.g. jaxpar launch -n 2 -- train")
    if argv[0] == "launch":
        raise JaxparError("launch cannot launch itself")
    if num_processes < 1:
        raise JaxparError(f"-n {num_processes} must be at least 1")
    if devices_per_process is not None and devices_per_process < 1:
        raise JaxparError(f"--devices-per-process {devices_per_process} must be at least 1")
    cores = sorted(os.sched_getaffinity(0))
    if pin and num_processes > len(cores):
        raise JaxparError(
            f"--pin-cores needs a core per process: -n {num_processes} but {len(cores)} cores"
        )
    return cores


def _environment(
    coordinator: str, rank: int, num_processes: int, devices_per_process: int | None
) -> dict[str, str]:
    """Process `rank`'s environment: ours, the job's coordinates, and its simulated devices."""
    env = dict(os.environ)
    env |= {
        "JAXPAR_COORDINATOR": coordinator,
        "JAXPAR_NUM_PROCESSES": str(num_processes),
        "JAXPAR_PROCESS_ID": str(rank),
        "JAX_PLATFORMS": "cpu",
        "PYTHONUNBUFFERED": "1",
    }
    if devices_per_process is not None:
        env["XLA_FLAGS"] = with_device_count(env.get("XLA_FLAGS", ""), devices_per_process)
    return env


def _first_failure(procs: list[subprocess.Popen]) -> tuple[int, int] | None:
    """Waits until every process has ended or one has failed: (rank, exit code) of the first
    failure seen, None if all succeeded."""
    while any(p.poll() is None for p in procs):
        for rank, p in enumerate(procs):
            code = p.poll()
            if code is not None and code != 0:
                return rank, code
        time.sleep(0.1)
    return next(((r, p.returncode) for r, p in enumerate(procs) if p.returncode), None)
