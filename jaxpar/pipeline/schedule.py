"""Pipeline schedules as data: which action each stage runs at each tick, checked when built.

A job is one micro-batch m through one chunk r of a stage's layers (chunk r of stage s is the
model's chunk r * P + s, `StageLayout`); job id r * M + m. Each tick has three action slots, run in
this order by every stage: F (forward of a job), B (its backward: with `split`, the input gradient
only) and W (the weight gradient of a job whose B has run; only `split` schedules have W's). A
table is [3, P, ticks]: the job id in each slot, -1 when the slot is idle.

- `gpipe` and `circular` are one rule: at tick t stage s runs F of job k = t - s (v = 1 is GPipe;
  job k is micro-batch k % M in repeat k // M). Their backward is `jax.grad` of the forward scan,
  which runs the same ticks in reverse: the table shows it so, after the forward ticks.
- `1f1b` and `interleaved_1f1b` (v = `repeats` chunks per stage) fuse one F and one B into every
  steady-state tick, Megatron's order: F's go through the chunks in groups of P micro-batches,
  B's through the chunks in reverse. The last stage runs the last chunk's F, the loss and that
  job's B in one tick, so in lockstep a job's activation reaches stage s + 1 and its cotangent
  stage s - 1 one tick later, and stage s holds at most 2 (P - s) - 1 jobs' activations, however
  many micro-batches there are (textbook 1F1B holds P - s; each hop here lasts a whole tick).
- `zb_h1` is `1f1b` with the backward split (Qi et al., ICLR 2024): B computes the input gradient,
  which the previous stage waits for, and W the weight gradient, which nobody waits for. W's are
  deferred while they would make their tick the slowest (the ramp where stage 0 still only runs
  F's) and run where the stage has time (the ramp-down), with at most P pending per stage.

Every tick lasts as long as its slowest stage (`lockstep_cost`), so tables are built for even
ticks, and `check_table` rejects any table whose actions run before their inputs exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from jaxpar.errors import JaxparError
from jaxpar.schedule_rules import check_schedule_counts, check_schedule_stages, schedule_rule

F, B, W = 0, 1, 2
KINDS = "FBW"


class ScheduleError(JaxparError):
    """A table that cannot run: the message names the stage, the tick and the action."""


@dataclass(frozen=True)
class Schedule:
    name: str
    stages: int
    microbatches: int
    repeats: int = 1

    def __post_init__(self) -> None:
        p, m, v = self.stages, self.microbatches, self.repeats
        try:  # the rules of `jaxpar.schedule_rules`, stated there once
            check_schedule_counts(self.name, m, v)
            check_schedule_stages(self.name, p, m)
        except JaxparError as e:
            raise ScheduleError(str(e)) from None
        check_table(self.jobs, p, m, v, split=self.split, hand=self.hand_backward)

    # -- what kind of program ------------------------------------------------------------------

    @property
    def hand_backward(self) -> bool:
        """The step runs this table's B and W ticks itself (else: `jax.grad` of the F ticks)."""
        return schedule_rule(self.name).hand_backward

    @property
    def split(self) -> bool:
        """B computes input gradients only; W ticks compute the weight gradients."""
        return schedule_rule(self.name).split

    def forward(self) -> Schedule:
        """The forward-only table for this layout: itself for gpipe and circular; for the
        schedules with their own backward, gpipe (v = 1) or circular over the same chunks, what
        evaluation runs (a forward needs no B ticks)."""
        if not self.hand_backward:
            return self
        name = "gpipe" if self.repeats == 1 else "circular"
        return Schedule(name, self.stages, self.microbatches, self.repeats)

    # -- the table -----------------------------------------------------------------------------

    def job(self, job: int) -> tuple[int, int]:
        """(micro-batch, chunk) of a job id."""
        return job % self.microbatches, job // self.microbatches

    @cached_property
    def jobs(self) -> np.ndarray:
        """[3, P, ticks] int: the job in each stage's F, B and W slot at each tick, -1 if idle."""
        p, m, v = self.stages, self.microbatches, self.repeats
        if not self.hand_backward:
            forward = _circular(p, m, v)
            return np.stack([
                np.concatenate([forward, np.full_like(forward, -1)], axis=1),
                np.concatenate([np.full_like(forward, -1), forward[:, ::-1]], axis=1),
                np.full((p, 2 * forward.shape[1]), -1),
            ])  # fmt: skip
        table = _interleaved(p, m, v)
        if self.split:
            table = _defer_weight_grads(table, cap=p)
        return table

    @property
    def ticks(self) -> int:
        """Scan trips of the program: the forward ticks for gpipe and circular (their backward
        is the transposed scan), every tick otherwise."""
        if self.hand_backward:
            return self.jobs.shape[-1]
        return self.repeats * self.microbatches + self.stages - 1

    def table(self) -> np.ndarray:
        """[P, ticks] int: the forward job each stage runs at each forward tick, -1 when idle
        (gpipe and circular)."""
        return self.jobs[F][:, : self.ticks]

    @property
    def bubble(self) -> float:
        """The textbook bubble with equal F, B and W costs: (P - 1) / (v * M + P - 1), and for
        ZB-H1 (P - 1) / (3 M + P - 1) (its ramps lose F + B - W instead of F + B + W)."""
        p, m, v = self.stages, self.microbatches, self.repeats
        if self.split:
            return (p - 1) / (3 * m + p - 1)
        return (p - 1) / (v * m + p - 1)

    def lockstep_cost(self, f: float, b: float, w: float) -> float:
        """A step's time when every tick lasts as long as its slowest stage: the sum over ticks
        of the largest per-stage work. f, b, w: one job's (one chunk's) F, B and W costs; for
        schedules without W ticks, B is charged b + w."""
        costs = np.array([f, b if self.split else b + w, w])[:, None, None]
        work = ((self.jobs >= 0) * costs).sum(axis=0)  # [P, ticks]
        return float(work.max(axis=0).sum())

    def lockstep_bubble(self, f: float, b: float, w: float) -> float:
        """1 - ideal / lockstep cost, ideal = every stage busy all the time."""
        ideal = self.repeats * self.microbatches * (f + b + w)
        return 1.0 - ideal / self.lockstep_cost(f, b, w)

    @cached_property
    def routes(self) -> Routes:
        return _route(self)

    @property
    def stash_slots(self) -> int:
        """Jobs whose forward state one stage keeps at once, at the peak (the stash ring)."""
        return self.routes.slots["stash"]

    def describe(self) -> str:
        text = (
            f"{self.name} schedule: {self.microbatches} micro-batches over {self.stages} stages"
            + (f" x {self.repeats} repeats" if self.repeats > 1 else "")
            + f", {self.ticks} ticks, bubble {self.bubble:.1%}"
        )
        if self.hand_backward:
            text += f", stash {self.stash_slots} jobs"
        return text


