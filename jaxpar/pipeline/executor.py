"""The pipeline executor: `jax.shard_map`, manual over `pipeline` (and `data`), around a
`lax.scan` over a schedule's ticks; activations move to the next stage with `lax.ppermute`.

Dimension key: B batch, T sequence, D model dim, M micro-batches, b micro-batch rows, R data
replicas, P stages, Q rows per (replica, stage) outside the pipeline.

- `forward_ticks`: the one forward tick loop, interpreting a forward-only table (gpipe,
  circular). `run_pipeline` runs it for training's forward (under `jax.grad`) and evaluation,
  and the generator for its KV-cached prefill and decode.
- `run_train_program`: the schedules with their own backward (1f1b, interleaved_1f1b, zb_h1),
  whose F, B and W ticks return the loss and the gradients together.

`tensor` stays automatic inside the shard_map, so the stage body is the ordinary
tensor-parallel block and XLA partitions it exactly as without pipelining. For `run_pipeline` the
embedding, LM head and loss run outside, with the batch split over `data` and `pipeline`
(`outer_batch`): nothing is computed twice. The micro-batches' inputs are gathered over `pipeline`
at the start and the last stage's outputs spread back over the stages at the end, each one
all-to-all (`gather_stages`, `from_last_stage`); the backward pass runs the transposed
collectives. Per tick each stage sends one (b, T, D) activation to the next, forward, and receives
one cotangent, backward.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxpar.mesh import DATA, PIPELINE
from jaxpar.pipeline.layout import StageLayout
from jaxpar.pipeline.remat import checkpointed
from jaxpar.pipeline.schedule import Schedule
from jaxpar.pipeline.taps import einsum, tapped, weight_grad

# The activations enter and leave the stages through all-to-alls, not an all-gather and a
# reduce-scatter: the same bytes, and neither they nor their transposes reduce anything across
# devices. On XLA:CPU a bfloat16 reduction (psum, psum_scatter, pmax) in a shard_map that leaves
# some mesh axes automatic aborts the process: jax lowers the reducer with a sharding annotation,
# a `copy` at its root, and the CPU pass that promotes bfloat16 all-reduces to float32 CHECK-fails
# on it ("Invalid binary instruction opcode copy"; jax 0.10 and 0.12). The reduce-scatter summed
# the last stage's outputs with zeros anyway.


def gather_stages(x_R1X: jax.Array) -> jax.Array:
    """`all_gather(x, PIPELINE, axis=1, tiled=True)`: every stage's rows [R, 1, ...] on every
    stage, [R, P, ...], as an all-to-all of P copies. Its transpose sums the P cotangents each
    stage gets back locally."""
    p = jax.lax.axis_size(PIPELINE)
    x_RPX = jnp.broadcast_to(x_R1X, (x_R1X.shape[0], p, *x_R1X.shape[2:]))
    return jax.lax.all_to_all(x_RPX, PIPELINE, 1, 1, tiled=True)


def from_last_stage(y_RPX: jax.Array) -> jax.Array:
    """Hands stage s block s of the last stage's [R, P, ...], as [R, 1, ...]: what
    `psum_scatter(y, PIPELINE, scatter_dimension=1, tiled=True)` gives when the other stages hold
    zeros, copied rather than summed."""
    p = jax.lax.axis_size(PIPELINE)
    y_RPX = jax.lax.all_to_all(y_RPX, PIPELINE, 1, 1, tiled=True)  # block s of every stage
    return y_RPX[:, p - 1 :]


def stage_chunk(layer: Callable, v: int, c: int, remat: str) -> Callable:
    """`chunk(weights_X, repeat, real_C, h, taps=None)`: one stage's c layer slots of repeat
    `repeat`.

    With one repeat the chunk scans over all of the stage's weights; with several, over the
    repeat's slot indices, each layer reading its weights in the scan body. Remat is per layer,
    in the body of the layer scan: the backward pass keeps each layer's input (and what the
    policy saves) and recomputes the rest one layer at a time. `taps` (zero-bubble schedules):
    per weight, zeros stacked over the c slots, shaped like the contraction's input and output
    (`tapped`); the layer is then called as `layer(w, h, project)`.
    """

    def slot_layer(w: Any, index: jax.Array | None, h_bTD: jax.Array, taps: dict | None):
        """One slot: its weights are `w`, or with several repeats slot `index` of `w` (all the
        stage's weights), read here, under the same checkpoint as the layer, so that the backward
        pass recomputes the read instead of keeping a copy of the slot's weights per tick."""
        if index is not None:
            w = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, index, 0, False), w)
        if taps is None:
            return layer(w, h_bTD)
        return layer(w, h_bTD, lambda name, eq, x, w: tapped(name, eq, x, w, taps[name]))

    slot_layer = checkpointed(slot_layer, remat, v)

    def chunk(weights_X: Any, repeat: jax.Array, real_C: jax.Array, h_bTD: jax.Array,
              taps: dict | None = None):  # fmt: skip
        def slot(h_bTD: jax.Array, slot: tuple) -> tuple[jax.Array, None]:
            w, real, taps = slot
            if v > 1:  # w is the slot's index
                out_bTD = slot_layer(weights_X, w, h_bTD, taps)
            else:
                out_bTD = slot_layer(w, None, h_bTD, taps)
            return jnp.where(real, out_bTD, h_bTD), None  # padded slots: identity

        xs = weights_X if v == 1 else repeat * c + jnp.arange(c)
        h_bTD, _ = jax.lax.scan(slot, h_bTD, (xs, real_C, taps))
        return h_bTD

    return chunk


