"""A run's health: the hang watchdog, stacks on demand, and the straggler alarm.

**Hangs.** An SPMD job whose process stops (a deadlock, a dead NIC, a process stuck in its data)
leaves every other process waiting in the next collective, silently, for ever. `Watchdog` is a
thread that expects a step to finish every `train.hang_timeout_s` (0: 20 x the slowest step so
far, at least `FLOOR_S`; the first step, saves, evaluations and rebalances, which may
compile, get at least that much whatever the setting). When none does, every process

1. writes all its threads' Python stacks (`faulthandler`) to OUT/stacks/process-<i>.txt;
2. publishes where it is (the last step it began to dispatch, its main thread's frame) in
   the key-value store of JAX's coordination service, and waits up to `REPORT_WAIT_S` for the
   others' (they stop within a step of each other, as the same timeout passes);
3. prints one line: process 0 names the step that never finished, where it was waiting, and the
   processes that never dispatched it (or never answered), and exits with `HANG_EXIT`.

`jaxpar launch` then stops the rest of the job. The checkpoints written so far are intact (an
orbax save is committed by a rename), so a resume continues the run as if nothing happened.

SIGUSR1 writes the stacks to the same file at any time without stopping the run (faulthandler's
handler runs in C: it works while the main thread waits inside a collective).

**Stragglers.** In lockstep every process waits for the slowest, so a process's wall time per
step says nothing about which one is slow. Its own work does: the host time it spends building
its batch (a slow data pipeline, a busy or throttled host), outside every wait for the others.
`Stragglers` gathers each process's mean over the last `train.straggler_every` steps (one small
collective per check) and warns once about a process above the median by more than
`train.straggler_threshold` in `CHECKS_IN_A_ROW` checks in a row. On a pipeline mesh a slow
stage's devices show in the stages' times that `train.rebalance_every` measures (logged as
stage_time_s/<i>); the rebalancer acts on them.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from jaxpar.distributed import Process

HANG_EXIT = 3  # the exit code of a process the watchdog ended
FLOOR_S = 300.0
STEPS_OF_SILENCE = 20
REPORT_WAIT_S = 20.0
CHECKS_IN_A_ROW = 3
_KEY = "jaxpar/watchdog"


class Watchdog:
    """Entered around the run (`with Watchdog(...) as dog:`) and armed when the step loop
    starts; the loop calls `dispatched` and `finished` as steps go, and `beat` after any other
    long part (a save, an evaluation)."""

    def __init__(self, stacks: Path, timeout_s: float, process: Process,
                 on_hang: Callable[[], None] = lambda: None):  # fmt: skip
        self._path, self._timeout, self._process = stacks, timeout_s, process
        self._on_hang = on_hang
        self._step = self._done = -1
        self._slowest = 0.0
        self._long = False
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._file: IO[str] | None = None

    @property
    def timeout_s(self) -> float:
        """The silence that counts as a hang; the first step (which sets up the runtime's
        connections) gets at least `FLOOR_S`."""
        auto = max(FLOOR_S, STEPS_OF_SILENCE * self._slowest)
        if self._done < 0 or self._long:
            return max(self._timeout, auto)
        return self._timeout or auto

    @contextlib.contextmanager
    def long(self) -> Iterator[None]:
        """A part that may compile or write for long (a save, an evaluation, a rebalance): the
        timeout is at least the automatic one meanwhile."""
        self._long = True
        try:
            yield
        finally:
            self._long = False
            self.beat()

    def __enter__(self) -> Watchdog:
        """Stacks on SIGUSR1 from now on; the watch itself starts with `arm`."""
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self._path.open("a")
        faulthandler.register(signal.SIGUSR1, file=self._file, all_threads=True, chain=False)
        self._thread = threading.Thread(target=self._watch, name="jaxpar-watchdog", daemon=True)
        return self

    def arm(self) -> None:
        """Starts the watch (when the step loop starts: compiling is not watched)."""
        self._last = time.monotonic()
        self._thread.start()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        faulthandler.unregister(signal.SIGUSR1)
        assert self._file is not None
        self._file.close()

    def dispatched(self, step: int) -> None:
        """The loop begins to dispatch `step` (builds its batch, queues it)."""
        self._step = step

    def finished(self, step: int, seconds: float) -> None:
        self._done, self._slowest = step, max(self._slowest, seconds)
        self.beat()

    def beat(self) -> None:
        self._last = time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(0.25):
            silent = time.monotonic() - self._last
            if silent > self.timeout_s:
                self._fire(silent)

    def _fire(self, silent: float) -> None:
        """Writes the stacks, gathers where every process is, prints one line and exits."""
        assert self._file is not None
        me = self._process.index
        where = main_thread_frame()
        self._file.write(f"--- hang: no step finished in {silent:.0f}s; process {me} dispatched "
                         f"step {self._step}, finished step {self._done}, main thread in "
                         f"{where} ({time.strftime('%Y-%m-%d %H:%M:%S')})\n")  # fmt: skip
        self._file.flush()
        faulthandler.dump_traceback(self._file, all_threads=True)
        self._file.flush()
        report = {"step": self._step, "done": self._done, "where": where}
        reports = gather_reports(self._process, report)
        stuck = max(r["step"] for r in reports.values() if r is not None)  # some process began it
        if self._process.primary:
            behind = [
                f"process {i} " + ("never answered" if r is None else
                                   f"never dispatched it (it was at step {r['step']}, in "
                                   f"{r['where']})")
                for i, r in sorted(reports.items())
                if i != me and (r is None or r["step"] < stuck)
            ]  # fmt: skip
            print(f"jaxpar: hang: step {stuck} did not finish in {silent:.0f}s "
                  f"(train.hang_timeout_s={self.timeout_s:g}); process 0 was waiting in {where}"
                  + (f"; {'; '.join(behind)}" if behind else "")
                  + f"; stacks in {self._path.parent}", file=sys.stderr, flush=True)  # fmt: skip
        else:
            print(f"jaxpar: hang: process {me} at step {self._step} in {where}; stacks in "
                  f"{self._path}", file=sys.stderr, flush=True)  # fmt: skip
        self._on_hang()
        os._exit(HANG_EXIT)


def main_thread_frame() -> str:
    """Where the main thread is: its innermost frame, and the innermost of jaxpar's above it."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    if frame is None:
        return "?"
    inner = _describe(frame)
    while frame is not None and f"{os.sep}jaxpar{os.sep}" not in frame.f_code.co_filename:
        frame = frame.f_back
    if frame is None or _describe(frame) == inner:
        return inner
    return f"{inner} (from {_describe(frame)})"


