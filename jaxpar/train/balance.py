"""Stages of unequal speed: each stage's own work timed on its own devices, the split that
minimises the slowest stage, and a running train state moved onto it.

- `StageTimer`: times each stage's layers (the forward and backward of one micro-batch, with the
  run's real shapes) on the stage's devices alone. `jaxpar bench --stages` and the rebalancer
  read it.
- `propose`: from the stages' times, the split that `choose_split` finds on the cost model's
  per-stage costs (`stage_costs`, with the measured speeds), and whether it is worth a move.
- `Rebalancer`: the training loop's check every `train.rebalance_every` steps. Hysteresis: a
  move needs the same proposal at two checks in a row, so one noisy measurement never moves.
- `move`: the train state onto a new split in device memory: a new placement and trainer, the
  state through the logical layer order (the path a checkpoint restore takes), the step
  compiled. The old state stays until the new one is complete, so a failed move loses nothing.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxpar.distributed import current
from jaxpar.errors import JaxparError
from jaxpar.mesh import DATA, PIPELINE
from jaxpar.model.layout import choose_split
from jaxpar.pipeline.executor import stage_chunk
from jaxpar.pipeline.schedule import stage_costs
from jaxpar.placement import Placement, logical_axes
from jaxpar.train.step import Trainer, TrainState


def check_balanceable(placement: Placement, what: str) -> None:
    """Stage timing needs stages, and layers that run without the `context` axis's collectives."""
    spec = placement.spec
    if spec.pipeline == 1:
        raise JaxparError(f"{what} needs a pipeline (mesh pipeline=1 has one stage)")
    if spec.context > 1:
        raise JaxparError(
            f"{what} does not time stages whose sequence is split over context={spec.context}; "
            "give pipeline.stage_layers or parallel.stage_speeds instead"
        )


class StageTimer:
    """Times each stage's layers alone, on its own devices: the forward and backward of one
    micro-batch ((batch / micro-batches) x seq_len rows over the stage's `data` devices) through
    the stage's real layers, on zero weights of the run's shapes and shardings (their values do
    not change a matmul's time). Each stage's program is compiled once; a process times the
    stages whose devices it holds, and the times are shared with every process."""

    def __init__(self, placement: Placement):
        check_balanceable(placement, "timing stages")
        self.placement = placement
        self._programs: dict[int, tuple[Callable, nnx.State, jax.Array]] = {}

    def submesh(self, stage: int) -> Mesh:
        """The devices of stage `stage`, as a mesh with the same axes (pipeline of size 1)."""
        mesh = self.placement.mesh
        axis = mesh.axis_names.index(PIPELINE)
        devices = np.take(mesh.devices, [stage], axis=axis)
        return Mesh(devices, mesh.axis_names)

    def _program(self, stage: int) -> tuple[Callable, nnx.State, jax.Array]:
        if stage in self._programs:
            return self._programs[stage]
        p = self.placement
        config, mesh = p.config, self.submesh(stage)
        n = p.layout.stage_sizes[stage]
        blocks_graph, blocks_abstract = nnx.split(nnx.merge(p.graphdef, p.abstract_params).blocks)

        def stage_shape(v: nnx.Variable) -> nnx.Variable:
            a = v.get_value()
            return v.replace(jax.ShapeDtypeStruct((1, n, *a.shape[2:]), a.dtype))

        def stage_sharding(v: nnx.Variable) -> nnx.Variable:
            return v.replace(NamedSharding(mesh, p.rules.spec(logical_axes(v))))

        is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
        shapes = jax.tree.map(stage_shape, blocks_abstract, is_leaf=is_var)
        shardings = jax.tree.map(stage_sharding, blocks_abstract, is_leaf=is_var)
        zeros = jax.jit(
            lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes),
            out_shardings=shardings,
        )
        t = config.train
        rows = t.batch_size // p.schedule.microbatches
        h_sharding = NamedSharding(mesh, PartitionSpec(DATA))
        h = jax.jit(
            lambda: jnp.zeros((rows, t.seq_len, config.model.dim), p.dtype),
            out_shardings=h_sharding,
        )
        real = np.ones(n, bool)

        def work(state: nnx.State, h_bTD: jax.Array) -> tuple[jax.Array, Any]:
            blocks = nnx.merge(blocks_graph, state)
            weights = jax.tree.map(lambda a: a[0], blocks.weights(jnp.float32))

            def layer(w, x):
                return blocks.apply(w, x)[0]

            chunk = stage_chunk(layer, 1, n, config.model.remat)
            y, pull = jax.vjp(lambda x, w: chunk(w, jnp.int32(0), real, x), h_bTD, weights)
            return pull(jnp.ones_like(y))  # the input's and the weights' gradients

        with jax.set_mesh(mesh):
            program = (jax.jit(work), zeros(), h())
        self._programs[stage] = program
        return program

    def times(self, repeats: int = 3) -> list[float]:
        """Seconds per stage (the median of `repeats` runs after one warm-up run)."""
        mine = jax.process_index()
        out = np.full(self.placement.spec.pipeline, np.nan)
        for stage in range(len(out)):
            mesh = self.submesh(stage)
            if not any(d.process_index == mine for d in mesh.devices.flat):
                continue
            work, state, h = self._program(stage)
            with jax.set_mesh(mesh):
                jax.block_until_ready(work(state, h))
                runs = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    jax.block_until_ready(work(state, h))
                    runs.append(time.perf_counter() - start)
            out[stage] = statistics.median(runs)
        if current().count > 1:
            from jax.experimental import multihost_utils

            out = np.nanmax(multihost_utils.process_allgather(out), axis=0)
        return out.tolist()