def layer_taps(
    layer: Callable, weights_X: Any, h_bTD: jax.Array, c: int, zeros: Callable | None = None
) -> tuple[dict[str, tuple[str, jnp.dtype]], dict[str, tuple]]:
    """Each weight's contraction equation and the dtype the layer contracts it in (its compute
    dtype: matmul weights are cast to it), and zero taps for c slots shaped like its input and
    output (see `tapped`), from one dry trace of a layer (nothing uses its values: XLA drops it;
    `jax.eval_shape` cannot see a shard_map's manual axes)."""
    zeros = zeros or (lambda tree: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), tree))
    found: dict[str, tuple] = {}

    def record(name: str, eq: str, x: jax.Array, w: jax.Array) -> jax.Array:
        y = einsum(name, eq, x, w)
        found[name] = (eq, w.dtype, *(jax.ShapeDtypeStruct((c, *a.shape), a.dtype) for a in (x, y)))
        return y

    layer(jax.tree.map(lambda a: a[0], weights_X), h_bTD, record)
    eqs = {name: (eq, dtype) for name, (eq, dtype, _, _) in found.items()}
    return eqs, {name: zeros((x, y)) for name, (_, _, x, y) in found.items()}


def weight_grads(
    weights_X: Any, eqs: dict[str, tuple[str, jnp.dtype]], held: dict[str, tuple]
) -> Any:
    """A chunk's weight gradients (one repeat, [c, ...]) from its taps' cotangents: per weight,
    its contractions' inputs and output cotangents, stacked over the slots. Each is the gradient
    of the weight as the layer contracted it (cast to its compute dtype, `layer_taps`), then cast
    to the weight's own dtype, as the unsplit backward's transposed cast does."""
    grads = {}
    for name, (x, ct) in held.items():
        w = getattr(weights_X, name)
        eq, dtype = eqs[name]
        grad = jax.vmap(functools.partial(weight_grad, name, eq))
        grads[name] = grad(x, ct, w.astype(dtype)).astype(w.dtype)
    return weights_X._replace(**grads)