def _circular(p: int, m: int, v: int) -> np.ndarray:
    """[P, v M + P - 1]: stage s runs job t - s at tick t."""
    k = np.arange(v * m + p - 1)[None, :] - np.arange(p)[:, None]
    return np.where((k >= 0) & (k < v * m), k, -1)


def _interleaved(p: int, m: int, v: int) -> np.ndarray:
    """1F1B (v = 1) and interleaved 1F1B with fused F + B ticks.

    The i-th F of every stage is job (group i // (P v), chunk (i // P) % v, micro-batch
    (i // (P v)) P + i % P), run at tick i + s; its i-th B is the same order with the chunks
    reversed, at tick (v P - 1) + i + (P - 1 - s). The offset v P - 1 puts the last chunk's B on
    the last stage in the tick of its F."""
    i = np.arange(v * m)
    group, micro = i // (p * v), (i // (p * v)) * p + i % p
    f_jobs = ((i // p) % v) * m + micro
    b_jobs = (v - 1 - (i // p) % v) * m + micro
    ticks = v * p - 1 + v * m + p - 1
    table = np.full((3, p, ticks), -1)
    for s in range(p):
        table[F, s, i + s] = f_jobs
        table[B, s, v * p - 1 + i + (p - 1 - s)] = b_jobs
    del group
    return table


def _defer_weight_grads(table: np.ndarray, cap: int) -> np.ndarray:
    """Places each B's W, greedily, in the first tick from its B on where the stage has time:
    where F + B + W of the stage stays within the tick's slowest stage (unit costs). A stage
    with `cap` W's pending runs one at once. Ticks are appended for W's left at the end."""
    _, p, ticks = table.shape
    table = np.concatenate([table, np.full((3, p, cap * p), -1)], axis=2)
    load = (table[:2] >= 0).sum(axis=0)  # [P, ticks]: F + B per stage
    pending: list[list[int]] = [[] for _ in range(p)]
    for t in range(table.shape[2]):
        for s in range(p):
            if table[B, s, t] >= 0:
                pending[s].append(int(table[B, s, t]))
        forced = [s for s in range(p) if len(pending[s]) > cap - 1 or t >= ticks]
        slowest = max([load[s, t] + (s in forced) for s in range(p)])
        for s in range(p):
            if pending[s] and (s in forced or load[s, t] + 1 <= slowest):
                table[W, s, t] = pending[s].pop(0)
    used = np.nonzero((table >= 0).any(axis=(0, 1)))[0].max() + 1
    return table[:, :, :used]


def check_table(
    jobs: np.ndarray, stages: int, microbatches: int, repeats: int, *, split: bool, hand: bool
) -> None:
    """Raises ScheduleError unless every action runs after what it needs, once.

    F of job (m, r) on stage s needs the same job's F on the stage before (chunk r - 1 on the last
    stage when s = 0; nothing for r = 0 on stage 0) at an earlier tick. B needs its own F (the
    same tick is fine: F runs first) and the cotangent: the next stage's B of the job at an
    earlier tick, or, for the last chunk on the last stage, its own F (the loss runs between).
    W needs its B (the same tick is fine). Each action runs exactly once.
    """
    p, m, v = stages, microbatches, repeats
    n = v * m
    kinds = (F, B, W) if split else (F, B) if hand else (F,)
    when = np.full((3, p, n), -1)
    for kind, stage, tick in zip(*np.nonzero(jobs >= 0), strict=True):
        job = int(jobs[kind, stage, tick])
        where = (
            f"stage {stage} tick {tick}: {KINDS[kind]} of micro-batch {job % m} chunk {job // m}"
        )
        if kind not in kinds and not hand:
            continue  # gpipe and circular: the backward shown is jax.grad's
        if kind not in kinds:
            raise ScheduleError(f"{where}: this schedule has no {KINDS[kind]} actions")
        if not 0 <= job < n:
            raise ScheduleError(f"{where}: no such job (there are {n})")
        if when[kind, stage, job] >= 0:
            raise ScheduleError(f"{where} runs twice (first at tick {when[kind, stage, job]})")
        when[kind, stage, job] = tick
    for kind in kinds:
        for stage in range(p):
            for job in range(n):
                if when[kind, stage, job] < 0:
                    raise ScheduleError(
                        f"stage {stage}: micro-batch {job % m} chunk {job // m} has no "
                        f"{KINDS[kind]}"
                    )
    for stage in range(p):
        for job in range(n):
            micro, chunk = job % m, job // m

            def where(kind: int, stage: int = stage, job: int = job) -> str:
                return (
                    f"stage {stage} tick {when[kind, stage, job]}: {KINDS[kind]} of micro-batch "
                    f"{job % m} chunk {job // m}"
                )

            source = _upstream(stage, chunk, p)
            if source is not None:
                up = when[F, source[0], source[1] * m + micro]
                if up >= when[F, stage, job]:
                    raise ScheduleError(
                        f"{where(F)} runs before its input arrives (stage {source[0]} computes "
                        f"it at tick {up})"
                    )
            if not hand:
                continue
            if when[B, stage, job] < when[F, stage, job]:
                raise ScheduleError(f"{where(B)} runs before its F (tick {when[F, stage, job]})")
            sink = _downstream(stage, chunk, p, v)
            if sink is not None:
                down = when[B, sink[0], sink[1] * m + micro]
                if down >= when[B, stage, job]:
                    raise ScheduleError(
                        f"{where(B)} runs before its cotangent arrives (stage {sink[0]} "
                        f"computes it at tick {down})"
                    )
            if split and when[W, stage, job] < when[B, stage, job]:
                raise ScheduleError(f"{where(W)} runs before its B (tick {when[B, stage, job]})")


def _upstream(stage: int, chunk: int, p: int) -> tuple[int, int] | None:
    """Where the input of (stage, chunk) comes from: (stage, chunk), None for the embedding."""
    if stage > 0:
        return stage - 1, chunk
    return (p - 1, chunk - 1) if chunk > 0 else None


def _downstream(stage: int, chunk: int, p: int, v: int) -> tuple[int, int] | None:
    """Where the cotangent of (stage, chunk)'s output comes from, None for the loss."""
    if stage < p - 1:
        return stage + 1, chunk
    return (0, chunk + 1) if chunk < v - 1 else None


@dataclass(frozen=True)
class Routes:
    """What the executor reads per tick and stage, all [ticks, P] int32 (-1: nothing).

    Slots index rings in the scan carry, allocated here by replaying the table, so their sizes
    (`slots`) are the peak each ring holds:
    - `act`: activations received and not yet consumed by an F;
    - `ct`: cotangents received (or made by the loss) and not yet consumed by a B;
    - `stash`: what an F keeps for its B;
    - `wstash`: what a B keeps for its W.
    """

    f_micro: np.ndarray
    f_chunk: np.ndarray
    f_src: np.ndarray  # act slot of the input, -1: the embedding
    f_stash: np.ndarray
    f_keep: np.ndarray  # act slot for what arrives at the end of the tick
    head_ct: np.ndarray  # ct slot for the loss's cotangent (last stage, last chunk)
    b_micro: np.ndarray
    b_chunk: np.ndarray
    b_src: np.ndarray
    b_stash: np.ndarray
    b_wstash: np.ndarray
    b_keep: np.ndarray  # ct slot for what arrives at the end of the tick
    w_micro: np.ndarray
    w_chunk: np.ndarray
    w_stash: np.ndarray
    slots: dict[str, int]

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in self.__dict__.items() if k != "slots"}


class _Ring:
    def __init__(self) -> None:
        self.used: set[int] = set()
        self.size = 0

    def take(self) -> int:
        slot = next(i for i in range(len(self.used) + 1) if i not in self.used)
        self.used.add(slot)
        self.size = max(self.size, slot + 1)
        return slot

    def give(self, slot: int) -> None:
        self.used.remove(slot)


def _route(schedule: Schedule) -> Routes:
    """Replays the table tick by tick (F, loss, B, W, then arrivals) on every stage, giving each
    value a ring slot while it is live. For gpipe and circular only the forward ticks count."""
    p, m, v = schedule.stages, schedule.microbatches, schedule.repeats
    jobs = schedule.jobs[:, :, : schedule.ticks]
    ticks = jobs.shape[-1]
    names = [f for f in Routes.__dataclass_fields__ if f != "slots"]
    out = {name: np.full((ticks, p), -1, np.int32) for name in names}
    rings = {name: [_Ring() for _ in range(p)] for name in ("act", "ct", "stash", "wstash")}
    act_at: dict[tuple[int, int], int] = {}  # (stage, job) -> act slot
    ct_at: dict[tuple[int, int], int] = {}
    stash_at: dict[tuple[int, int], int] = {}
    wstash_at: dict[tuple[int, int], int] = {}
    hand = schedule.hand_backward
    for t in range(ticks):
        sent_f, sent_b = {}, {}
        for s in range(p):
            if (job := jobs[F, s, t]) >= 0:
                micro, chunk = job % m, job // m
                out["f_micro"][t, s], out["f_chunk"][t, s] = micro, chunk
                if (s, job) in act_at:
                    out["f_src"][t, s] = slot = act_at.pop((s, job))
                    rings["act"][s].give(slot)
                if hand:
                    out["f_stash"][t, s] = stash_at[s, job] = rings["stash"][s].take()
                if s == p - 1 and chunk == v - 1:
                    if hand:
                        out["head_ct"][t, s] = ct_at[s, job] = rings["ct"][s].take()
                else:
                    sent_f[(s + 1) % p] = job + (m if s == p - 1 else 0)
            if (job := jobs[B, s, t]) >= 0:
                micro, chunk = job % m, job // m
                out["b_micro"][t, s], out["b_chunk"][t, s] = micro, chunk
                out["b_src"][t, s] = slot = ct_at.pop((s, job))
                rings["ct"][s].give(slot)
                out["b_stash"][t, s] = slot = stash_at.pop((s, job))
                rings["stash"][s].give(slot)
                if schedule.split:
                    out["b_wstash"][t, s] = wstash_at[s, job] = rings["wstash"][s].take()
                if s > 0 or chunk > 0:
                    sent_b[(s - 1) % p] = job - (m if s == 0 else 0)
            if (job := jobs[W, s, t]) >= 0:
                out["w_micro"][t, s], out["w_chunk"][t, s] = job % m, job // m
                out["w_stash"][t, s] = slot = wstash_at.pop((s, job))
                rings["wstash"][s].give(slot)
        for s, job in sent_f.items():
            out["f_keep"][t, s] = act_at[s, job] = rings["act"][s].take()
        for s, job in sent_b.items():
            out["b_keep"][t, s] = ct_at[s, job] = rings["ct"][s].take()
    slots = {name: max(r.size for r in ring) for name, ring in rings.items()}
    return Routes(**out, slots=slots)
