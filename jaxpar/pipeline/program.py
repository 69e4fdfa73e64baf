"""The stage program: the one interpreter of a schedule table, for every pass over the stages.

Dimension key: M micro-batches, b rows of one micro-batch, R data replicas held here, P stages,
T sequence, D model dim; X any trailing dimensions.

`StageProgram` is one `jax.shard_map`, manual over `pipeline` (and over `data` where each
replica's rows run alone, `manual_axes`), around `lax.scan` over the ticks of a schedule. Each
tick runs, on every stage, the F slot of its table row, and in programs with their own backward
the loss (after the model's last chunk), the B slot and the W slot; then one `ppermute` hands
what goes to the next stage (an F's output; in a V also a B's input gradient), one what goes to
the previous stage, and what stays on the stage (the turn of a V) is kept. What arrives waits in
one ring of slots, the inbox, as `Schedule.routes` allocated it. The slots are the callers'
(`Slots`):
training's forward under `jax.grad` and evaluation (`executor.run_pipeline`), training with a
hand-written backward (`executor.run_train_program`), and the KV-cached prefill, prompt pieces
and decode of `infer.engine.Generator`. Every device issues the same collectives every tick,
never inside a per-device branch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from jaxpar.mesh import CONTEXT, DATA, PIPELINE
from jaxpar.pipeline.schedule import B, F, Schedule
from jaxpar.sharding import gather_copies

Row = dict[str, jax.Array]  # one tick's routes on this stage: f_micro, f_src, b_chunk, ...


def manual_axes(data: int, fsdp: bool, context: int = 1) -> frozenset[str]:
    """The mesh axes a stage program handles by hand: `pipeline`; `data` unless the weights
    are split over it (FSDP: XLA gathers them per tick, `data` must stay automatic) or it has one
    replica (XLA rejects the replica sum of a size-1 manual axis; there is nothing to sum); and
    `context` when the sequence is split over it, so that attention passes keys between the
    pieces by hand (`jaxpar.model.context`). With `data` manual each replica runs its own rows,
    and the weights' gradients are summed over replicas (and pieces) once, where the program
    ends, instead of once per tick."""
    axes = {PIPELINE} if fsdp or data == 1 else {PIPELINE, DATA}
    return frozenset(axes | ({CONTEXT} if context > 1 else set()))


def replica_axes(manual: frozenset[str]) -> tuple[str, ...]:
    """The manual axes the weights are the same along (`data`, `context`): what their gradients
    are summed over."""
    return tuple(a for a in (DATA, CONTEXT) if a in manual)


def batch_axis(manual: frozenset[str]) -> str | None:
    """The mesh axis rows are split over inside a program manual over `manual` (None: every row
    is on every device)."""
    return DATA if DATA in manual else None


def sequence_axis(manual: frozenset[str]) -> str | None:
    """The mesh axis the sequence is split over inside the program (None: all of it here)."""
    return CONTEXT if CONTEXT in manual else None


def microbatch_count(rows: int, stages: int) -> int:
    """Micro-batches for a forward pass over `rows` (a serving batch, or a prompt's positions):
    one per stage when they divide evenly, so that every stage is busy once the pipeline is
    full; else one."""
    return stages if rows % stages == 0 else 1


def gather_stages(x_R1X: jax.Array) -> jax.Array:
    """`all_gather(x, PIPELINE, axis=1, tiled=True)`: every stage's rows [R, 1, ...] on every
    stage, [R, P, ...]. Activations move as an all-to-all of P copies (`gather_copies`: its
    transpose copies, where the all-gather's would reduce-scatter); integer rows (token ids)
    have no cotangent and move as the all-gather."""
    if jnp.issubdtype(x_R1X.dtype, jnp.integer):
        return jax.lax.all_gather(x_R1X, PIPELINE, axis=1, tiled=True)
    return gather_copies(x_R1X, PIPELINE, 1)


def from_stage(y_RPX: jax.Array, source: int) -> jax.Array:
    """Hands stage s block s of stage `source`'s [R, P, ...], as [R, 1, ...]: what
    `psum_scatter(y, PIPELINE, scatter_dimension=1, tiled=True)` gives when the other stages hold
    zeros, copied rather than summed (see `gather_stages`)."""
    y_RPX = jax.lax.all_to_all(y_RPX, PIPELINE, 1, 1, tiled=True)  # block s of every stage
    return y_RPX[:, source : source + 1]


def read(ring: Any, slot: jax.Array) -> Any:
    """Slot `slot` of every ring in the tree `ring` (slot 0 when `slot` is -1: unused)."""
    return jax.tree.map(lambda a: a[jnp.maximum(slot, 0)], ring)


def write(ring: Any, slot: jax.Array, value: Any) -> Any:
    """`value` into slot `slot` of the rings in `ring`; slot -1 writes nothing."""
    at = jnp.maximum(slot, 0)
    return jax.tree.map(
        lambda a, x: jax.lax.dynamic_update_index_in_dim(a, jnp.where(slot >= 0, x, a[at]), at, 0),
        ring,
        value,
    )


@dataclass(frozen=True)
class Slots:
    """What a tick's slots compute; `StageProgram.ticks` routes between them. Each takes this
    stage's routes for the tick (`Row`), a (b, T, D) value and the caller's state, and returns a
    (b, T, D) value and the state.

    - `forward(row, incoming_bTD, state) -> (y_bTD, state)`: the F slot; `incoming_bTD` is what
      waits in inbox slot `row["f_src"]` (the model's first chunk, on stage 0, reads its own
      input instead, where `f_src` is -1). `y_bTD` goes to the stage of the next chunk.
    - `head(row, y_bTD, state) -> (dy_bTD, state)`: the loss after the model's last chunk and
      its cotangent, kept in inbox slot `row["head_ct"]`.
    - `backward(row, cotangent_bTD, state) -> (dx_bTD, state)`: the B and W slots;
      `cotangent_bTD` is what waits in inbox slot `row["b_src"]`. `dx_bTD` goes to the stage of
      the previous chunk.

    Without `head` and `backward` the program is the table's forward ticks alone (gpipe,
    circular: training's backward is then `jax.grad` of it, the transposed scan).
    """

    forward: Callable[[Row, jax.Array, Any], tuple[jax.Array, Any]]
    head: Callable[[Row, jax.Array, Any], tuple[jax.Array, Any]] | None = None
    backward: Callable[[Row, jax.Array, Any], tuple[jax.Array, Any]] | None = None


@dataclass(frozen=True)
class StageProgram:
    """A schedule run on a mesh: the `shard_map` around the stages and the scan over its ticks.

    Args:
        mesh: the mesh; its `pipeline` axis holds the stages.
        schedule: the table the ticks run.
        fsdp: the stage weights are also split over `data` (then `data` stays automatic).
    """

    mesh: Mesh
    schedule: Schedule
    fsdp: bool = False

    @cached_property
    def manual(self) -> frozenset[str]:
        return manual_axes(self.mesh.shape[DATA], self.fsdp, self.mesh.shape[CONTEXT])

    @property
    def batch_axis(self) -> str | None:
        """The mesh axis the rows are split over inside the program (None: all rows here)."""
        return batch_axis(self.manual)

    def rows_spec(self, *, over_stages: bool) -> PartitionSpec:
        """Rows [R, P, Q, T, ...] split over replicas and stages (`over_stages`), or [B, T, ...]
        over replicas alone (the same on every stage); T over `context` where it is manual."""
        split = (self.batch_axis, PIPELINE) if over_stages else (self.batch_axis,)
        seq = sequence_axis(self.manual)
        if seq is None:
            return PartitionSpec(*split)
        return PartitionSpec(*split, *[None] * (len(split) - 1), seq)

    def __call__(self, body: Callable, in_specs: Any, out_specs: Any) -> Callable:
        """`body` as the program's `jax.shard_map`."""
        return jax.shard_map(
            body, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
            axis_names=set(self.manual),
        )  # fmt: skip

    def split(self, rows_RX: jax.Array) -> jax.Array:
        """[R, rows, ...] -> [M, R * b, ...]: micro-batch k holds rows [k * b, (k + 1) * b) of
        every replica held here."""
        m, r = self.schedule.microbatches, rows_RX.shape[0]
        rest = rows_RX.shape[2:]
        return rows_RX.reshape(r, m, -1, *rest).swapaxes(0, 1).reshape(m, -1, *rest)

    def merge(self, y_MbX: jax.Array, replicas: int) -> jax.Array:
        """The inverse of `split`: [M, R * b, ...] -> [R, M * b, ...]."""
        m, rest = self.schedule.microbatches, y_MbX.shape[2:]
        return y_MbX.reshape(m, replicas, -1, *rest).swapaxes(0, 1).reshape(replicas, -1, *rest)

    def ticks(self, slots: Slots, state: Any, inbox: Any) -> Any:
        """Runs the table's ticks inside the shard_map; returns the final state.

        Args:
            slots: what the F (and head, B, W) slots compute.
            state: the callers' carry (outputs, caches, gradient sums, stashes).
            inbox: the ring of (b, T, D) values waiting for an F or a B, zeros shaped
                [routes.slots["inbox"] (at least 1), b, T, D].
        """
        schedule = self.schedule
        p, routes = schedule.stages, schedule.routes
        arrays = routes.arrays()
        if not slots.backward:
            keep = ("f_micro", "f_chunk", "f_src") + tuple(
                f"{k}_{c}" for c in routes.channels for k in ("send", "keep")
            )
            arrays = {k: arrays[k] for k in keep}
        tables = {k: jnp.asarray(a) for k, a in arrays.items()}
        stage = jax.lax.axis_index(PIPELINE)
        rings = {
            "up": [(i, (i + 1) % p) for i in range(p)],
            "down": [(i, (i - 1) % p) for i in range(p)],
        }

        def tick(carry: tuple, row: Row) -> tuple[tuple, None]:
            inbox, state = carry
            at = {k: a[stage] for k, a in row.items()}
            y_bTD, state = slots.forward(at, read(inbox, at["f_src"]), state)
            dx_bTD = None
            if slots.backward:
                dy_bTD, state = slots.head(at, y_bTD, state)
                inbox = write(inbox, at["head_ct"], dy_bTD)
                dx_bTD, state = slots.backward(at, read(inbox, at["b_src"]), state)
            # what each channel carries: F's output, B's input gradient, or either (a V)
            for channel, kinds in routes.channels.items():
                if kinds == {F}:
                    value = y_bTD
                elif kinds == {B}:
                    value = dx_bTD
                else:
                    value = jnp.where(at[f"send_{channel}"] == 1 + B, dx_bTD, y_bTD)
                if p > 1 and channel in rings:
                    value = jax.lax.ppermute(value, PIPELINE, rings[channel])
                inbox = write(inbox, at[f"keep_{channel}"], value)
            return (inbox, state), None

        (_, state), _ = jax.lax.scan(tick, (inbox, state), tables)
        return state

    def forward(self, run: Callable, x_MbTD: jax.Array, state: Any = None) -> tuple[jax.Array, Any]:
        """The F slots of a forward-only table (gpipe, circular) on micro-batches `x_MbTD`:
        training's forward under `jax.grad`, evaluation, and the generator's steps.

        At each tick every stage runs `run(repeat, micro, active, h_bTD, state) -> (h_bTD,
        state)` on the micro-batch's input (from `x_MbTD` for the first chunk on stage 0, else
        what arrived). An idle slot runs on a clamped job and its result is dropped (`active` is
        False; `run` must not let it change `state`), rather than skipped under a `lax.cond`:
        jax 0.10 turns every input a cond's backward reads into a residual of the tick, so under
        `jax.grad` the tick loop would keep a copy of the stage's weights per tick.

        Returns:
            (M, b, T, D): the last chunk's outputs, on the last stage (zeros on the others); and
            the state.
        """
        last_stage, last_repeat = self.schedule.places[-1]
        stage = jax.lax.axis_index(PIPELINE)

        def forward(at: Row, incoming_bTD: jax.Array, carry: tuple) -> tuple[jax.Array, tuple]:
            out_MbTD, state = carry
            micro, repeat = jnp.maximum(at["f_micro"], 0), jnp.maximum(at["f_chunk"], 0)
            active = at["f_chunk"] >= 0
            h_bTD = jnp.where(at["f_src"] < 0, x_MbTD[micro], incoming_bTD)
            y_bTD, state = run(repeat, micro, active, h_bTD, state)
            last = active & (stage == last_stage) & (repeat == last_repeat)
            y_out = jnp.where(last, y_bTD, out_MbTD[micro])
            out_MbTD = jax.lax.dynamic_update_index_in_dim(out_MbTD, y_out, micro, 0)
            return y_bTD, (out_MbTD, state)

        zero_bTD = jnp.zeros_like(x_MbTD[0])  # varying like the input
        inbox = jnp.broadcast_to(zero_bTD, (self.ring_size("inbox"), *zero_bTD.shape))
        return self.ticks(Slots(forward), (jnp.zeros_like(x_MbTD), state), inbox)

    def ring_size(self, name: str) -> int:
        """Slots of ring `name` (inbox, stash, wstash) the table needs (at least one)."""
        return max(self.schedule.routes.slots[name], 1)
