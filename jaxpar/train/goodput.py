"""Goodput: where a run's wall time went, over every attempt (each start after a kill, a hang or
a stop is an attempt), kept in OUT/goodput.json.

Every moment of an attempt, from its process's start, is charged to one part, in the order the
host spends it (MaxText's goodput splits its badput the same way):

    startup      the process's start to the training loop: imports, devices, the mesh, init
    restore      reading the checkpoint back
    compile      compiling the step (and the held-out loss)
    productive   steps that moved the run forward
    skipped      steps whose loss or gradient was not finite (the update was dropped)
    recomputed   steps the run had reached before, run again after a restart: from the
                 checkpoint's step to the step the earlier attempt had reached (read back from
                 metrics.jsonl before its rows are dropped)
    data         building the batches on the host (the devices may be busy meanwhile: this is
                 the host's time, an upper bound on what the devices waited)
    checkpoint   saving (the blocking part of an asynchronous save, and the wait at the end)
    eval         the held-out loss
    rebalance    timing the stages and moving layers (`train.rebalance_every`)
    hang         from the last progress to the exit, when the hang watchdog ended the attempt

A step's time is the host's time from the end of the part before to its metrics being read, so
the parts follow one another and add up to the attempt's wall time. The file is written at most
twice a second, at each checkpoint and at the end: a SIGKILL loses less than half a second
of the account. The time between attempts (no process ran) is kept apart, as `down_s`.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

PARTS = ("startup", "restore", "compile", "productive", "skipped", "recomputed", "data",
         "checkpoint", "eval", "rebalance", "hang")  # fmt: skip
STEP_PARTS = ("productive", "skipped", "recomputed")
WRITE_EVERY_S = 0.5


def process_start() -> float:
    """This process's start as a Unix time (Linux: from /proc, to 10 ms; else now)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


class Ledger:
    """The current attempt's account, and the file with the earlier ones (`path` None: this
    process keeps the account but writes nothing, as every process but 0)."""

    def __init__(self, path: Path | None, started: float):
        self._path = path
        earlier = json.loads(path.read_text()) if path is not None and path.exists() else {}
        self._earlier: list[dict[str, Any]] = earlier.get("attempts", [])
        self._reached = 0
        self._lock = threading.Lock()
        self._last = self._written = started
        self.attempt: dict[str, Any] = {
            "started": started, "updated": started, "start_step": 0, "end_step": 0,
            "ended": None, "wall_s": 0.0, "seconds": dict.fromkeys(PARTS, 0.0),
            "steps": dict.fromkeys(STEP_PARTS, 0),
        }  # fmt: skip

    def begin(self, start_step: int, rows: list[dict[str, Any]]) -> None:
        """The attempt runs from `start_step`; `rows` are the metrics rows the earlier attempts
        wrote. A step is recomputed below the last of them. The steps an attempt that was
        killed did after its account was last written are added to it, with their step times."""
        self._reached = max(start_step, max((r["step"] for r in rows), default=-1) + 1)
        self.attempt["start_step"] = self.attempt["end_step"] = start_step
        self.attempt["reached"] = self._reached
        if self._earlier and self._earlier[-1]["ended"] is None:
            killed = self._earlier[-1]
            for row in rows:
                if row["step"] >= killed["end_step"]:
                    part = ("recomputed" if row["step"] < killed.get("reached", 0) else
                            "skipped" if row["skipped"] else "productive")  # fmt: skip
                    killed["seconds"][part] += row["step_time_s"]
                    killed["steps"][part] += 1
                    killed["updated"] += row["step_time_s"]
                    killed["wall_s"] += row["step_time_s"]
                    killed["end_step"] = row["step"] + 1

    def charge(self, part: str) -> float:
        """Charges the time since the last charge to `part`; returns it."""
        with self._lock:
            now = time.time()
            seconds, self._last = now - self._last, now
            self.attempt["seconds"][part] += seconds
            self.attempt["updated"] = now
        return seconds

    def step(self, step: int, skipped: bool) -> str:
        """Charges a step whose metrics were just read; returns its part."""
        part = "recomputed" if step < self._reached else "skipped" if skipped else "productive"
        self.charge(part)
        with self._lock:
            self.attempt["steps"][part] += 1
            self.attempt["end_step"] = step + 1
        if time.time() - self._written >= WRITE_EVERY_S:
            self.write()
        return part

    def end(self, how: str) -> None:
        """Closes the attempt: `how` is finished, stopped, aborted or hang."""
        with self._lock:
            self.attempt["ended"] = how
        self.write()

    def totals(self) -> dict[str, Any]:
        """Every attempt's account summed, with the goodput (productive over wall time)."""
        with self._lock:
            now = dict(self.attempt, wall_s=self.attempt["updated"] - self.attempt["started"])
            attempts = [*self._earlier, json.loads(json.dumps(now))]
        seconds = {p: sum(a["seconds"].get(p, 0.0) for a in attempts) for p in PARTS}
        wall = sum(a["wall_s"] for a in attempts)
        seconds["other"] = max(0.0, wall - sum(seconds.values()))
        down = sum(
            max(0.0, b["started"] - a["updated"])
            for a, b in zip(attempts, attempts[1:], strict=False)
        )
        return {
            "wall_s": wall,
            "goodput": seconds["productive"] / wall if wall else 0.0,
            "seconds": seconds,
            "steps": {p: sum(a["steps"].get(p, 0) for a in attempts) for p in STEP_PARTS},
            "restarts": len(attempts) - 1,
            "down_s": down,
            "attempts": attempts,
        }

    def write(self) -> None:
        """Writes OUT/goodput.json atomically (process 0)."""
        if self._path is None:
            return
        totals = self.totals()
        tmp = self._path.with_suffix(".tmp")
        tmp.write_text(json.dumps(totals, indent=1) + "\n")
        tmp.replace(self._path)
        self._written = time.time()


def describe(totals: dict[str, Any]) -> str:
    """One paragraph: the goodput, then each part's seconds and share, largest first."""
    wall = totals["wall_s"] or 1.0
    parts = sorted(((s, p) for p, s in totals["seconds"].items() if s >= 0.005), reverse=True)
    split = ", ".join(f"{p} {s:,.1f}s ({s / wall:.0%})" for s, p in parts)
    steps = totals["steps"]
    text = (
        f"goodput {totals['goodput']:.1%} of {totals['wall_s']:,.1f}s: {split}; steps: "
        f"{steps['productive']} productive, {steps['skipped']} skipped, "
        f"{steps['recomputed']} recomputed"
    )
    if totals["restarts"]:
        text += f"; {totals['restarts']} restart(s), {totals['down_s']:,.1f}s between attempts"
    return text