def _describe(frame: Any) -> str:
    parts = Path(frame.f_code.co_filename).parts
    short = "/".join(parts[-3:]) if "jaxpar" not in parts else "/".join(
        parts[len(parts) - 1 - parts[::-1].index("jaxpar"):])  # fmt: skip
    return f"{short}:{frame.f_lineno} {frame.f_code.co_name}"


def gather_reports(process: Process, report: dict) -> dict[int, dict | None]:
    """Every process's report (None for one that gave none within `REPORT_WAIT_S`), through the
    coordination service's key-value store; process 0 then lets the others exit."""
    if process.count == 1:
        return {0: report}
    from jax._src.distributed import global_state

    client = global_state.client
    client.key_value_set(f"{_KEY}/{process.index}", json.dumps(report))
    if not process.primary:  # wait for process 0 to have read the reports, then exit
        with contextlib.suppress(Exception):  # process 0 gone or late: exit all the same
            client.blocking_key_value_get(f"{_KEY}/read", int(REPORT_WAIT_S * 2000))
        return {process.index: report}
    reports: dict[int, dict | None] = {}
    give_up = time.monotonic() + REPORT_WAIT_S
    for i in range(process.count):
        wait_ms = max(1, int((give_up - time.monotonic()) * 1000))
        try:
            reports[i] = json.loads(client.blocking_key_value_get(f"{_KEY}/{i}", wait_ms))
        except Exception:  # noqa: BLE001 (no answer in time)
            reports[i] = None
    client.key_value_set(f"{_KEY}/read", "1")
    return reports


class Stragglers:
    """Each process's own host time per step, compared across processes every `every` steps."""

    def __init__(self, every: int, threshold: float, process: Process,
                 warn: Callable[[str], None]):  # fmt: skip
        self._every, self._threshold, self._process, self._warn = every, threshold, process, warn
        self._own: list[float] = []
        self._wall: list[float] = []
        self._streak: dict[int, int] = {}
        self._warned: set[int] = set()

    def add(self, own_s: float, wall_s: float) -> None:
        self._own.append(own_s)
        self._wall.append(wall_s)

    def check(self, done: int) -> dict[str, float]:
        """After `done` steps: on a check step, every process's mean own time (as scalars for
        the trackers, `host_time_s/<i>`) and a warning for a straggler; else nothing."""
        if self._process.count == 1 or done % self._every or not self._own:
            return {}
        import numpy as np
        from jax.experimental import multihost_utils

        mine = np.array([statistics.fmean(self._own), statistics.fmean(self._wall)])
        self._own, self._wall = [], []
        every = np.asarray(multihost_utils.process_allgather(mine))  # (processes, 2)
        own, wall = every[:, 0], float(np.median(every[:, 1]))
        median = float(np.median(own))
        for i, t in enumerate(own):
            # Above the threshold, and by more than 5% of a step: not noise on tiny host times.
            slow = t > median * (1 + self._threshold) and t - median > 0.05 * wall
            self._streak[i] = self._streak.get(i, 0) + 1 if slow else 0
            if self._streak[i] >= CHECKS_IN_A_ROW and i not in self._warned:
                self._warned.add(i)
                self._warn(
                    f"straggler: process {i} spends {t * 1e3:,.1f} ms of its own per step, "
                    f"{t / median:.2f}x the median process's {median * 1e3:,.1f} ms "
                    f"({CHECKS_IN_A_ROW} checks in a row, steps of {wall * 1e3:,.1f} ms)"
                )
        return {f"host_time_s/{i}": float(t) for i, t in enumerate(own)}
