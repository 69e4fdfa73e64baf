"""Attention over a sequence split across the `context` mesh axis (long context).

Dimension key: B batch, T the sequence here (this device's piece), S keys, N query heads, K kv
heads, G = N / K, H head dim, C pieces (the `context` axis's size), c = T / 2 positions per chunk.

Inside a stage program that is manual over `context` (`jaxpar.pipeline.program.manual_axes`),
every device holds T = (sequence) / C positions of each row; everything but attention is per token
and runs on its piece alone. `attend` moves keys and values between the pieces:

    ring        keys and values travel round the `context` ring by `ppermute`, C - 1 hops, each
                block of them merged into the queries' running softmax (`attention.Partial`) in
                float32. A `jax.custom_vjp` whose backward runs the ring again, carrying the keys'
                and values' gradients with them, and hands each piece's gradients home with one
                last hop: what a device keeps is O(T), never the whole sequence.
    all_gather  each device gathers the keys and values of the whole sequence and attends its own
                queries to them (MaxText's default, Megatron's `all_gather`); the gather is
                recomputed in the backward pass, so one layer's full keys exist at a time. It
                moves as an all-to-all of copies (`sharding.gather_copies`, bfloat16-safe on
                XLA:CPU), whose transpose hands each piece every device's gradient of its keys
                and sums them there.

Causal load balancing (`model.context_load_balance`, on by default): the sequence is cut into 2C
chunks and piece i holds chunks i and 2C - 1 - i (`sequence_order`), so every device has the same
attention work; the tokens are put in that order before the embedding (`jaxpar.placement`), and
positions (for RoPE and the masks) follow it. Each piece is two halves of c positions (with
balancing, its two chunks). At hop h, device i holds the keys of piece j = i - h (mod C), and the
ring computes only the (query half, key half) blocks that have visible keys (`_blocks`):

    hop 0        (0, 0) causal, (1, 0) whole, (1, 1) causal; (0, 1) is above the diagonal.
    balanced     (1, 0) whole, and (s, s) whole with s = 0 when j < i, else 1: two blocks a hop.
    unbalanced   all four blocks, masked: device i's keys from j > i are all hidden, but in
                 lockstep every device computes what the busiest one does (the imbalance
                 `analysis` shows).

So with balancing every device computes 3 + 2 (C - 1) blocks of c x c (the two causal ones
masked), where the whole sequence on one device computes (2C)^2 of them (XLA's attention masks
the causal half too): (2C + 1) / 4C of 1/C of it each. Within a device each block runs
`model.attention_block` queries at a time in a loop (`attention.blocked`, `block_grads`), so one
such (block, c) score matrix exists at a time.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxpar.config import CONTEXT_ATTENTION as STRATEGIES
from jaxpar.mesh import CONTEXT
from jaxpar.model.attention import (
    Partial,
    block_grads,
    blocked,
    delta,
    empty,
    finish,
    flash,
    group,
    merge,
    varying,
)
from jaxpar.sharding import gather_copies


def sequence_order(seq: int, pieces: int, balanced: bool) -> np.ndarray:
    """The positions of a sequence of `seq` tokens in the order they are stored, so that piece i
    of `pieces` (a contiguous run of seq / pieces) holds its share: with `balanced`, chunks i and
    2 * pieces - 1 - i of 2 * pieces; else the i-th run itself."""
    if not balanced or pieces == 1:
        return np.arange(seq)
    chunks = np.arange(seq).reshape(2 * pieces, -1)
    return np.concatenate([np.concatenate([chunks[i], chunks[-1 - i]]) for i in range(pieces)])


def pieces() -> int:
    """The number of sequence pieces here: the `context` axis's size inside a program manual over
    it, else 1 (the whole sequence is here, or XLA moves it)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or CONTEXT not in mesh.manual_axes:
        return 1
    return mesh.shape[CONTEXT]


def positions(t: int, balanced: bool, piece: jax.Array | int | None = None) -> jax.Array:
    """(T,) the positions of the T tokens here: 0..T-1 unless the sequence is split over
    `context`, then piece `piece`'s share of it (default: this device's; `sequence_order`)."""
    c = pieces()
    order = sequence_order(t * c, c, balanced).reshape(c, t)
    if c == 1:
        return jnp.asarray(order[0])
    piece = jax.lax.axis_index(CONTEXT) if piece is None else piece
    return jnp.asarray(order, jnp.int32)[piece]