@dataclass(frozen=True)
class Proposal:
    """What the measured times say: the current and the best split, and the predicted time of
    each (the slowest stage, in the cost model's units at the measured speeds)."""

    now: tuple[int, ...]
    best: tuple[int, ...]
    now_cost: float
    best_cost: float
    speeds: tuple[float, ...]  # per layer, relative to the fastest stage

    def worth(self, threshold: float) -> bool:
        """The slowest stage now is more than `threshold` above the best split's."""
        return self.best != self.now and self.now_cost > (1 + threshold) * self.best_cost

    def describe(self) -> str:
        slow = int(np.argmin(self.speeds))
        fast = int(np.argmax(self.speeds))
        return (
            f"stages {_text(self.now)} -> {_text(self.best)} (stage {slow} at "
            f"{self.speeds[slow] / self.speeds[fast]:.2f}x stage {fast}'s speed)"
        )


def _text(sizes: Sequence[int]) -> str:
    return ",".join(map(str, sizes))


def propose(placement: Placement, times: Sequence[float],
            max_layers: int | None = None) -> Proposal:  # fmt: skip
    """The split that minimises the slowest stage, from each stage's measured time for its
    current layers: the measured time per layer gives each stage's speed, and the cost model
    (`stage_costs`) adds the embedding, head and loss where the schedule runs them."""
    config, layout = placement.config, placement.layout
    now = layout.stage_sizes
    per_layer = [t / n for t, n in zip(times, now, strict=True)]
    speeds = [min(per_layer) / t for t in per_layer]
    layer_cost, extra = stage_costs(config, len(now), speeds)
    best = choose_split(config.model.layers, layout.repeats, layer_cost, extra, max_layers)

    def cost(sizes: Sequence[int]) -> float:
        return max(n * c + e for n, c, e in zip(sizes, layer_cost, extra, strict=True))

    return Proposal(tuple(now), best, cost(now), cost(best), tuple(speeds))


def max_stage_layers(trainer: Trainer) -> int | None:
    """The most layers a stage can hold within its devices' memory (None where the backend
    does not say): every stage stores as many layer slots as the largest chunk, so the peak of
    the compiled step grows by one slot's train state and gradient per added slot. An estimate,
    with a tenth of the memory kept free; the same on every process (the smallest)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    cap = -1  # unknown
    if "bytes_limit" in stats:
        analysis = trainer.compile()[0].memory_analysis()
        peak = analysis.temp_size_in_bytes + analysis.argument_size_in_bytes
        layout = trainer.placement.layout
        slots = layout.slots_per_stage
        state_bytes = sum(
            np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
            for x in jax.tree.leaves(trainer.abstract_state())
        )
        slot_bytes = 2 * state_bytes / slots  # the state and a gradient, per slot (a bound)
        room = 0.9 * stats["bytes_limit"] - peak
        cap = (slots + max(0, int(room // slot_bytes))) // layout.repeats * layout.repeats
    if current().count > 1:
        from jax.experimental import multihost_utils

        caps = multihost_utils.process_allgather(np.int64(cap))
        cap = -1 if np.any(caps < 0) else int(caps.min())
    return None if cap < 0 else cap


@dataclass
class Rebalancer:
    """The loop's check every `every` steps: `measure(trainer)` gives each stage's time, and a
    proposal worth more than `threshold` moves once the same one is seen twice in a row."""

    every: int
    threshold: float
    measure: Callable[[Trainer], Sequence[float]]
    seen: tuple[int, ...] | None = None
    times: Sequence[float] = ()  # the last check's, for the trackers

    def due(self, done: int, last: int) -> bool:
        return self.every > 0 and done % self.every == 0 and done < last

    def check(self, trainer: Trainer) -> Proposal | None:
        """The proposal to act on now, or None."""
        self.times = self.measure(trainer)
        proposal = propose(trainer.placement, self.times, max_stage_layers(trainer))
        target = proposal.best if proposal.worth(self.threshold) else None
        confirmed = target is not None and target == self.seen
        self.seen = None if confirmed else target
        return proposal if confirmed else None


def timed_stages() -> Callable[[Trainer], list[float]]:
    """A `Rebalancer.measure` that times the stages (`StageTimer`, a new one after a move)."""
    timer: StageTimer | None = None

    def measure(trainer: Trainer) -> list[float]:
        nonlocal timer
        if timer is None or timer.placement is not trainer.placement:
            timer = StageTimer(trainer.placement)
        return timer.times()

    return measure


def move(trainer: Trainer, state: TrainState,
         sizes: Sequence[int]) -> tuple[Trainer, TrainState]:  # fmt: skip
    """`state` moved onto a split of `sizes` layers per stage, with its trainer, its step
    compiled. `state` is neither donated nor changed."""
    source = trainer.placement
    config = source.config.replace(**{"pipeline.stage_layers": list(sizes)})
    moved = Trainer(Placement(config, source.mesh))
    new_state = moved.placement.relayout(state, source, moved.state_shardings)
    moved.compile()
    return moved, jax.block_until_ready(new_state)
