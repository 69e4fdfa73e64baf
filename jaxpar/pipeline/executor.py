"""Training and evaluation passes over the stages, on the stage program
(`jaxpar.pipeline.program`), and what one stage computes: its chunk of layer slots, and for
zero-bubble schedules the taps that split a layer's backward into B and W.

Dimension key: B batch, T sequence, D model dim, M micro-batches, b micro-batch rows, R data
replicas, P stages, Q rows per (replica, stage) outside the pipeline.

- `run_pipeline`: the forward ticks of a forward-only table (gpipe, circular), for training's
  forward (under `jax.grad`) and evaluation.
- `run_train_program`: the schedules with their own backward (1f1b, interleaved_1f1b, zb_h1,
  zb_v), whose F, B and W slots return the loss and the gradients together.

`tensor` stays automatic inside the program, so the stage body is the ordinary tensor-parallel
block and XLA partitions it exactly as without pipelining. For `run_pipeline` the embedding, LM
head and loss run outside, with the batch split over `data` and `pipeline` (`outer_batch`):
nothing is computed twice. The micro-batches' inputs are gathered over `pipeline` at the start and
the last chunk's outputs spread back over the stages at the end, each one all-to-all
(`gather_stages`, `from_stage`); the backward pass runs the transposed collectives. Per tick
each stage sends one (b, T, D) activation to the next, forward, and receives one cotangent,
backward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from jaxpar.mesh import CONTEXT, DATA, PIPELINE
from jaxpar.model.layout import StageLayout
from jaxpar.model.remat import checkpointed
from jaxpar.model.taps import einsum, tapped, weight_grad
from jaxpar.pipeline.program import (
    Row,
    Slots,
    StageProgram,
    from_stage,
    gather_stages,
    read,
    replica_axes,
    write,
)
from jaxpar.pipeline.schedule import Schedule


def stage_chunk(layer: Callable, v: int, c: int, remat: str, collectives: bool = False,
                always: int = 0) -> Callable:  # fmt: skip
    """`chunk(weights_X, repeat, real_C, h, taps=None)`: one stage's c layer slots of repeat
    `repeat`, of which `real_C` hold layers (a prefix: the rest is padding); the first `always`
    hold a layer in every chunk of the layout (`min(StageLayout.chunk_sizes)`).

    With one repeat the chunk scans over all of the stage's weights; with several, over the
    repeat's slot indices, each layer reading its weights in the scan body. Remat is per layer,
    in the body of the layer scan: the backward pass keeps each layer's input (and what the
    policy saves) and recomputes the rest one layer at a time. `taps` (zero-bubble schedules):
    per weight, zeros stacked over the c slots, shaped like the contraction's input and output
    (`tapped`); the layer is then called as `layer(w, h, project)`.

    A padded slot computes nothing: the slots after the first `always` are a second scan whose
    every slot is a `lax.cond`, its other branch handing its input on (and the backward pass,
    its cotangent), so stages with fewer layers finish sooner. (A cond in every slot would cost
    the slots that are always real: a balanced 12-layer step on pipeline=2 took 15% longer.)
    Where the layer holds collectives (`collectives`: attention over `context`), which never run
    inside a per-device branch, a padded slot runs and a select keeps its input. A `real_C`
    known when the chunk is traced (a numpy array: one stage's chunk compiled alone,
    `balance.StageTimer`) scans its real slots only.
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

    def chunk(weights_X: Any, repeat: jax.Array, real_C: Any, h_bTD: jax.Array,
              taps: dict | None = None):  # fmt: skip
        def slot(h_bTD: jax.Array, slot: tuple) -> tuple[jax.Array, None]:
            w, real, taps = slot

            def run(h_bTD: jax.Array) -> jax.Array:
                if v > 1:  # w is the slot's index
                    return slot_layer(weights_X, w, h_bTD, taps)
                return slot_layer(w, None, h_bTD, taps)

            if real is None:
                return run(h_bTD), None
            if collectives:
                return jnp.where(real, run(h_bTD), h_bTD), None
            return jax.lax.cond(real, run, lambda h_bTD: h_bTD, h_bTD), None

        xs = weights_X if v == 1 else repeat * c + jnp.arange(c)
        n = int(real_C.sum()) if isinstance(real_C, np.ndarray) else always
        first, rest = (jax.tree.map(lambda a: a[:n], (xs, taps)),
                       jax.tree.map(lambda a: a[n:], (xs, real_C, taps)))  # fmt: skip
        h_bTD, _ = jax.lax.scan(slot, h_bTD, (first[0], None, first[1]))
        if n < c and not isinstance(real_C, np.ndarray):
            h_bTD, _ = jax.lax.scan(slot, h_bTD, rest)
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
    weights_X: Any,
    eqs: dict[str, tuple[str, jnp.dtype]],
    held: dict[str, tuple],
    real_C: Any = None,
    always: int = 0,
) -> Any:
    """A chunk's weight gradients (one repeat, [c, ...]) from its taps' cotangents: per weight,
    its contractions' inputs and output cotangents, stacked over the slots. Each is the gradient
    of the weight as the layer contracted it (cast to its compute dtype, `layer_taps`), then cast
    to the weight's own dtype, as the unsplit backward's transposed cast does. A slot that
    `real_C` marks as padding computes nothing (its gradients are zero); the first `always`
    slots are real in every chunk (as `stage_chunk`)."""

    def slot(w: Any, held: dict[str, tuple]) -> dict[str, jax.Array]:
        grads = {}
        for name, (x, ct) in held.items():
            eq, dtype = eqs[name]
            a = getattr(w, name)
            grads[name] = weight_grad(name, eq, x, ct, a.astype(dtype)).astype(a.dtype)
        return grads

    c = real_C.shape[0] if real_C is not None else 0
    if real_C is None or isinstance(real_C, np.ndarray) or always >= c:  # every slot is real
        return weights_X._replace(**jax.vmap(slot)(weights_X, held))

    def one(_, xs: tuple) -> tuple[None, dict[str, jax.Array]]:
        w, held, real = xs
        # zeros typed like the gradient (its manual axes too): w's own slot, times zero
        zeros = lambda: {name: a * 0 for name, a in w._asdict().items() if name in held}  # noqa: E731
        return None, jax.lax.cond(real, lambda: slot(w, held), zeros)

    first, rest = (jax.tree.map(lambda a: a[:always], (weights_X, held)),
                   jax.tree.map(lambda a: a[always:], (weights_X, held, real_C)))  # fmt: skip
    _, grads = jax.lax.scan(one, None, rest)
    if always:
        grads = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), jax.vmap(slot)(*first), grads)
    return weights_X._replace(**grads)


