"""The pipeline executor: one `jax.shard_map`, manual over `pipeline` only, around a `lax.scan`
over the schedule's ticks; activations move to the next stage with `lax.ppermute`.

Dimension key: B batch, T sequence, D model dim, M micro-batches, b micro-batch rows, R data
replicas, P stages, Q rows per (replica, stage) outside the pipeline.

`data` and `tensor` stay automatic inside the shard_map, so the stage body is the ordinary
tensor-parallel block and XLA partitions it exactly as without pipelining. The embedding, LM head
and loss run outside, with the batch split over `data` and `pipeline` (`outer_batch`): nothing is
computed twice. Stage 0 gathers the micro-batches' inputs at the start (one all-gather over
`pipeline`) and the outputs are spread back over the stages at the end (one reduce-scatter); the
backward pass runs the transposed collectives. Per tick each stage sends one (b, T, D) activation to
the next, forward, and receives one cotangent, backward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxpar.mesh import DATA, PIPELINE
from jaxpar.pipeline.layout import StageLayout
from jaxpar.pipeline.schedule import Schedule

_POLICIES: dict[str, Callable | None] = {
    "full": None,  # save nothing: recompute the whole tick
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def run_pipeline(
    layer: Callable[[Any, jax.Array], jax.Array],
    weights: Any,
    x_BTD: jax.Array,
    *,
    mesh: jax.sharding.Mesh,
    schedule: Schedule,
    layout: StageLayout,
    remat: str = "none",
    fsdp: bool = False,
) -> jax.Array:
    """Runs the layer stack on `x_BTD` as the schedule says; returns the last layer's output.

    Args:
        layer: one layer slot's computation, `layer(w, h_bTD) -> h_bTD`, on one slot's weights.
        weights: a tree of the stack's weights, [P, v * c, ...] with the stage axis on
            `pipeline` (`Llama.blocks.weights`: derived once per step, here, not per tick).
        x_BTD: embeddings, batch split over (`data`, `pipeline`).
        remat: none, full, dots or dots_no_batch: recompute each tick's stage in the backward pass
            (the tick, not each layer inside it: nested remat would recompute twice).
        fsdp: the stage weights are also split over `data` (ZeRO-3). Otherwise `data` is made
            manual too: each replica runs its own rows, and the weights' gradients are summed over
            `data` once, where the shard_map ends, instead of once per tick; with FSDP `data` stays
            automatic and XLA gathers each tick's weights and reduces their gradients per tick, as
            ZeRO-3 does per micro-batch.

    Returns:
        (B, T, D), laid out like `x_BTD`.
    """
    p, m, v, c = schedule.stages, schedule.microbatches, schedule.repeats, layout.chunk_size
    b_all, t, d = x_BTD.shape
    r = mesh.shape[DATA]
    q = b_all // (r * p)
    b_local = p * q // m  # rows of one data replica in one micro-batch
    jobs = v * m
    # (XLA rejects the replica sum of a size-1 manual `data` axis; with one replica there is
    # nothing to sum, so `data` is then left automatic.)
    manual = {PIPELINE} if fsdp or r == 1 else {PIPELINE, DATA}

    def chunk(weights_X: Any, repeat: jax.Array, real_C: jax.Array, h_bTD: jax.Array) -> jax.Array:
        """One stage's c layer slots of repeat `repeat` for one tick.

        With one repeat the tick runs all of the stage's weights, which are loop-invariant, so the
        backward pass keeps no copy of them per tick. With several, the tick's slice is cut here,
        inside what `remat` recomputes; without remat the backward pass keeps one slice per tick.
        """
        weights_C = weights_X
        if v > 1:
            weights_C = jax.tree.map(
                lambda a: jax.lax.dynamic_slice_in_dim(a, repeat * c, c, axis=0), weights_X
            )

        def slot(h_bTD: jax.Array, slot: tuple[Any, jax.Array]) -> tuple[jax.Array, None]:
            w, real = slot
            return jnp.where(real, layer(w, h_bTD), h_bTD), None  # padded slots: identity

        h_bTD, _ = jax.lax.scan(slot, h_bTD, (weights_C, real_C))
        return h_bTD

    if remat != "none":
        chunk = jax.checkpoint(chunk, policy=_POLICIES[remat], prevent_cse=False)

    def stages(weights_1X: Any, x_R1QTD: jax.Array) -> jax.Array:
        stage = jax.lax.axis_index(PIPELINE)
        valid_PVC = jnp.asarray(layout.valid)
        weights_X = jax.tree.map(lambda a: a[0], weights_1X)  # this stage's v * c slots
        if DATA in manual:
            # The weights are the same on every data replica. Marking them as varying over `data`
            # here, once, puts the gradient's sum over replicas (the transpose of this cast) here
            # too, instead of at every use inside the tick loop.
            weights_X = jax.tree.map(lambda a: jax.lax.pcast(a, (DATA,), to="varying"), weights_X)
        x_RPQTD = jax.lax.all_gather(x_R1QTD, PIPELINE, axis=1, tiled=True) if p > 1 else x_R1QTD
        r_here = x_RPQTD.shape[0]  # 1 when `data` is manual, else all replicas
        # Micro-batch k holds rows [k * b_local, (k + 1) * b_local) of every data replica.
        x_MbTD = x_RPQTD.reshape(r_here, m, b_local, t, d).transpose(1, 0, 2, 3, 4)
        x_MbTD = x_MbTD.reshape(m, -1, t, d)

        def tick(carry: tuple[jax.Array, jax.Array], now: jax.Array):
            recv_bTD, stash_MbTD = carry
            job = jnp.clip(now - stage, 0, jobs - 1)
            repeat, micro = job // m, job % m
            # Stage 0 starts a micro-batch's first repeat from its embedding and later repeats
            # from what came back around the ring; the other stages take what they received.
            first_in = jnp.where(repeat == 0, x_MbTD[micro], stash_MbTD[micro])
            h_bTD = jnp.where(stage == 0, first_in, recv_bTD)
            out_bTD = chunk(weights_X, repeat, valid_PVC[stage, repeat], h_bTD)
            if p > 1:
                ring = [(i, (i + 1) % p) for i in range(p)]
                recv_bTD = jax.lax.ppermute(out_bTD, PIPELINE, ring)
            else:
                recv_bTD = out_bTD
            # Stage 0 receives the last stage's job `now - (P - 1)`: keep it for its next repeat,
            # or as the final output after the last repeat.
            done = now - (p - 1)
            keep = (stage == 0) & (done >= 0) & (done < jobs)
            slot = jnp.clip(done, 0, jobs - 1) % m
            kept_bTD = jnp.where(keep, recv_bTD, stash_MbTD[slot])
            stash_MbTD = jax.lax.dynamic_update_index_in_dim(stash_MbTD, kept_bTD, slot, axis=0)
            return (recv_bTD, stash_MbTD), None

        zeros = jnp.zeros_like(x_MbTD)  # varying over `pipeline` already, like the input
        carry = (zeros[0], zeros)
        (_, y_MbTD), _ = jax.lax.scan(tick, carry, jnp.arange(schedule.ticks))

        y_RPQTD = y_MbTD.reshape(m, r_here, b_local, t, d).transpose(1, 0, 2, 3, 4)
        y_RPQTD = y_RPQTD.reshape(r_here, p, q, t, d)
        if p == 1:
            return y_RPQTD
        # Only stage 0 holds the outputs; a reduce-scatter of (outputs on stage 0, zeros
        # elsewhere) hands each stage its rows, exactly (x + 0 == x).
        y_RPQTD = jnp.where(stage == 0, y_RPQTD, 0)
        return jax.lax.psum_scatter(y_RPQTD, PIPELINE, scatter_dimension=1, tiled=True)

    spec = PartitionSpec(DATA if DATA in manual else None, PIPELINE)
    y_RPQTD = jax.shard_map(
        stages,
        mesh=mesh,
        in_specs=(PartitionSpec(PIPELINE), spec),
        out_specs=spec,
        axis_names=manual,
    )(weights, x_BTD.reshape(r, p, q, t, d))
    return y_RPQTD.reshape(b_all, t, d)