def attend(
    q_BTNH: jax.Array,
    k_BTKH: jax.Array,
    v_BTKH: jax.Array,
    *,
    strategy: str,
    balanced: bool,
    block: int,
) -> jax.Array:
    """Causal attention of this piece's queries over the whole sequence's keys (see the module
    docstring); call it inside a program manual over `context`.

    Returns:
        (B, T, N, H) in the queries' dtype.
    """
    if strategy == "ring":
        return _ring(balanced, block)(q_BTNH, k_BTKH, v_BTKH)
    if strategy == "all_gather":
        return _gathered(q_BTNH, k_BTKH, v_BTKH, balanced, block)
    raise ValueError(f"context attention {strategy!r} is not one of {', '.join(STRATEGIES)}")


@functools.partial(jax.checkpoint, static_argnums=(3, 4))
def _gathered(q_BTNH, k_BTKH, v_BTKH, balanced: bool, block: int) -> jax.Array:
    t = q_BTNH.shape[1]
    k_BSKH, v_BSKH = (gather_copies(x, CONTEXT, 1) for x in (k_BTKH, v_BTKH))
    k_positions = jnp.asarray(sequence_order(t * pieces(), pieces(), balanced))
    return flash(q_BTNH, k_BSKH, v_BSKH, positions(t, balanced), k_positions, block)


# -- ring attention ---------------------------------------------------------------------------

Half = int | jax.Array  # 0 or 1, static, or traced where it differs between devices


FIRST = [(0, 0), (1, 0), (1, 1)]  # hop 0's (query half, key half) blocks: (0, 1) is hidden


def _blocks(hop: jax.Array, balanced: bool) -> list[tuple[Half, Half]]:
    """The (query half, key half) blocks computed at `hop` > 0 (see the module docstring)."""
    if not balanced:
        return [(0, 0), (0, 1), (1, 0), (1, 1)]
    i = jax.lax.axis_index(CONTEXT)
    j = (i - hop) % jax.lax.axis_size(CONTEXT)
    s = (j > i).astype(jnp.int32)
    return [(1, 0), (s, s)]