def stage_weights(program: StageProgram, weights_1X: Any) -> Any:
    """This stage's v * c slots of the stack's weights [1, v * c, ...], inside the program.

    With `data` (or `context`) manual the weights are the same on every replica (and piece of
    the sequence): marking them as varying over those axes here, once, puts the gradient's sum
    (the transpose of this cast) here too, instead of at every use inside the tick loop."""
    weights_X = jax.tree.map(lambda a: a[0], weights_1X)
    replicas = replica_axes(program.manual)
    if replicas:
        weights_X = jax.tree.map(lambda a: jax.lax.pcast(a, replicas, to="varying"), weights_X)
    return weights_X


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
    """Runs the layer stack on `x_BTD` as the schedule's forward ticks say; returns the last
    layer's output.

    Args:
        layer: one layer slot's computation, `layer(w, h_bTD) -> h_bTD`, on one slot's weights.
        weights: a tree of the stack's weights, [P, v * c, ...] with the stage axis on
            `pipeline` (`Llama.blocks.weights`: derived once per step, here, not per tick).
        x_BTD: embeddings, batch split over (`data`, `pipeline`).
        remat: none, full, dots or dots_no_batch: the policy of a `jax.checkpoint` around each
            layer (the backward pass keeps each layer's input and what the policy saves).
        fsdp: the stage weights are also split over `data` (ZeRO-3): XLA gathers each tick's
            weights and reduces their gradients per tick, as ZeRO-3 does per micro-batch.

    Returns:
        (B, T, D), laid out like `x_BTD`.
    """
    program = StageProgram(mesh, schedule.forward(), fsdp)
    p, c = schedule.stages, layout.chunk_size
    b_all, t, d = x_BTD.shape
    r = mesh.shape[DATA]
    q = b_all // (r * p)
    chunk = stage_chunk(layer, schedule.repeats, c, remat, CONTEXT in program.manual,
                        min(layout.chunk_sizes))  # fmt: skip

    def stages(weights_1X: Any, x_R1QTD: jax.Array) -> jax.Array:
        stage = jax.lax.axis_index(PIPELINE)
        valid_PVC = jnp.asarray(layout.valid)
        weights_X = stage_weights(program, weights_1X)
        x_RPQTD = gather_stages(x_R1QTD) if p > 1 else x_R1QTD
        r_here, t_here = x_RPQTD.shape[0], x_RPQTD.shape[3]  # replicas, positions held here
        x_MbTD = program.split(x_RPQTD.reshape(r_here, p * q, t_here, d))

        def run(repeat, micro, active, h_bTD, state):
            return chunk(weights_X, repeat, valid_PVC[stage, repeat], h_bTD), state

        y_MbTD, _ = program.forward(run, x_MbTD)
        y_RPQTD = program.merge(y_MbTD, r_here).reshape(r_here, p, q, t_here, d)
        if p == 1:
            return y_RPQTD
        # Only the stage of the last chunk holds the outputs (zeros elsewhere): each stage takes
        # its rows.
        return from_stage(y_RPQTD, program.schedule.places[-1][0])

    spec = program.rows_spec(over_stages=True)
    run_stages = program(stages, in_specs=(PartitionSpec(PIPELINE), spec), out_specs=spec)
    return run_stages(weights, x_BTD.reshape(r, p, q, t, d)).reshape(b_all, t, d)


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
    two `ppermute`s run on every device outside them (`StageProgram.ticks`). The embedding runs
    in stage 0's first-chunk F and its gradient in the matching B, so nothing in the carry grows
    with M.

    Args:
        layer, weights, layout, remat, fsdp: as `run_pipeline`.
        top: the weights `embed` and `head` use (replicated over `pipeline`).
        tokens_BT, targets_BT: the batch (B, T), rows split over (`data`, `pipeline`).
        embed: `embed(top, tokens_bT) -> x_bTD`.
        head: `head(top, y_bTD, targets_bT) -> the micro-batch's summed loss`.
    """
    program = StageProgram(mesh, schedule, fsdp)
    p = schedule.stages
    b_all, t = tokens_BT.shape
    r = mesh.shape[DATA]
    q = b_all // (r * p)
    chunk = stage_chunk(layer, schedule.repeats, layout.chunk_size, remat,
                        CONTEXT in program.manual, min(layout.chunk_sizes))  # fmt: skip

    def stages(weights_1X: Any, top: Any, tokens_R1QT: jax.Array, targets_R1QT: jax.Array):
        def micro_batches(rows_R1QT: jax.Array) -> jax.Array:
            rows = gather_stages(rows_R1QT) if p > 1 else rows_R1QT
            return program.split(rows.reshape(rows.shape[0], p * q, rows.shape[3]))

        tokens_MbT, targets_MbT = micro_batches(tokens_R1QT), micro_batches(targets_R1QT)
        stage = _TrainStage(program, layer, chunk, layout, embed, head, weights_1X, top)
        loss, d_weights, d_top = stage.run(tokens_MbT, targets_MbT)
        return loss, jax.tree.map(lambda a: a[None], d_weights), d_top

    spec = program.rows_spec(over_stages=True)
    run_stages = program(
        stages,
        in_specs=(PartitionSpec(PIPELINE), PartitionSpec(), spec, spec),
        out_specs=(PartitionSpec(), PartitionSpec(PIPELINE), PartitionSpec()),
    )
    return run_stages(weights, top, tokens_BT.reshape(r, p, q, t), targets_BT.reshape(r, p, q, t))


class _TrainStage:
    """One stage's slots of a hand-backward program, inside its shard_map: F (the chunk under
    `jax.vjp`), the loss, B (the stored pullback) and W (weight gradients from the taps).

    The state the slots carry: (stash, wstash, d_weights, d_top, loss): the F's residuals kept
    for their B, the B's tap cotangents kept for their W, and the sums of the gradients and the
    loss.
    """

    def __init__(self, program: StageProgram, layer: Callable, chunk: Callable,
                 layout: StageLayout, embed: Callable, head: Callable, weights_1X: Any,
                 top: Any):  # fmt: skip
        self.program, self.schedule = program, program.schedule
        self.layer, self.chunk, self.embed, self.head = layer, chunk, embed, head
        self.stage = jax.lax.axis_index(PIPELINE)
        # A zero varying over every manual axis: added to what a slot computes (and to the zeros
        # an idle slot returns) it gives both `lax.cond` branches the same manual-axis types.
        self.zero = jax.lax.pcast(jnp.zeros((), jnp.float32), tuple(program.manual), to="varying")
        # Marked varying once here, the weights' gradients are summed over replicas (and top's
        # over stages) once, at the end, never inside a tick's branch: a pullback with respect to
        # an invariant value would all-reduce in it, on the stages that take it alone.
        self.weights_X = stage_weights(program, weights_1X)
        manual = tuple(sorted(program.manual))
        self.top = jax.tree.map(lambda a: jax.lax.pcast(a, manual, to="varying"), top)
        self.valid_PVC = jnp.asarray(layout.valid)
        self.c, self.always = layout.chunk_size, min(layout.chunk_sizes)
        self.pullbacks: dict[str, Any] = {}

    def slot(self, active: jax.Array, run: Callable, carry: Any, out: Any = None) -> Any:
        """`run(carry, live) -> (value, carry)` where `active`; else zeros shaped like `out` and
        `carry` unchanged.

        A `lax.cond` whose idle branch hands the carry (the rings and sums the slot updates)
        through untouched, so an idle slot costs nothing and nothing is zero-filled; `run` gets
        `live=None` there. Where the layers hold collectives over `context` (ring or gathered
        attention), which never run inside a per-device branch, the slot runs on every stage
        with `live=active`: its ring writes go to the routes' slot -1 (nothing) when idle, and
        it masks what it adds to its sums with `self.live`."""
        idle = lambda carry: (None if out is None else self.zeros(out), carry)  # noqa: E731
        if CONTEXT not in self.program.manual:
            return jax.lax.cond(active, lambda carry: run(carry, None), idle, carry)
        value, carry = run(carry, active)
        if out is not None:
            value = jnp.where(active, value, 0).astype(value.dtype)
        return value, carry

    @staticmethod
    def live(live: jax.Array | None, tree: Any) -> Any:
        """`tree`, or zeros where the slot is idle (`slot`'s select path)."""
        if live is None:
            return tree
        return jax.tree.map(lambda a: jnp.where(live, a, jnp.zeros_like(a)), tree)

    def vary(self, tree: Any) -> Any:
        return jax.tree.map(lambda a: a + self.zero.astype(a.dtype), tree)

    def zeros(self, tree: Any) -> Any:
        return self.vary(jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), tree))

    def ring(self, name: str, tree: Any) -> Any:
        """The zeroed slots of ring `name`, each shaped like `tree`."""
        n = self.program.ring_size(name)
        shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct((n, *a.shape), a.dtype), tree)
        return self.zeros(shapes)

    # -- the chunk's forward and its pullback ------------------------------------------------

    def forward(self, h_bTD: jax.Array, repeat: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        """The chunk's output and its pullback's residuals, less the weights (they stay in
        `weights_X`; `pullback` puts them back). With `split`, the pullback also takes the
        taps, and gives their cotangents: what the W of the job needs."""
        real_C = self.valid_PVC[self.stage, repeat]
        y_bTD, pull = jax.vjp(
            lambda h, w, taps: self.chunk(w, repeat, real_C, h, taps), h_bTD, self.weights_X,
            self.taps,
        )  # fmt: skip
        leaves, tree = jax.tree.flatten(pull)
        given = jax.tree.leaves(self.weights_X)
        where = [next((i for i, g in enumerate(given) if g is x), -1) for x in leaves]
        self.pullbacks["tree"], self.pullbacks["where"] = tree, where
        return y_bTD, [x for x, i in zip(leaves, where, strict=True) if i < 0]

    def pullback(self, kept: list[jax.Array]) -> Callable:
        given, kept = jax.tree.leaves(self.weights_X), iter(kept)
        leaves = [given[i] if i >= 0 else next(kept) for i in self.pullbacks["where"]]
        return jax.tree.unflatten(self.pullbacks["tree"], leaves)

    # -- the slots ---------------------------------------------------------------------------

    def f_slot(self, at: Row, incoming_bTD: jax.Array, state: tuple) -> tuple[jax.Array, tuple]:
        stash, *rest = state
        f_micro, f_repeat = jnp.maximum(at["f_micro"], 0), jnp.maximum(at["f_chunk"], 0)

        def run_f(stash: Any, live: jax.Array | None) -> tuple[jax.Array, Any]:
            h_bTD = jax.lax.cond(
                at["f_src"] < 0,
                lambda: self.vary(self.embed(self.top, self.tokens_MbT[f_micro])),
                lambda: incoming_bTD,
            )
            y_bTD, kept = self.forward(h_bTD, f_repeat)
            return self.vary(y_bTD), write(stash, at["f_stash"], kept)

        y_bTD, stash = self.slot(at["f_chunk"] >= 0, run_f, stash, self.x_shape)
        return y_bTD, (stash, *rest)

    def head_slot(self, at: Row, y_bTD: jax.Array, state: tuple) -> tuple[jax.Array, tuple]:
        stash, wstash, d_weights, d_top, loss = state
        f_micro = jnp.maximum(at["f_micro"], 0)

        def run_head(sums: tuple, live: jax.Array | None) -> tuple[jax.Array, tuple]:
            targets_bT = self.targets_MbT[f_micro]
            loss_m, pull = jax.vjp(lambda y, w: self.head(w, y, targets_bT), y_bTD, self.top)
            dy_bTD, d_top_m = pull(jnp.ones_like(loss_m))
            d_top_m, loss_m = self.live(live, (d_top_m, loss_m))
            d_top, loss = sums
            return self.vary(dy_bTD), (jax.tree.map(jnp.add, d_top, d_top_m), loss + loss_m)

        active = at["head_ct"] >= 0
        dy_bTD, (d_top, loss) = self.slot(active, run_head, (d_top, loss), self.x_shape)
        return dy_bTD, (stash, wstash, d_weights, d_top, loss)

    def b_slot(self, at: Row, cotangent: jax.Array, state: tuple) -> tuple[jax.Array, tuple]:
        """The B slot, and the W slot of split schedules."""
        stash, wstash, d_weights, d_top, loss = state
        b_micro, b_repeat = jnp.maximum(at["b_micro"], 0), jnp.maximum(at["b_chunk"], 0)
        split = self.schedule.split

        def embed_grad(dx_bTD: jax.Array) -> Any:
            tokens_bT = self.tokens_MbT[b_micro]
            return self.vary(jax.vjp(lambda w: self.embed(w, tokens_bT), self.top)[1](dx_bTD)[0])

        def run_b(carry: tuple, live: jax.Array | None) -> tuple[jax.Array, tuple]:
            wstash, d_weights, d_top = carry
            dx_bTD, d_w, d_taps = self.pullback(read(stash, at["b_stash"]))(cotangent)
            first = (self.stage == 0) & (b_repeat == 0)
            d_top_e = jax.lax.cond(first, embed_grad, lambda _: self.zeros(self.top), dx_bTD)
            d_top = jax.tree.map(jnp.add, d_top, self.live(live, d_top_e))
            if split:  # d_w is zero: the W slot computes it from the taps' cotangents
                wstash = write(wstash, at["b_wstash"], d_taps)
            else:
                d_weights = jax.tree.map(jnp.add, d_weights, self.live(live, d_w))
            return self.vary(dx_bTD), (wstash, d_weights, d_top)

        carry = (wstash, d_weights, d_top)
        dx_bTD, carry = self.slot(at["b_chunk"] >= 0, run_b, carry, self.x_shape)
        wstash, d_weights, d_top = carry
        if split:
            d_weights = self.w_slot(at, wstash, d_weights)
        return dx_bTD, (stash, wstash, d_weights, d_top, loss)

    def w_slot(self, at: Row, wstash: Any, d_weights: Any) -> Any:
        """The W slot: the weight gradients of one job's chunk (its c slots) from what its B
        kept, added into the chunk's slots of `d_weights`."""
        c, v = self.c, self.schedule.repeats
        repeat = jnp.maximum(at["w_chunk"], 0)
        start = repeat * c

        def run_w(d_weights: Any, live: jax.Array | None) -> tuple[None, Any]:
            chunk_X = self.weights_X
            if v > 1:
                chunk_X = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, c), chunk_X)
            held = read(wstash, at["w_stash"])
            real_C = self.valid_PVC[self.stage, repeat]
            d_chunk = weight_grads(chunk_X, self.eqs, held, real_C, self.always)
            d_chunk = self.live(live, self.vary(d_chunk))
            if v == 1:
                return None, jax.tree.map(jnp.add, d_weights, d_chunk)

            def add(total: jax.Array, d: jax.Array) -> jax.Array:
                d = jax.lax.dynamic_slice_in_dim(total, start, c) + d
                return jax.lax.dynamic_update_slice_in_dim(total, d, start, 0)

            return None, jax.tree.map(add, d_weights, d_chunk)

        return self.slot(at["w_chunk"] >= 0, run_w, d_weights)[1]

    # -- the program -------------------------------------------------------------------------

    def run(self, tokens_MbT: jax.Array, targets_MbT: jax.Array) -> tuple[jax.Array, Any, Any]:
        """The ticks; returns the loss and the gradients, summed over the manual axes."""
        self.tokens_MbT, self.targets_MbT = tokens_MbT, targets_MbT
        self.x_shape = jax.eval_shape(lambda: self.embed(self.top, tokens_MbT[0]))
        self.eqs, self.taps = ({}, None)
        if self.schedule.split:
            h_bTD = self.zeros(self.x_shape)
            self.eqs, self.taps = layer_taps(self.layer, self.weights_X, h_bTD, self.c, self.zeros)
        # The residuals' shapes, from one trace of the forward whose values nothing uses (XLA
        # drops it): `jax.eval_shape` cannot see the manual axes here.
        dry = self.forward(self.zeros(self.x_shape), jnp.int32(0))[1]
        self.kept_shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in dry]
        state = (
            self.ring("stash", self.kept_shapes),
            self.ring("wstash", self.taps if self.schedule.split else ()),
            self.zeros(self.weights_X),
            self.zeros(self.top),
            self.zeros(jax.ShapeDtypeStruct((), jnp.float32)),
        )
        slots = Slots(self.f_slot, self.head_slot, self.b_slot)
        inbox = self.ring("inbox", self.x_shape)
        _, _, d_weights, d_top, loss = self.program.ticks(slots, state, inbox)
        loss, d_top = jax.lax.psum((loss, d_top), tuple(sorted(self.program.manual)))
        replicas = replica_axes(self.program.manual)
        if replicas:
            d_weights = jax.lax.psum(d_weights, replicas)
        return loss, d_weights, d_top
