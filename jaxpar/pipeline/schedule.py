"""Pipeline schedules as data: which action each stage runs at each tick, checked when built.

A job is one micro-batch m through one chunk r of a stage's layers (which of the model's chunks
that is: `jaxpar.model.layout.chunk_places`, circular or V-shaped); job id r * M + m. Each tick
has three action slots, run in this order by every stage: F (forward of a job), B (its backward:
with `split`, the input gradient only) and W (the weight gradient of a job whose B has run). A
table is [3, P, ticks]: the job in each slot, -1 when the slot is idle.

- `gpipe` and `circular` are one rule: at tick t stage s runs F of job k = t - s (v = 1 is GPipe;
  job k is micro-batch k % M in repeat k // M). Their backward is `jax.grad` of the forward scan,
  which runs the same ticks in reverse: the table shows it so, after the forward ticks.
- The schedules with their own backward run ticks of one of two granularities (`tick`):
  - `single`: one action per stage per tick, F, B or W, with the backward always split (B the
    input gradient, W the weight gradient). With F, B and W of about equal cost every tick is
    as long on every stage, so lockstep ticks cost what asynchronous stages cost, and a value
    reaches the next stage one action later. Built by `_single`, a lockstep list scheduler: at
    each tick each stage runs a W that may wait no longer, else a B whose cotangent is there,
    else an F whose input is there (while fewer than its limit of jobs wait for their B), else a
    pending W, else nothing. `1f1b` runs each W right after its B and lets stage s hold P - s
    jobs; `zb_h1` (Qi et al., ICLR 2024) defers W's into the ticks a stage would idle, at most P
    pending; `zb_v` (the same paper's V schedule) holds the chunks s and 2P - 1 - s on stage s,
    so the loss is on stage 0, and lets a stage hold 2P half-size jobs, 1F1B's activations.
  - `fused`: one F and one B in every steady-state tick, Megatron's order (`interleaved_1f1b`,
    and `1f1b` or `zb_h1` where B costs much more than F or W): F's go through the chunks in
    groups of P micro-batches, B's through the chunks in reverse; a hop lasts a whole fused tick,
    so stage s holds up to 2 (P - s) - 1 jobs. zb_h1's W's run where they do not lengthen the
    tick (`_defer_weight_grads`).
  `tick="auto"` takes whichever of the two a schedule allows costs less in lockstep with one
  job's F, B and W costs (`costs`: from the model's shapes, `jaxpar.model.flops.job_costs`).

Every tick lasts as long as its slowest stage (`lockstep_cost`), and `check_table` rejects any
table whose actions run before their inputs exist.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache, cached_property

import numpy as np

from jaxpar.config import Config
from jaxpar.errors import JaxparError
from jaxpar.model.flops import job_costs, top_costs
from jaxpar.model.layout import StageLayout, choose_split, chunk_places
from jaxpar.schedule_rules import (
    check_schedule_counts,
    check_schedule_stages,
    check_schedule_tick,
    schedule_rule,
)

F, B, W = 0, 1, 2
KINDS = "FBW"
CHANNELS = ("up", "down", "self")  # to stage s + 1, to stage s - 1, kept on stage s


class ScheduleError(JaxparError):
    """A table that cannot run: the message names the stage, the tick and the action."""


@dataclass(frozen=True)
class Schedule:
    """A schedule's table for P stages, M micro-batches and v chunks per stage.

    Args:
        tick: `single`, `fused` or `auto` (see the module docstring); `forward`: the forward
            ticks alone, what `forward()` returns for evaluation.
        costs: one job's F, B (input gradient) and W costs, relative; they choose the tick
            granularity where `tick` is `auto`.
    """

    name: str
    stages: int
    microbatches: int
    repeats: int = 1
    tick: str = "auto"
    costs: tuple[float, float, float] = field(default=(1.0, 1.0, 1.0))

    def __post_init__(self) -> None:
        p, m, v = self.stages, self.microbatches, self.repeats
        try:  # the rules of `jaxpar.schedule_rules`, stated there once
            check_schedule_counts(self.name, m, v)
            check_schedule_stages(self.name, p, m)
            if self.tick != "forward":
                check_schedule_tick(self.name, self.tick)
        except JaxparError as e:
            raise ScheduleError(str(e)) from None
        check_table(self.jobs, p, m, v, split=self.split, hand=self.hand_backward,
                    places=self.places)  # fmt: skip
        _ = self.routes  # sends that collide are refused here too

    # -- what kind of program ------------------------------------------------------------------

    @property
    def hand_backward(self) -> bool:
        """The step runs this table's B and W ticks itself (else: `jax.grad` of the F ticks)."""
        return schedule_rule(self.name).hand_backward and self.tick != "forward"

    @property
    def granularity(self) -> str:
        """`forward` (the F ticks of gpipe, circular and evaluation), `single` or `fused`."""
        return self._chosen[0]

    @cached_property
    def _chosen(self) -> tuple[str, np.ndarray | None]:
        """The tick granularity and, for the schedules with their own backward, its table."""
        rule = schedule_rule(self.name)
        if not self.hand_backward:
            return "forward", None
        if rule.ticks != "either":
            return rule.ticks, self._table(rule.ticks)
        if self.tick != "auto":
            return self.tick, self._table(self.tick)
        f, b, w = self.costs
        single, fused = self._table("single"), self._table("fused")
        fused_costs = (f, b, w) if rule.zero_bubble else (f, b + w, 0)
        if _cost(single, (f, b, w)) <= _cost(fused, fused_costs):
            return "single", single
        return "fused", fused

    @property
    def split(self) -> bool:
        """B computes input gradients only; W ticks compute the weight gradients."""
        return self.hand_backward and (
            schedule_rule(self.name).zero_bubble or self.granularity == "single"
        )

    @cached_property
    def places(self) -> list[tuple[int, int]]:
        """(stage, repeat) of each of the model's chunks, in order."""
        shape = schedule_rule(self.name).shape
        return chunk_places(self.stages, self.repeats, shape)

    @property
    def shape(self) -> str:
        return schedule_rule(self.name).shape

    def forward(self) -> Schedule:
        """The forward-only table for this layout: itself for gpipe and circular; for the
        schedules with their own backward, gpipe (v = 1) or circular over the same chunks, or the
        V's forward ticks, what evaluation runs (a forward needs no B ticks)."""
        if not self.hand_backward:
            return self
        if self.shape == "v":
            return Schedule(self.name, self.stages, self.microbatches, self.repeats, "forward")
        name = "gpipe" if self.repeats == 1 else "circular"
        return Schedule(name, self.stages, self.microbatches, self.repeats)

    # -- the table -----------------------------------------------------------------------------

    def job(self, job: int) -> tuple[int, int]:
        """(micro-batch, chunk) of a job id."""
        return job % self.microbatches, job // self.microbatches

    @cached_property
    def jobs(self) -> np.ndarray:
        """[3, P, ticks] int: the job in each stage's F, B and W slot at each tick, -1 if idle."""
        if self.hand_backward:
            return self._chosen[1]
        p, m, v = self.stages, self.microbatches, self.repeats
        if self.shape == "v":
            forward = _single(self.places, m, limit=[p] * p, defer=False, cap=0, backward=False)[F]
        else:
            forward = _circular(p, m, v)
        return np.stack([
            np.concatenate([forward, np.full_like(forward, -1)], axis=1),
            np.concatenate([np.full_like(forward, -1), forward[:, ::-1]], axis=1),
            np.full((p, 2 * forward.shape[1]), -1),
        ])  # fmt: skip

    def _table(self, granularity: str) -> np.ndarray:
        p, m, v = self.stages, self.microbatches, self.repeats
        rule = schedule_rule(self.name)
        if granularity == "fused":
            table = _interleaved(p, m, v)
            return _defer_weight_grads(table, cap=p) if rule.zero_bubble else table
        if self.shape == "v":  # 2P half-size jobs: the activations of 1F1B's P
            return _single(self.places, m, limit=[2 * p] * p, defer=True, cap=p)
        limit = [p - s for s in range(p)]
        return _single(self.places, m, limit=limit, defer=rule.zero_bubble, cap=p)

    @property
    def ticks(self) -> int:
        """Scan trips of the program: the forward ticks for gpipe and circular (their backward
        is the transposed scan), every tick otherwise."""
        if self.hand_backward:
            return self.jobs.shape[-1]
        return self.jobs.shape[-1] // 2

    def table(self) -> np.ndarray:
        """[P, ticks] int: the forward job each stage runs at each forward tick, -1 when idle
        (gpipe and circular)."""
        return self.jobs[F][:, : self.ticks]

    @property
    def bubble(self) -> float:
        """The textbook bubble with equal F, B and W costs: (P - 1) / (v M + P - 1), and for
        the zero-bubble schedules (P - 1) / (3 v M + P - 1) (their ramps lose F + B - W instead
        of F + B + W; ZB-V's only loss is stage P - 1 waiting P - 1 ticks for its first input)."""
        p, m, v = self.stages, self.microbatches, self.repeats
        if schedule_rule(self.name).zero_bubble:
            return (p - 1) / (3 * v * m + p - 1)
        return (p - 1) / (v * m + p - 1)

    def lockstep_cost(self, f: float, b: float, w: float, layers: Sequence[int] | None = None,
                      speeds: Sequence[float] | None = None,
                      ends: tuple[float, float] | None = None) -> float:  # fmt: skip
        """A step's time when every tick lasts as long as its slowest stage: the sum over ticks
        of the largest per-stage work (`charges`; for schedules without W ticks, B is charged
        b + w).

        Args:
            f, b, w: one job's F, B and W costs: of one chunk, or with `layers` of one layer.
            layers: the real layers of each of the model's chunks, in order
                (`StageLayout.chunk_sizes`): a job costs its chunk's layers times f, b or w.
            speeds: each stage's relative speed: its work takes 1 / speed as long.
            ends: one job's embedding (forward and weight gradient, one contraction each) and
                LM head with the loss (forward and backward), charged where the schedules with
                their own backward run them: the embedding's halves in the first chunk's F and B,
                the head in the last chunk's F tick. gpipe and circular run them outside the
                ticks, shared by all stages: not charged here.
        """
        charges = self.charges(f, b, w, layers, ends)
        if speeds is not None:
            charges = charges / np.asarray(speeds, float)[None, :, None]
        return _cost(self.jobs, charges)

    def lockstep_bubble(self, f: float, b: float, w: float, layers: Sequence[int] | None = None,
                        speeds: Sequence[float] | None = None,
                        ends: tuple[float, float] | None = None) -> float:  # fmt: skip
        """1 - ideal / lockstep cost (arguments as `lockstep_cost`), ideal = the work spread over
        the stages by their speeds, every stage busy all the time."""
        work = float(np.where(self.jobs >= 0, self.charges(f, b, w, layers, ends), 0).sum())
        ideal = work / (sum(speeds) if speeds is not None else self.stages)
        return 1.0 - ideal / self.lockstep_cost(f, b, w, layers, speeds, ends)

    def charges(self, f: float, b: float, w: float, layers: Sequence[int] | None = None,
                ends: tuple[float, float] | None = None) -> np.ndarray:  # fmt: skip
        """[3, P, ticks] (or [3, 1, 1] with neither `layers` nor `ends`): the work of each slot
        of the table, where it runs a job (arguments as `lockstep_cost`)."""
        costs = np.asarray((f, b, w) if self.split else (f, b + w, 0), float)[:, None, None]
        if layers is None and ends is None:
            return costs
        p, m = self.stages, self.microbatches
        chunk_SV = np.zeros((p, self.repeats), np.int64)  # the model's chunk of (stage, repeat)
        for j, (s, r) in enumerate(self.places):
            chunk_SV[s, r] = j
        chunk = chunk_SV[np.arange(p)[None, :, None], np.maximum(self.jobs, 0) // m]
        charges = costs * (np.asarray(layers, float)[chunk] if layers is not None else 1.0)
        if ends is not None and self.hand_backward:
            embed, head = ends
            embed_K, head_K = (np.array(k, float)[:, None, None] for k in
                               ((embed / 2, embed / 2, 0), (head, 0, 0)))  # fmt: skip
            charges = charges + embed_K * (chunk == 0) + head_K * (chunk == len(self.places) - 1)
        return charges

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
            text += f", {self.granularity} ticks, stash {self.stash_slots} jobs"
        return text


def schedule_for(config: Config, stages: int) -> Schedule:
    """The schedule a run of `config` on `stages` pipeline stages runs: the config's pipeline
    settings, with the model's per-job F, B and W FLOPs choosing the tick granularity."""
    pipe = config.pipeline
    costs = job_costs(config.model, config.train.seq_len)
    return _schedule(pipe.schedule, stages, pipe.microbatches, pipe.repeats, pipe.tick, costs)


@cache
def _schedule(name: str, stages: int, microbatches: int, repeats: int, tick: str,
              costs: tuple[float, float, float]) -> Schedule:  # fmt: skip
    """A schedule is immutable: each distinct table is built (and checked) once per process,
    however many configs share it (`jaxpar plan` prices thousands)."""
    return Schedule(name, stages, microbatches, repeats, tick, costs)


def layout_for(config: Config, stages: int) -> StageLayout:
    """Which layers each of `stages` stages holds in a run of `config` (V-shaped for zb_v):
    `pipeline.stage_layers` balanced, as listed, or (auto) `auto_split`'s."""
    pipe = config.pipeline
    split = pipe.split
    if split == "balanced" or stages == 1:
        sizes = None
    elif split == "auto":
        sizes = auto_split(config, stages, schedule_for(config, stages))
    else:
        sizes = split
    return _layout(config, stages, sizes)


def _layout(config: Config, stages: int, sizes: tuple[int, ...] | None) -> StageLayout:
    pipe = config.pipeline
    shape = schedule_rule(pipe.schedule).shape
    return StageLayout(config.model.layers, stages, pipe.repeats, shape, sizes)


def auto_split(config: Config, stages: int, schedule: Schedule) -> tuple[int, ...] | None:
    """`pipeline.stage_layers=auto`, and the split `jaxpar plan` proposes: `split_costs`'s
    layers per stage where they lower the step's lockstep cost below the balanced split's; None
    (balanced) where they do not."""
    sizes, even, cost = split_costs(config, stages, schedule)
    return sizes if cost < even else None


def split_costs(
    config: Config, stages: int, schedule: Schedule
) -> tuple[tuple[int, ...], float, float]:
    """(sizes, even, cost): the layers per stage `choose_split` finds for the cost model's
    `stage_costs`, and the `layout_cost` of the balanced split and of that one."""
    sizes = choose_split(config.model.layers, config.pipeline.repeats,
                         *stage_costs(config, stages))  # fmt: skip
    even = layout_cost(config, schedule, _layout(config, stages, None))
    return sizes, even, layout_cost(config, schedule, _layout(config, stages, sizes))


def layout_cost(config: Config, schedule: Schedule, layout: StageLayout) -> float:
    """The lockstep cost of a step of `config` on `layout` (`Schedule.lockstep_cost`), in matmul
    FLOPs per token of one micro-batch: each job's per-layer F, B and W (`job_costs`) times its
    chunk's real layers, the embedding and the LM head with the loss where the schedule runs
    them (`top_costs`), each stage at its `parallel.stage_speeds`."""
    f, b, w = job_costs(config.model, config.train.seq_len)
    return schedule.lockstep_cost(f, b, w, layout.chunk_sizes, config.parallel.speeds,
                                  top_costs(config.model))  # fmt: skip


def stage_costs(
    config: Config, stages: int, speeds: Sequence[float] | None = None
) -> tuple[list[float], list[float]]:
    """Per stage, the time of one layer and of the rest of its work (FLOPs per token over its
    speed, `parallel.stage_speeds` unless `speeds` is given): for the schedules with their own
    backward, the embedding runs on the first chunk's stage and the head and loss on the last
    chunk's (for gpipe and circular they run outside the stages, shared by all)."""
    speeds = speeds or config.parallel.speeds or [1.0] * stages
    f, b, w = job_costs(config.model, config.train.seq_len)
    extra = [0.0] * stages
    rule = schedule_rule(config.pipeline.schedule)
    if rule.hand_backward:
        places = chunk_places(stages, config.pipeline.repeats, rule.shape)
        embed, head = top_costs(config.model)
        extra[places[0][0]] += embed
        extra[places[-1][0]] += head
    return [(f + b + w) / s for s in speeds], [e / s for e, s in zip(extra, speeds, strict=True)]


def _cost(jobs: np.ndarray, charges: np.ndarray | tuple[float, float, float]) -> float:
    """The sum over ticks of the busiest stage's work; `charges`: each slot's work, [3, P,
    ticks], or one job's F, B and W costs on every stage."""
    charges = np.asarray(charges, float)
    if charges.ndim == 1:
        charges = charges[:, None, None]
    work = np.where(jobs >= 0, charges, 0.0).sum(axis=0)  # [P, ticks]
    return float(work.max(axis=0).sum())


def _circular(p: int, m: int, v: int) -> np.ndarray:
    """[P, v M + P - 1]: stage s runs job t - s at tick t."""
    k = np.arange(v * m + p - 1)[None, :] - np.arange(p)[:, None]
    return np.where((k >= 0) & (k < v * m), k, -1)


def _single(places: list[tuple[int, int]], m: int, *, limit: list[int], defer: bool, cap: int,
            backward: bool = True) -> np.ndarray:  # fmt: skip
    """One action per stage per tick, in lockstep: a list scheduler.

    At each tick each stage runs the first of: a W that may wait no longer (`defer` False: any
    pending W, right after its B; else when `cap` are pending); a B whose cotangent has arrived;
    an F whose input has arrived, while fewer than `limit[s]` jobs wait for their B; a pending
    W; nothing. Among B's and F's it takes the deepest chunk first (the one nearest the loss),
    then the lowest micro-batch. A value made at tick t is usable from tick t + 1. `backward`
    False: F's alone (the forward ticks of evaluation)."""
    p, n = max(s for s, _ in places) + 1, len(places)
    chunk_of = {place: j for j, place in enumerate(places)}
    never = np.iinfo(np.int64).max
    done = np.full((3, n, m), never)  # tick each action ran: [kind, model chunk, micro-batch]
    left_f = [{(r, i) for (st, r) in places if st == s for i in range(m)} for s in range(p)]
    left_b = [set(jobs) if backward else set() for jobs in left_f]
    waiting, pending = [0] * p, [[] for _ in range(p)]

    def ready(kind: int, s: int, job: tuple[int, int], t: int) -> bool:
        j, i = chunk_of[s, job[0]], job[1]
        if kind == F:
            return j == 0 or done[F, j - 1, i] < t
        return done[F, j, i] < t and (j == n - 1 or done[B, j + 1, i] < t)

    def first(s: int, jobs: list[tuple[int, int]]) -> tuple[int, int]:
        """The deepest chunk's job, then the lowest micro-batch's."""
        return min(jobs, key=lambda job: (-chunk_of[s, job[0]], job[1]))

    rows = []
    t = 0
    while any(left_f) or any(left_b) or any(pending):
        row = np.full((3, p), -1)
        for s in range(p):
            action = None
            b_ready = [job for job in left_b[s] if ready(B, s, job, t)]
            f_ready = [job for job in left_f[s] if ready(F, s, job, t)]
            if pending[s] and (not defer or len(pending[s]) >= cap):
                action = W, pending[s].pop(0)
            elif b_ready:
                action = B, first(s, b_ready)
            elif waiting[s] < limit[s] and f_ready:
                action = F, first(s, f_ready)
            elif pending[s]:
                action = W, pending[s].pop(0)
            if action is None:
                continue
            kind, (r, i) = action
            row[kind, s] = r * m + i
            done[kind, chunk_of[s, r], i] = t
            if kind == F:
                left_f[s].remove((r, i))
                waiting[s] += backward
            elif kind == B:
                left_b[s].remove((r, i))
                waiting[s] -= 1
                pending[s].append((r, i))
        if (row < 0).all():
            raise ScheduleError(f"tick {t}: no stage can run an action (the table is stuck)")
        rows.append(row)
        t += 1
    return np.stack(rows, axis=-1)


def _interleaved(p: int, m: int, v: int) -> np.ndarray:
    """1F1B (v = 1) and interleaved 1F1B with fused F + B ticks.

    The i-th F of every stage is job (group i // (P v), chunk (i // P) % v, micro-batch
    (i // (P v)) P + i % P), run at tick i + s; its i-th B is the same order with the chunks
    reversed, at tick (v P - 1) + i + (P - 1 - s). The offset v P - 1 puts the last chunk's B on
    the last stage in the tick of its F."""
    i = np.arange(v * m)
    micro = (i // (p * v)) * p + i % p
    f_jobs = ((i // p) % v) * m + micro
    b_jobs = (v - 1 - (i // p) % v) * m + micro
    ticks = v * p - 1 + v * m + p - 1
    table = np.full((3, p, ticks), -1)
    for s in range(p):
        table[F, s, i + s] = f_jobs
        table[B, s, v * p - 1 + i + (p - 1 - s)] = b_jobs
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
    jobs: np.ndarray,
    stages: int,
    microbatches: int,
    repeats: int,
    *,
    split: bool,
    hand: bool,
    places: list[tuple[int, int]] | None = None,
) -> None:
    """Raises ScheduleError unless every action runs after what it needs, once.

    F of job (m, r) on stage s needs the same micro-batch's F of the model's previous chunk
    (`places`: where each chunk runs; circular by default) at an earlier tick (nothing for the
    first chunk). B needs its own F (the same tick is fine: F runs first) and the cotangent: the
    next chunk's B at an earlier tick, or, for the last chunk, its own F (the loss runs between).
    W needs its B (the same tick is fine). Each action runs exactly once.
    """
    p, m, v = stages, microbatches, repeats
    places = places or chunk_places(p, v)
    chunk_of = {place: j for j, place in enumerate(places)}
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
            j = chunk_of[stage, chunk]

            def where(kind: int, stage: int = stage, job: int = job) -> str:
                return (
                    f"stage {stage} tick {when[kind, stage, job]}: {KINDS[kind]} of micro-batch "
                    f"{job % m} chunk {job // m}"
                )

            if j > 0:
                up_stage, up_chunk = places[j - 1]
                up = when[F, up_stage, up_chunk * m + micro]
                if up >= when[F, stage, job]:
                    raise ScheduleError(
                        f"{where(F)} runs before its input arrives (stage {up_stage} computes "
                        f"it at tick {up})"
                    )
            if not hand:
                continue
            if when[B, stage, job] < when[F, stage, job]:
                raise ScheduleError(f"{where(B)} runs before its F (tick {when[F, stage, job]})")
            if j < len(places) - 1:
                down_stage, down_chunk = places[j + 1]
                down = when[B, down_stage, down_chunk * m + micro]
                if down >= when[B, stage, job]:
                    raise ScheduleError(
                        f"{where(B)} runs before its cotangent arrives (stage {down_stage} "
                        f"computes it at tick {down})"
                    )
            if split and when[W, stage, job] < when[B, stage, job]:
                raise ScheduleError(f"{where(W)} runs before its B (tick {when[B, stage, job]})")


@dataclass(frozen=True)
class Routes:
    """What the executor reads per tick and stage, all [ticks, P] int32 (-1: nothing).

    Slots index rings in the scan carry, allocated here by replaying the table, so their sizes
    (`slots`) are the peak each ring holds:
    - `inbox`: values waiting for an action: activations received and not yet consumed by an F,
      cotangents received (or made by the loss) and not yet consumed by a B;
    - `stash`: what an F keeps for its B;
    - `wstash`: what a B keeps for its W.

    At the end of a tick each stage sends its F's output or its B's input gradient (`send_*`:
    0 nothing, 1 + F or 1 + B) over up to three channels (`CHANNELS`): to stage s + 1, to s - 1,
    or to itself (the turn of a V); what arrives over a channel goes into inbox slot `keep_*`.
    `channels`: per channel used, the kinds of value it ever carries.
    """

    f_micro: np.ndarray
    f_chunk: np.ndarray
    f_src: np.ndarray  # inbox slot of the input, -1: the embedding
    f_stash: np.ndarray
    head_ct: np.ndarray  # inbox slot for the loss's cotangent (the last chunk)
    b_micro: np.ndarray
    b_chunk: np.ndarray
    b_src: np.ndarray
    b_stash: np.ndarray
    b_wstash: np.ndarray
    w_micro: np.ndarray
    w_chunk: np.ndarray
    w_stash: np.ndarray
    send_up: np.ndarray
    send_down: np.ndarray
    send_self: np.ndarray
    keep_up: np.ndarray  # inbox slot for what arrives from stage s - 1
    keep_down: np.ndarray  # from stage s + 1
    keep_self: np.ndarray
    slots: dict[str, int]
    channels: dict[str, frozenset[int]]

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in self.__dict__.items() if k not in ("slots", "channels")}


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
    p, m = schedule.stages, schedule.microbatches
    places, circular = schedule.places, schedule.shape == "circular"
    chunk_of = {place: j for j, place in enumerate(places)}
    jobs = schedule.jobs[:, :, : schedule.ticks]
    ticks = jobs.shape[-1]
    names = [f for f in Routes.__dataclass_fields__ if f not in ("slots", "channels")]
    out = {name: np.full((ticks, p), -1, np.int32) for name in names}
    rings = {name: [_Ring() for _ in range(p)] for name in ("inbox", "stash", "wstash")}
    inbox_at: dict[tuple[int, int, int], int] = {}  # (stage, kind waiting, job) -> inbox slot
    stash_at: dict[tuple[int, int], int] = {}
    wstash_at: dict[tuple[int, int], int] = {}
    carried: dict[str, set[int]] = {c: set() for c in CHANNELS}
    hand = schedule.hand_backward

    def send(t: int, s: int, kind: int, j: int, micro: int) -> tuple:
        """Where the output of `kind` on model chunk j goes: (channel, stage, kind waiting, job)."""
        to = j + 1 if kind == F else j - 1
        stage, repeat = places[to]
        if stage == s:
            channel = "self"
        elif circular:
            channel = "up" if kind == F else "down"
        else:  # a V: towards the higher stages on the way down, F of repeat 0 and B of 1
            channel = "up" if (kind == F) == (places[j][1] == 0) else "down"
        if out[f"send_{channel}"][t, s] >= 0:
            raise ScheduleError(
                f"stage {s} tick {t}: two values to send {channel} (one channel carries one)"
            )
        out[f"send_{channel}"][t, s] = 1 + kind
        carried[channel].add(kind)
        return channel, stage, kind, repeat * m + micro

    for t in range(ticks):
        arriving = []
        for s in range(p):
            if (job := jobs[F, s, t]) >= 0:
                micro, chunk = job % m, job // m
                j = chunk_of[s, chunk]
                out["f_micro"][t, s], out["f_chunk"][t, s] = micro, chunk
                if (s, F, job) in inbox_at:
                    out["f_src"][t, s] = slot = inbox_at.pop((s, F, job))
                    rings["inbox"][s].give(slot)
                if hand:
                    out["f_stash"][t, s] = stash_at[s, job] = rings["stash"][s].take()
                if j == len(places) - 1:
                    if hand:
                        out["head_ct"][t, s] = inbox_at[s, B, job] = rings["inbox"][s].take()
                else:
                    arriving.append(send(t, s, F, j, micro))
            if (job := jobs[B, s, t]) >= 0:
                micro, chunk = job % m, job // m
                j = chunk_of[s, chunk]
                out["b_micro"][t, s], out["b_chunk"][t, s] = micro, chunk
                out["b_src"][t, s] = slot = inbox_at.pop((s, B, job))
                rings["inbox"][s].give(slot)
                out["b_stash"][t, s] = slot = stash_at.pop((s, job))
                rings["stash"][s].give(slot)
                if schedule.split:
                    out["b_wstash"][t, s] = wstash_at[s, job] = rings["wstash"][s].take()
                if j > 0:
                    arriving.append(send(t, s, B, j, micro))
            if (job := jobs[W, s, t]) >= 0:
                out["w_micro"][t, s], out["w_chunk"][t, s] = job % m, job // m
                out["w_stash"][t, s] = slot = wstash_at.pop((s, job))
                rings["wstash"][s].give(slot)
        for channel, stage, kind, job in arriving:
            slot = rings["inbox"][stage].take()
            out[f"keep_{channel}"][t, stage] = inbox_at[stage, kind, job] = slot
    slots = {name: max(r.size for r in ring) for name, ring in rings.items()}
    channels = {c: frozenset(k) for c, k in carried.items() if k}
    return Routes(**out, slots=slots, channels=channels)