def forward_ticks(
    schedule: Schedule, run: Callable, x_MbTD: jax.Array, state: Any = None
) -> tuple[jax.Array, Any]:
    """The forward ticks of a forward-only table (gpipe, circular), inside a shard_map manual
    over `pipeline`: the one tick loop of every forward pass (training's under `jax.grad`,
    evaluation, KV-cached prefill and decode).

    At each tick every stage runs its F slot, `run(repeat, micro, active, h_bTD, state) ->
    (h_bTD, state)`, on the micro-batch's input (from `x_MbTD` for the first chunk on stage 0, else
    from the ring of what arrived), and hands the output to the next stage with one `ppermute`;
    what arrives is kept as `schedule.routes` says. An idle slot runs on a clamped job and its
    result is dropped (`active` is False; `run` must not let it change `state`), so the program
    has no per-device branch and `jax.grad` of it is the transposed scan.

    Returns:
        (M, b, T, D): the last chunk's outputs, on the last stage (zeros on the others); and the
        state.
    """
    p, v = schedule.stages, schedule.repeats
    routes = schedule.routes
    stage = jax.lax.axis_index(PIPELINE)
    tables = {k: jnp.asarray(getattr(routes, k)) for k in ("f_micro", "f_chunk", "f_src", "f_keep")}
    zero_bTD = jnp.zeros_like(x_MbTD[0])  # varying like the input
    act = jnp.broadcast_to(zero_bTD, (max(routes.slots["act"], 1), *zero_bTD.shape))

    def tick(carry: tuple, row: dict[str, jax.Array]) -> tuple[tuple, None]:
        act, out_MbTD, state = carry
        at = {k: a[stage] for k, a in row.items()}
        micro, repeat = jnp.maximum(at["f_micro"], 0), jnp.maximum(at["f_chunk"], 0)
        active = at["f_chunk"] >= 0
        h_bTD = jnp.where(at["f_src"] < 0, x_MbTD[micro], act[jnp.maximum(at["f_src"], 0)])
        y_bTD, state = run(repeat, micro, active, h_bTD, state)
        last = active & (stage == p - 1) & (repeat == v - 1)
        y_out = jnp.where(last, y_bTD, out_MbTD[micro])
        out_MbTD = jax.lax.dynamic_update_index_in_dim(out_MbTD, y_out, micro, 0)
        if p > 1:
            y_bTD = jax.lax.ppermute(y_bTD, PIPELINE, [(i, (i + 1) % p) for i in range(p)])
        slot = jnp.maximum(at["f_keep"], 0)
        kept = jnp.where(at["f_keep"] >= 0, y_bTD, act[slot])
        act = jax.lax.dynamic_update_index_in_dim(act, kept, slot, 0)
        return (act, out_MbTD, state), None

    carry = (act, jnp.zeros_like(x_MbTD), state)
    (_, out_MbTD, state), _ = jax.lax.scan(tick, carry, tables)
    return out_MbTD, state


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
        remat: none, full, dots or dots_no_batch: the policy of a `jax.checkpoint` around each
            layer (the backward pass keeps each layer's input and what the policy saves).
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
    # (XLA rejects the replica sum of a size-1 manual `data` axis; with one replica there is
    # nothing to sum, so `data` is then left automatic.)
    manual = {PIPELINE} if fsdp or r == 1 else {PIPELINE, DATA}

    chunk = stage_chunk(layer, v, c, remat)

    def stages(weights_1X: Any, x_R1QTD: jax.Array) -> jax.Array:
        stage = jax.lax.axis_index(PIPELINE)
        valid_PVC = jnp.asarray(layout.valid)
        weights_X = jax.tree.map(lambda a: a[0], weights_1X)  # this stage's v * c slots
        if DATA in manual:
            # The weights are the same on every data replica. Marking them as varying over `data`
            # here, once, puts the gradient's sum over replicas (the transpose of this cast) here
            # too, instead of at every use inside the tick loop.
            weights_X = jax.tree.map(lambda a: jax.lax.pcast(a, (DATA,), to="varying"), weights_X)
        x_RPQTD = gather_stages(x_R1QTD) if p > 1 else x_R1QTD
        r_here = x_RPQTD.shape[0]  # 1 when `data` is manual, else all replicas
        # Micro-batch k holds rows [k * b_local, (k + 1) * b_local) of every data replica.
        x_MbTD = x_RPQTD.reshape(r_here, m, b_local, t, d).transpose(1, 0, 2, 3, 4)
        x_MbTD = x_MbTD.reshape(m, -1, t, d)

        # Idle ticks (the ramps) compute on a clamped job and drop it, rather than skip it under
        # a `lax.cond`: jax 0.10 turns every input a cond's backward reads into a residual of
        # the tick, so the tick loop would keep a copy of the stage's weights per tick.
        def run(repeat, micro, active, h_bTD, state):
            return chunk(weights_X, repeat, valid_PVC[stage, repeat], h_bTD), state

        y_MbTD, _ = forward_ticks(schedule.forward(), run, x_MbTD)

        y_RPQTD = y_MbTD.reshape(m, r_here, b_local, t, d).transpose(1, 0, 2, 3, 4)
        y_RPQTD = y_RPQTD.reshape(r_here, p, q, t, d)
        if p == 1:
            return y_RPQTD
        # Only the last stage holds the outputs (zeros elsewhere): each stage takes its rows.
        return from_last_stage(y_RPQTD)

    spec = PartitionSpec(DATA if DATA in manual else None, PIPELINE)
    y_RPQTD = jax.shard_map(
        stages,
        mesh=mesh,
        in_specs=(PartitionSpec(PIPELINE), spec),
        out_specs=spec,
        axis_names=manual,
    )(weights, x_BTD.reshape(r, p, q, t, d))
    return y_RPQTD.reshape(b_all, t, d)


def run_train_program(
    layer: Callable[[Any, jax.Array], jax.Array],
    weights: Any,
    top: Any,
    tokens_BT: jax.Array,
    targets_BT: jax.Array,
    *,
    embed: Callable[[Any, jax.Array], jax.Array],
    head: Callable[[Any, jax.Array, jax.Array], jax.Array],
    mesh: jax.sharding.Mesh,
    schedule: Schedule,
    layout: StageLayout,
    remat: str = "none",
    fsdp: bool = False,
) -> tuple[jax.Array, Any, Any]:
    """Runs a schedule's F, B and W ticks with a hand-written backward; returns the summed loss
    of the batch and its gradients with respect to `weights` and `top`.

    Per tick, every stage runs its F slot (the chunk's forward under `jax.vjp`; what the
    backward needs, less the weights, goes into a stash ring slot), then, on the last stage for
    the last chunk, the loss of that micro-batch and its cotangent, then its B slot (the stored
    backward applied to the cotangent; with `split` the input gradient only), then its W slot
    (the weight gradient). Each slot is a `lax.cond`, so idle slots cost nothing; the ticks'
    two `ppermute`s (activations forward, cotangents backward) run on every device outside them.
    What arrives is kept in rings as `schedule.routes` says. The embedding runs in stage 0's
    first-chunk F and its gradient in the matching B, so nothing in the carry grows with M.

    Args:
        layer, weights, layout, remat, fsdp: as `run_pipeline`.
        top: the weights `embed` and `head` use (replicated over `pipeline`).
        tokens_BT, targets_BT: the batch (B, T), rows split over (`data`, `pipeline`).
        embed: `embed(top, tokens_bT) -> x_bTD`.
        head: `head(top, y_bTD, targets_bT) -> the micro-batch's summed loss`.
    """
    p, m, v, c = schedule.stages, schedule.microbatches, schedule.repeats, layout.chunk_size
    routes = schedule.routes
    b_all, t = tokens_BT.shape
    r = mesh.shape[DATA]
    q = b_all // (r * p)
    b_local = p * q // m
    manual = {PIPELINE} if fsdp or r == 1 else {PIPELINE, DATA}
    chunk = stage_chunk(layer, v, c, remat)
    tables = {k: jnp.asarray(a) for k, a in routes.arrays().items()}
    size = lambda name: max(routes.slots[name], 1)  # noqa: E731

    def stages(weights_1X: Any, top: Any, tokens_R1QT: jax.Array, targets_R1QT: jax.Array):
        stage = jax.lax.axis_index(PIPELINE)
        # A zero varying over every manual axis: added to what a slot computes (and to the zeros
        # an idle slot returns) it gives both `lax.cond` branches the same manual-axis types.
        zero = jax.lax.pcast(jnp.zeros((), jnp.float32), tuple(manual), to="varying")
        vary = lambda tree: jax.tree.map(lambda a: a + zero.astype(a.dtype), tree)  # noqa: E731
        zeros = lambda tree: vary(jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), tree))  # noqa: E731
        weights_X = jax.tree.map(lambda a: a[0], weights_1X)
        # Marked varying once here, the weights' gradients are summed over replicas (and top's
        # over stages) once, at the end, never inside a tick's branch: a pullback with respect to
        # an invariant value would all-reduce in it, on the stages that take it alone.
        if DATA in manual:
            weights_X = jax.tree.map(lambda a: jax.lax.pcast(a, (DATA,), to="varying"), weights_X)
        top = jax.tree.map(lambda a: jax.lax.pcast(a, tuple(sorted(manual)), to="varying"), top)
        valid_PVC = jnp.asarray(layout.valid)

        def micro_batches(rows_R1QT: jax.Array) -> jax.Array:
            rows = (
                jax.lax.all_gather(rows_R1QT, PIPELINE, axis=1, tiled=True) if p > 1 else rows_R1QT
            )
            r_here = rows.shape[0]
            rows = rows.reshape(r_here, m, b_local, t).transpose(1, 0, 2, 3)
            return rows.reshape(m, -1, t)

        tokens_MbT, targets_MbT = micro_batches(tokens_R1QT), micro_batches(targets_R1QT)
        pullbacks: dict[str, Any] = {}

        x_shape = jax.eval_shape(lambda: embed(top, tokens_MbT[0]))
        eqs, taps = (
            layer_taps(layer, weights_X, zeros(x_shape), c, zeros) if schedule.split else ({}, None)
        )

        def forward(h_bTD: jax.Array, repeat: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
            """The chunk's output and its pullback's residuals, less the weights (they stay in
            `weights_X`; `pullback` puts them back). With `split`, the pullback also takes the
            taps, and gives their cotangents: what the W of the job needs."""
            real_C = valid_PVC[stage, repeat]
            y_bTD, pull = jax.vjp(
                lambda h, w, taps: chunk(w, repeat, real_C, h, taps), h_bTD, weights_X, taps
            )
            leaves, tree = jax.tree.flatten(pull)
            given = jax.tree.leaves(weights_X)
            where = [next((i for i, g in enumerate(given) if g is x), -1) for x in leaves]
            pullbacks["tree"], pullbacks["where"] = tree, where
            return y_bTD, [x for x, i in zip(leaves, where, strict=True) if i < 0]

        def pullback(kept: list[jax.Array]) -> Callable:
            given, kept = jax.tree.leaves(weights_X), iter(kept)
            leaves = [given[i] if i >= 0 else next(kept) for i in pullbacks["where"]]
            return jax.tree.unflatten(pullbacks["tree"], leaves)

        # The residuals' shapes, from one trace of the forward whose values nothing uses (XLA
        # drops it): `jax.eval_shape` cannot see the manual axes here.
        dry = forward(zeros(x_shape), jnp.int32(0))[1]
        kept_shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in dry]

        def ring(n: int, tree: Any) -> Any:
            """n zeroed slots, each shaped like `tree`."""
            return zeros(jax.tree.map(lambda a: jax.ShapeDtypeStruct((n, *a.shape), a.dtype), tree))

        w_shapes = taps if schedule.split else ()

        def read(buf: Any, slot: jax.Array) -> Any:
            return jax.tree.map(lambda a: a[jnp.maximum(slot, 0)], buf)

        def write(buf: Any, slot: jax.Array, value: Any) -> Any:
            at = jnp.maximum(slot, 0)
            return jax.tree.map(
                lambda a, x: jax.lax.dynamic_update_index_in_dim(
                    a, jnp.where(slot >= 0, x, a[at]), at, 0
                ),
                buf,
                value,
            )

        def tick(carry: tuple, row: dict[str, jax.Array]) -> tuple[tuple, None]:
            act, ct, stash, wstash, d_weights, d_top, loss = carry
            at = {k: a[stage] for k, a in row.items()}
            f_micro, f_repeat = jnp.maximum(at["f_micro"], 0), jnp.maximum(at["f_chunk"], 0)

            def run_f(act: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
                h_bTD = jax.lax.cond(
                    at["f_src"] < 0,
                    lambda: vary(embed(top, tokens_MbT[f_micro])),
                    lambda: read(act, at["f_src"]),
                )
                return vary(forward(h_bTD, f_repeat))

            y_bTD, kept = jax.lax.cond(
                at["f_chunk"] >= 0, run_f, lambda _: zeros((x_shape, kept_shapes)), act
            )
            stash = write(stash, at["f_stash"], kept)

            def run_head() -> tuple[jax.Array, jax.Array, Any]:
                loss_m, pull = jax.vjp(lambda y, w: head(w, y, targets_MbT[f_micro]), y_bTD, top)
                dy_bTD, d_top_m = pull(jnp.ones_like(loss_m))
                return vary((loss_m, dy_bTD, d_top_m))

            loss_m, dy_bTD, d_top_m = jax.lax.cond(
                at["head_ct"] >= 0, run_head, lambda: zeros((loss, x_shape, top))
            )
            loss, d_top = loss + loss_m, jax.tree.map(jnp.add, d_top, d_top_m)
            ct = write(ct, at["head_ct"], dy_bTD)

            b_micro, b_repeat = jnp.maximum(at["b_micro"], 0), jnp.maximum(at["b_chunk"], 0)
            cotangent = read(ct, at["b_src"])
            residuals = read(stash, at["b_stash"])

            def run_b() -> tuple[jax.Array, Any, Any, Any]:
                dx_bTD, d_w, d_taps = pullback(residuals)(cotangent)
                d_top_e = jax.lax.cond(
                    (stage == 0) & (b_repeat == 0),
                    lambda: vary(
                        jax.vjp(lambda w: embed(w, tokens_MbT[b_micro]), top)[1](dx_bTD)[0]
                    ),
                    lambda: zeros(top),
                )
                return vary((dx_bTD, d_w, d_taps, d_top_e))

            dx_bTD, d_w, d_taps, d_top_e = jax.lax.cond(
                at["b_chunk"] >= 0, run_b, lambda: zeros((x_shape, weights_X, taps, top))
            )
            if schedule.split:  # d_w is zero: the W tick computes it from the taps' cotangents
                wstash = write(wstash, at["b_wstash"], d_taps)
                held = read(wstash, at["w_stash"])
                d_w = jax.lax.cond(
                    at["w_chunk"] >= 0,
                    lambda: vary(weight_grads(weights_X, eqs, held)),
                    lambda: zeros(weights_X),
                )
            d_weights = jax.tree.map(jnp.add, d_weights, d_w)
            d_top = jax.tree.map(jnp.add, d_top, d_top_e)

            if p > 1:
                forward_ring = [(i, (i + 1) % p) for i in range(p)]
                backward_ring = [(i, (i - 1) % p) for i in range(p)]
                y_bTD = jax.lax.ppermute(y_bTD, PIPELINE, forward_ring)
                dx_bTD = jax.lax.ppermute(dx_bTD, PIPELINE, backward_ring)
            act = write(act, at["f_keep"], y_bTD)
            ct = write(ct, at["b_keep"], dx_bTD)
            return (act, ct, stash, wstash, d_weights, d_top, loss), None

        carry = (
            ring(size("act"), x_shape),
            ring(size("ct"), x_shape),
            ring(size("stash"), kept_shapes),
            ring(size("wstash"), w_shapes),
            zeros(weights_X),
            zeros(top),
            zeros(jax.ShapeDtypeStruct((), jnp.float32)),
        )
        carry, _ = jax.lax.scan(tick, carry, tables)
        *_, d_weights, d_top, loss = carry
        axes = tuple(sorted(manual))
        loss, d_top = jax.lax.psum((loss, d_top), axes)
        if DATA in manual:
            d_weights = jax.lax.psum(d_weights, DATA)
        return loss, jax.tree.map(lambda a: a[None], d_weights), d_top

    spec = PartitionSpec(DATA if DATA in manual else None, PIPELINE)
    loss, d_weights, d_top = jax.shard_map(
        stages,
        mesh=mesh,
        in_specs=(PartitionSpec(PIPELINE), PartitionSpec(), spec, spec),
        out_specs=(PartitionSpec(), PartitionSpec(PIPELINE), PartitionSpec()),
        axis_names=manual,
    )(weights, top, tokens_BT.reshape(r, p, q, t), targets_BT.reshape(r, p, q, t))
    return loss, d_weights, d_top
