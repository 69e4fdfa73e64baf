"""Pipeline schedules as data: which (micro-batch, repeat) each stage runs at each tick.

Both schedules are one rule. At tick t stage s runs job k = t - s, if 0 <= k < v * M: micro-batch
k % M in its repeat k // M (v = 1 is GPipe). A job's output moves to the next stage (s + 1) % P for
the next tick; from the last stage it comes back to stage 0, which keeps it until the same
micro-batch's next repeat starts M - P + 1 ticks later (so the circular schedule needs M >= P).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Schedule:
    name: str
    stages: int
    microbatches: int
    repeats: int = 1

    @property
    def ticks(self) -> int:
        """v * M + P - 1: the last job starts on the last stage at tick v * M + P - 2."""
        return self.repeats * self.microbatches + self.stages - 1

    @property
    def bubble(self) -> float:
        """Idle fraction of stage-ticks: (P - 1) / (v * M + P - 1)."""
        return (self.stages - 1) / self.ticks

    def table(self) -> np.ndarray:
        """[P, ticks] int: the job index k each stage runs at each tick, -1 when idle."""
        k = np.arange(self.ticks)[None, :] - np.arange(self.stages)[:, None]
        return np.where((k >= 0) & (k < self.repeats * self.microbatches), k, -1)

    def describe(self) -> str:
        return (
            f"{self.name} schedule: {self.microbatches} micro-batches over {self.stages} stages"
            + (f" x {self.repeats} repeats" if self.repeats > 1 else "")
            + f", {self.ticks} ticks, bubble {self.bubble:.1%}"
        )