def _halves(x_BTX: jax.Array) -> jax.Array:
    """(B, T, ...) -> (2, B, c, ...)."""
    b, t = x_BTX.shape[:2]
    return jnp.moveaxis(x_BTX.reshape(b, 2, t // 2, *x_BTX.shape[2:]), 1, 0)


def _whole(x_2BcX: jax.Array) -> jax.Array:
    """The inverse of `_halves`."""
    _, b, c = x_2BcX.shape[:3]
    return jnp.moveaxis(x_2BcX, 0, 1).reshape(b, 2 * c, *x_2BcX.shape[3:])


def _stat_halves(x_BKGT: jax.Array) -> jax.Array:
    """(B, K, G, T) -> (2, B, K, G, c)."""
    return jnp.moveaxis(x_BKGT.reshape(*x_BKGT.shape[:3], 2, -1), 3, 0)


def _at(tree, half: Half):
    return jax.tree.map(lambda a: a[half], tree)


def _put(tree, half: Half, value):
    return jax.tree.map(lambda a, x: a.at[half].set(x), tree, value)


def _next(tree):
    """`tree` from the previous device of the `context` ring (i - 1 -> i)."""
    c = jax.lax.axis_size(CONTEXT)
    return jax.lax.ppermute(tree, CONTEXT, [(i, (i + 1) % c) for i in range(c)])


@functools.cache
def _ring(balanced: bool, block: int):
    """Ring attention `(q_BTNH, k_BTKH, v_BTKH) -> out_BTNH` with its own backward.

    Hop 0 runs on this piece's own keys; hops 1 .. C - 1 are one `lax.scan`, each step first
    taking the previous device's keys (`_next`), so that one hop's blocks are computed at a time
    and the program does not grow with C.
    """

    def ring_hops(step, carry, t: int):
        """`step(carry, blocks, k_pos_2c)` on this piece's keys, then for each later hop after
        `carry`'s travelling part (its first element) moved one device on."""
        c, here = jax.lax.axis_size(CONTEXT), jax.lax.axis_index(CONTEXT)
        carry = step(carry, FIRST, positions(t, balanced).reshape(2, t // 2))

        def hop(carry, h):
            carry = (_next(carry[0]), *carry[1:])
            k_pos_2c = positions(t, balanced, (here - h) % c).reshape(2, t // 2)
            return step(carry, _blocks(h, balanced), k_pos_2c), None

        return jax.lax.scan(hop, carry, jnp.arange(1, c))[0]

    def forward(q_BTNH, k_BTKH, v_BTKH):
        t, kv_heads = q_BTNH.shape[1], k_BTKH.shape[2]
        q_2BcKGH = _halves(group(q_BTNH, kv_heads))
        q_pos_2c = positions(t, balanced).reshape(2, t // 2)

        def step(carry, blocks, k_pos_2c):
            (k_2, v_2), acc = carry
            for qh, kh in blocks:
                part = blocked(q_2BcKGH[qh], k_2[kh], v_2[kh], q_pos_2c[qh], k_pos_2c[kh], block)
                acc = _put(acc, qh, merge(_at(acc, qh), part))
            return (k_2, v_2), acc

        acc = jax.tree.map(lambda *a: varying(jnp.stack(a)), *[empty(q_2BcKGH[0])] * 2)
        _, acc = ring_hops(step, ((_halves(k_BTKH), _halves(v_BTKH)), acc), t)
        whole = Partial(_whole(acc.out_BTKGH), *(
            jnp.concatenate([a[0], a[1]], axis=-1) for a in (acc.top_BKGT, acc.total_BKGT)
        ))  # fmt: skip
        out_BTNH = finish(whole, q_BTNH.dtype)
        return out_BTNH, (q_BTNH, k_BTKH, v_BTKH, out_BTNH, whole.logsumexp_BKGT)

    def backward(residuals, dout_BTNH):
        q_BTNH, k_BTKH, v_BTKH, out_BTNH, lse_BKGT = residuals
        t, kv_heads = q_BTNH.shape[1], k_BTKH.shape[2]
        q_2BcKGH = _halves(group(q_BTNH, kv_heads))
        do_2BcKGH = _halves(group(dout_BTNH, kv_heads))
        delta_BKGT = delta(group(dout_BTNH, kv_heads), group(out_BTNH, kv_heads))
        lse_2BKGc, delta_2BKGc = _stat_halves(lse_BKGT), _stat_halves(delta_BKGT)
        q_pos_2c = positions(t, balanced).reshape(2, t // 2)

        def step(carry, blocks, k_pos_2c):
            (k_2, v_2, dk_2, dv_2), dq_2BcKGH = carry
            for qh, kh in blocks:
                dq, dk, dv = block_grads(
                    q_2BcKGH[qh], k_2[kh], v_2[kh], do_2BcKGH[qh], lse_2BKGc[qh],
                    delta_2BKGc[qh], q_pos_2c[qh], k_pos_2c[kh], block,
                )  # fmt: skip
                dq_2BcKGH = dq_2BcKGH.at[qh].add(dq)
                dk_2, dv_2 = dk_2.at[kh].add(dk), dv_2.at[kh].add(dv)
            return (k_2, v_2, dk_2, dv_2), dq_2BcKGH

        zeros = lambda a: varying(jnp.zeros(a.shape, jnp.float32))  # noqa: E731
        k_2, v_2 = _halves(k_BTKH), _halves(v_BTKH)
        carry = ((k_2, v_2, zeros(k_2), zeros(v_2)), zeros(q_2BcKGH))
        (_, _, dk_2, dv_2), dq_2BcKGH = ring_hops(step, carry, t)
        dk_2, dv_2 = _next((dk_2, dv_2))  # each piece's gradients, home
        dq_BTNH = _whole(dq_2BcKGH).reshape(q_BTNH.shape)
        return (dq_BTNH.astype(q_BTNH.dtype), _whole(dk_2).astype(k_BTKH.dtype),
                _whole(dv_2).astype(v_BTKH.dtype))  # fmt: skip

    @jax.custom_vjp
    def ring(q_BTNH, k_BTKH, v_BTKH):
        return forward(q_BTNH, k_BTKH, v_BTKH)[0]

    ring.defvjp(forward, backward)
    return ring


# -- a KV cache split over `context` (serving) --------------------------------------------------
#
# The cache is striped: position p lives on piece p % C, at entry p // C of its S entries, so a
# decode step writes on one piece, a sequence grows every piece's share evenly, and a prompt run
# starting at a multiple of C, stored in `striped_order`, hands each piece the tokens whose
# positions it keeps. Masks come from positions, so no layout is assumed beyond that.


def striped_order(t: int, pieces: int) -> np.ndarray:
    """The offsets of a run of `t` tokens (a multiple of `pieces`) in the order they are stored
    when the run is split over `pieces`: piece i holds offsets i, i + pieces, i + 2 pieces, ...
    (`sequence_order` is training's order; this one is the striped cache's)."""
    return np.arange(t).reshape(-1, pieces).T.reshape(-1)


def striped_index(offsets: jax.Array, t: int, pieces: int) -> jax.Array:
    """Where offset `offsets` of a run of `t` tokens sits in `striped_order`."""
    return offsets % pieces * (t // pieces) + offsets // pieces


def cache_index(positions: jax.Array, entries: int) -> jax.Array:
    """The entry of this piece's cache (of `entries`) that holds each position: p // C where
    this piece keeps p, else `entries` (past the end: a write there is dropped)."""
    c = pieces()
    if c == 1:
        return positions
    return jnp.where(positions % c == jax.lax.axis_index(CONTEXT), positions // c, entries)


def attend_cached(
    q_BTNH: jax.Array,
    k_BTKH: jax.Array,
    v_BTKH: jax.Array,
    positions_BT: jax.Array,
    cache_k_BKSH: jax.Array,
    cache_v_BKSH: jax.Array,
    *,
    block: int,
) -> jax.Array:
    """Attention of this call's queries over a striped cache split over `context` and over
    this call's own keys (every position a query sees is in one or the other): the keys this
    piece keeps join its share of the cache, and each query's `Partial` over every piece's share
    is merged in float32. Call it inside a program manual over `context`.

    Several queries a row (a prompt run: prefill or a prompt piece, each piece holding its own
    share of it, or the same queries on every piece) travel the ring instead of the cache, which
    is long and stays put: C hops, each merging the next piece's `Partial`, the last one home, so
    a device holds T queries of a run of C * T. One query a row is a decode step, whose
    token every piece holds: every piece attends it over its share, and the shares merge with
    one reduction per layer, pmax of the maximum and psum of the rescaled sum and output.

    Returns:
        (B, T, N, H) in the queries' dtype.
    """
    b, s = cache_k_BKSH.shape[0], cache_k_BKSH.shape[2]
    at_BT = cache_index(positions_BT, s)
    rows_BT = jnp.broadcast_to(jnp.arange(b)[:, None], at_BT.shape)

    def joined(cache_BKSH: jax.Array, new_BTKH: jax.Array) -> jax.Array:
        """The cache with this call's entries, as (B, S, K, H) for `blocked` (the indices
        around the slice put B and T first, as the new entries are)."""
        cache_BKSH = cache_BKSH.at[rows_BT, :, at_BT].set(new_BTKH.astype(cache_BKSH.dtype),
                                                          mode="drop")  # fmt: skip
        return jnp.swapaxes(cache_BKSH, 1, 2)

    k_BSKH, v_BSKH = joined(cache_k_BKSH, k_BTKH), joined(cache_v_BKSH, v_BTKH)
    c = pieces()
    k_positions_BS = jnp.broadcast_to(jnp.arange(s) * c + jax.lax.axis_index(CONTEXT), (b, s))

    def here(q_BTKGH: jax.Array, q_positions_BT: jax.Array) -> Partial:
        """The queries' `Partial` over this piece's keys, `block` queries at a time."""
        return blocked(q_BTKGH, k_BSKH, v_BSKH, q_positions_BT, k_positions_BS, block)

    q_BTKGH = group(q_BTNH, k_BTKH.shape[2])
    if q_BTNH.shape[1] > 1:  # a prompt run: the ring

        def hop(travel: tuple, _) -> tuple[tuple, None]:
            queries, acc = travel
            return _next((queries, merge(acc, here(*queries)))), None

        # C hops in a loop, the last one home: one piece's blocks exist at a time (unrolled, on
        # XLA:CPU with `jaxpar.runtime`'s split heaps, each hop's would keep its own buffers).
        # (the running state varies over the program's manual axes, as the cache it reads does)
        acc = jax.tree.map(varying, empty(q_BTKGH))
        start = ((q_BTKGH, positions_BT), acc)
        (_, acc), _ = jax.lax.scan(hop, start, length=c)
        return finish(acc, q_BTNH.dtype)
    mine = here(q_BTKGH, positions_BT)
    top_BKGT = jax.lax.pmax(mine.top_BKGT, CONTEXT)
    scale_BKGT = jnp.exp(mine.top_BKGT - top_BKGT)
    out_BTKGH, total_BKGT = jax.lax.psum(
        (mine.out_BTKGH * jnp.moveaxis(scale_BKGT, 3, 1)[..., None], mine.total_BKGT * scale_BKGT),
        CONTEXT,
    )
    return finish(Partial(out_BTKGH, top_BKGT, total_BKGT), q_BTNH.dtype)
