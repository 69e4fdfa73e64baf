"""The one attention function: training, prefill and decode all call `attend`.

Dimension key: B batch, T query positions, S key positions, N query heads, K kv heads,
G = N / K query heads per kv head, H head dim.

Implementations (`model.attention`, resolved once per placement by `resolve`):

    xla          jaxpar's einsums: scores in float32, masked, softmax, values. Query heads are
                 grouped under their kv head (B, T, K, G, H), so keys and values are never
                 repeated for grouped-query attention.
    dot_product  `jax.nn.dot_product_attention`, which also groups instead of repeating; its
                 cuDNN flash kernel on GPUs in bfloat16 or float16 for causal calls (training,
                 prefill), its XLA path for masked ones (decode steps) and elsewhere.
    auto         the fused kernel where the platform has one and it works for this model (cuDNN
                 on GPUs in half precision, checked by compiling a small case once), else `xla`,
                 with a one-line notice when cuDNN was there but failed (it does on some CUDA 13
                 setups).

Masks come from positions: query t sees key s when `k_positions[s] <= q_positions[t]`. That is
causal attention in training and prefill (keys are the queries' own positions) and, in decode, the
cached positions written so far. Positions None mean 0, 1, 2, ... in every row, which lets cuDNN use
its causal kernel instead of a mask.

Flash attention (`model.attention_block`): on the XLA path a sequence longer than the block is
attended one block of queries at a time, in a loop (`blocked`), with flash attention's backward
(`flash`: each block's scores recomputed from the rows' log-sum-exp, never kept): no (T, S)
score matrix is ever whole. A sequence that fits in one block runs the same way as one block
(`query_block`), so that a layer's backward keeps the log-sum-exp instead of its (T, S) scores
and probabilities: one more matmul, and far less memory traffic where kept values are stacked
over ticks or layers. The same pieces merge the blocks of ring attention over the `context`
axis (`jaxpar.model.context`).
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable
from functools import cache
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxpar.errors import JaxparError

IMPLS = ("xla", "dot_product", "cudnn")  # what `resolve` returns


def attend(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    q_positions_BT: jax.Array | None = None,
    k_positions_BS: jax.Array | None = None,
    impl: str = "xla",
    block: int = 0,
) -> jax.Array:
    """Grouped-query attention of `q` over `k` and `v` (N a multiple of K), masked by position.

    Args:
        q_positions_BT, k_positions_BS: the positions of queries and keys; both None means
            0..T-1 and 0..S-1 in every row (T == S: plain causal attention).
        impl: one of `IMPLS` (see `resolve`).
        block: on the XLA path, attend `block` queries at a time when T is a longer multiple of
            it (see `blocked`); 0: all at once.

    Returns:
        (B, T, N, H) in the queries' dtype.
    """
    t, s = q_BTNH.shape[1], k_BSKH.shape[1]
    causal = q_positions_BT is None and k_positions_BS is None
    if q_positions_BT is None:
        q_positions_BT = jnp.broadcast_to(jnp.arange(t), q_BTNH.shape[:2])
    if k_positions_BS is None:
        k_positions_BS = jnp.broadcast_to(jnp.arange(s), k_BSKH.shape[:2])
    rows_per_block = query_block(t, block)
    if impl == "xla" and rows_per_block:
        return flash(q_BTNH, k_BSKH, v_BSKH, q_positions_BT, k_positions_BS, rows_per_block)
    mask_BTS = k_positions_BS[:, None, :] <= q_positions_BT[:, :, None]
    if impl == "xla":
        return _xla(q_BTNH, k_BSKH, v_BSKH, mask_BTS)
    if impl == "cudnn" and causal and t == s:
        return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, is_causal=True,
                                            implementation="cudnn")  # fmt: skip
    if impl in ("dot_product", "cudnn"):
        # A masked call (a decode step: one query over the cache) is memory-bound, where a flash
        # kernel gains nothing: jax's XLA path.
        return jax.nn.dot_product_attention(
            q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None], implementation="xla"
        )
    raise ValueError(f"attention implementation {impl!r} is not one of {', '.join(IMPLS)}")


class Partial(NamedTuple):
    """Attention of some queries over a part of their keys, to be merged with the other parts'
    (`merge`) before `finish` normalises it: a flash kernel's running state, in float32.

    Attributes:
        out_BTKGH: the unnormalised output, sum over this part's keys of exp(score - top) v.
        top_BKGT: the largest score over this part's keys (the float32 minimum where none is
            visible).
        total_BKGT: the sum over this part's keys of exp(score - top) (0 where none is visible).
    """

    out_BTKGH: jax.Array
    top_BKGT: jax.Array
    total_BKGT: jax.Array

    @property
    def logsumexp_BKGT(self) -> jax.Array:
        return self.top_BKGT + jnp.log(self.total_BKGT)


LOWEST = float(jnp.finfo(jnp.float32).min)


def group(q_BTNH: jax.Array, kv_heads: int) -> jax.Array:
    """(B, T, N, H) -> (B, T, K, G, H): each query head under its kv head (n // G)."""
    b, t, n, h = q_BTNH.shape
    return q_BTNH.reshape(b, t, kv_heads, n // kv_heads, h)


def scores(q_BTKGH: jax.Array, k_BSKH: jax.Array, mask_TS: jax.Array) -> jax.Array:
    """float32 scores (B, K, G, T, S) scaled by 1 / sqrt(H), the float32 minimum where masked."""
    s_BKGTS = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH).astype(jnp.float32)
    s_BKGTS = s_BKGTS / math.sqrt(q_BTKGH.shape[-1])
    return jnp.where(mask_TS, s_BKGTS, LOWEST)


def visible(q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
    """Which keys each query sees: (T,) and (S,) positions give (T, S); (B, T) and (B, S) give
    (B, 1, 1, T, S), broadcastable against scores."""
    mask = k_positions[..., None, :] <= q_positions[..., :, None]
    return mask if mask.ndim == 2 else mask[:, None, None]


def partial(
    q_BTKGH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask_TS: jax.Array
) -> Partial:
    """The `Partial` of grouped queries over one part of the keys (`mask_TS`: which they see)."""
    s_BKGTS = scores(q_BTKGH, k_BSKH, mask_TS)
    top_BKGT = s_BKGTS.max(-1)
    p_BKGTS = jnp.where(mask_TS, jnp.exp(s_BKGTS - top_BKGT[..., None]), 0.0)
    out_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", p_BKGTS.astype(v_BSKH.dtype), v_BSKH)
    return Partial(out_BTKGH.astype(jnp.float32), top_BKGT, p_BKGTS.sum(-1))


def merge(a: Partial, b: Partial) -> Partial:
    """The `Partial` over both parts' keys."""
    top_BKGT = jnp.maximum(a.top_BKGT, b.top_BKGT)
    scale_a, scale_b = jnp.exp(a.top_BKGT - top_BKGT), jnp.exp(b.top_BKGT - top_BKGT)
    row = lambda x: jnp.moveaxis(x, 3, 1)[..., None]  # noqa: E731  (B, K, G, T) -> (B, T, K, G, 1)
    return Partial(
        a.out_BTKGH * row(scale_a) + b.out_BTKGH * row(scale_b),
        top_BKGT,
        a.total_BKGT * scale_a + b.total_BKGT * scale_b,
    )


def empty(q_BTKGH: jax.Array) -> Partial:
    """The `Partial` over no keys."""
    b, t, k, g, _ = q_BTKGH.shape
    stats = jnp.zeros((b, k, g, t), jnp.float32)
    return Partial(jnp.zeros(q_BTKGH.shape, jnp.float32), stats + LOWEST, stats)


def finish(p: Partial, dtype: jnp.dtype) -> jax.Array:
    """The normalised output (B, T, N, H) in `dtype`."""
    b, t, k, g, h = p.out_BTKGH.shape
    out_BTKGH = p.out_BTKGH / jnp.moveaxis(p.total_BKGT, 3, 1)[..., None]
    return out_BTKGH.astype(dtype).reshape(b, t, k * g, h)


def _row_blocks(x: jax.Array, n: int, axis: int) -> jax.Array:
    """`x` with its query axis `axis` cut into n blocks, stacked first (what `lax.map` and
    `lax.scan` loop over)."""
    x = x.reshape(*x.shape[:axis], n, x.shape[axis] // n, *x.shape[axis + 1 :])
    return jnp.moveaxis(x, axis, 0)


def _rows_whole(x: jax.Array, axis: int) -> jax.Array:
    """The inverse of `_row_blocks`."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2 :])


def query_block(t: int, block: int) -> int:
    """The queries per block of `flash` on the XLA path for T queries and `model.attention_block`:
    the block where it cuts T into several, T itself where T fits in one (one block: flash's
    backward still recomputes the scores rather than keep a (T, S) matrix per layer), 0 where
    `attend` runs its plain einsums (block 0, or a T longer than the block but not a multiple)."""
    if block <= 0 or (t > block and t % block):
        return 0
    return min(t, block)


def _blocks_of(t: int, block: int) -> int:
    """How many query blocks `blocked` cuts T queries into (1: all at once)."""
    rows = query_block(t, block)
    return t // rows if rows else 1


def varying(x: jax.Array) -> jax.Array:
    """`x` typed as varying over every manual axis of the shard_map it is in (if any): what a
    loop's carry must be when the values added to it vary over axes the loop cannot know."""
    manual = tuple(jax.sharding.get_abstract_mesh().manual_axes)
    return jax.lax.pcast(x, manual, to="varying") if manual else x


def blocked(
    q_BTKGH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    q_positions: jax.Array,
    k_positions: jax.Array,
    block: int,
) -> Partial:
    """The `Partial` of queries over keys, `block` queries at a time in a loop (`lax.map`): one
    block's (block, S) scores exist at a time, however long the sequence (all at once when
    `block` is 0 or does not cut T into several blocks). Masks come from the positions, (T,) and
    (S,) or (B, T) and (B, S); a block of a causal call computes its masked keys too, so that
    every block has the same shape. Differentiate it through `flash` (or the ring), whose
    backward recomputes each block's scores (`block_grads`): autodiff would keep them all.
    """
    n = _blocks_of(q_BTKGH.shape[1], block)
    if n == 1:
        return partial(q_BTKGH, k_BSKH, v_BSKH, visible(q_positions, k_positions))
    parts = jax.lax.map(
        lambda a: partial(a[0], k_BSKH, v_BSKH, visible(a[1], k_positions)),
        (_row_blocks(q_BTKGH, n, 1), _row_blocks(q_positions, n, q_positions.ndim - 1)),
    )
    return Partial(
        _rows_whole(parts.out_BTKGH, 1),
        _rows_whole(parts.top_BKGT, 3),
        _rows_whole(parts.total_BKGT, 3),
    )


def block_grads(q_BTKGH, k_BSKH, v_BSKH, do_BTKGH, lse_BKGT, delta_BKGT, q_positions,
                k_positions, block: int):  # fmt: skip
    """Flash attention's backward: the gradients of queries (B, T, K, G, H) over keys
    (B, S, K, H), given the rows' final log-sum-exp and delta = sum(dout * out), (B, K, G, T),
    `block` queries at a time in a loop (`lax.scan`, the keys' gradients in its carry), as
    `blocked` computed them.

    Returns:
        float32 (dq (B, T, K, G, H), dk (B, S, K, H), dv (B, S, K, H)).
    """
    scale = 1 / math.sqrt(q_BTKGH.shape[-1])
    dtype = v_BSKH.dtype

    def one(carry: tuple, rows: tuple) -> tuple[tuple, jax.Array]:
        dk_BSKH, dv_BSKH = carry
        q_BtKGH, do_BtKGH, lse_BKGt, delta_BKGt, q_pos = rows
        mask = visible(q_pos, k_positions)
        s_BKGtS = scores(q_BtKGH, k_BSKH, mask)
        p_BKGtS = jnp.where(mask, jnp.exp(s_BKGtS - lse_BKGt[..., None]), 0.0)
        do_BtKGH = do_BtKGH.astype(dtype)
        dv_BSKH += jnp.einsum("BKGTS,BTKGH->BSKH", p_BKGtS.astype(dtype), do_BtKGH)
        dp_BKGtS = jnp.einsum("BTKGH,BSKH->BKGTS", do_BtKGH, v_BSKH).astype(jnp.float32)
        ds_BKGtS = (p_BKGtS * (dp_BKGtS - delta_BKGt[..., None]) * scale).astype(dtype)
        dk_BSKH += jnp.einsum("BKGTS,BTKGH->BSKH", ds_BKGtS, q_BtKGH)
        dq_BtKGH = jnp.einsum("BKGTS,BSKH->BTKGH", ds_BKGtS, k_BSKH).astype(jnp.float32)
        return (dk_BSKH, dv_BSKH), dq_BtKGH

    n = _blocks_of(q_BTKGH.shape[1], block)
    zeros = varying(jnp.zeros(k_BSKH.shape, jnp.float32))
    if n == 1:  # one block: no loop
        rows = (q_BTKGH, do_BTKGH, lse_BKGT, delta_BKGT, q_positions)
        (dk_BSKH, dv_BSKH), dq_BTKGH = one((zeros, zeros), rows)
        return dq_BTKGH, dk_BSKH, dv_BSKH
    rows = (
        _row_blocks(q_BTKGH, n, 1), _row_blocks(do_BTKGH, n, 1), _row_blocks(lse_BKGT, n, 3),
        _row_blocks(delta_BKGT, n, 3), _row_blocks(q_positions, n, q_positions.ndim - 1),
    )  # fmt: skip
    (dk_BSKH, dv_BSKH), dq_nBtKGH = jax.lax.scan(one, (zeros, zeros), rows)
    return _rows_whole(dq_nBtKGH, 1), dk_BSKH, dv_BSKH


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def flash(q_BTNH, k_BSKH, v_BSKH, q_positions, k_positions, block: int) -> jax.Array:
    """`blocked` attention, normalised, (B, T, N, H) in the queries' dtype, whose backward pass
    recomputes each block's scores from the rows' log-sum-exp (`block_grads`) instead of keeping
    them: memory O(T) besides one block's (block, S) scores."""
    return _flash_forward(q_BTNH, k_BSKH, v_BSKH, q_positions, k_positions, block)[0]


def _flash_forward(q_BTNH, k_BSKH, v_BSKH, q_positions, k_positions, block):
    grouped = blocked(group(q_BTNH, k_BSKH.shape[2]), k_BSKH, v_BSKH, q_positions, k_positions,
                      block)  # fmt: skip
    out_BTNH = finish(grouped, q_BTNH.dtype)
    kept = (q_BTNH, k_BSKH, v_BSKH, q_positions, k_positions, out_BTNH, grouped.logsumexp_BKGT)
    return out_BTNH, kept


def _flash_backward(block, kept, dout_BTNH):
    q_BTNH, k_BSKH, v_BSKH, q_positions, k_positions, out_BTNH, lse_BKGT = kept
    kv_heads = k_BSKH.shape[2]
    do_BTKGH = group(dout_BTNH, kv_heads)
    dq, dk, dv = block_grads(
        group(q_BTNH, kv_heads), k_BSKH, v_BSKH, do_BTKGH, lse_BKGT,
        delta(do_BTKGH, group(out_BTNH, kv_heads)), q_positions, k_positions, block,
    )  # fmt: skip
    return (dq.reshape(q_BTNH.shape).astype(q_BTNH.dtype), dk.astype(k_BSKH.dtype),
            dv.astype(v_BSKH.dtype), None, None)  # fmt: skip


flash.defvjp(_flash_forward, _flash_backward)


def delta(do_BTKGH: jax.Array, out_BTKGH: jax.Array) -> jax.Array:
    """(B, K, G, T) sum(dout * out) over H, in float32: the softmax's backward per row."""
    f32 = jnp.float32
    return jnp.einsum("BTKGH,BTKGH->BKGT", do_BTKGH.astype(f32), out_BTKGH.astype(f32))


def attend_cached(
    q_BTNH: jax.Array,
    k_BTKH: jax.Array,
    v_BTKH: jax.Array,
    positions_BT: jax.Array,
    cache_k_BKSH: jax.Array,
    cache_v_BKSH: jax.Array,
) -> jax.Array:
    """Attention of this call's queries over a KV cache's first positions and over this call's
    own keys: row b's cache holds its positions below `positions_BT[b, 0]` (what is cached beyond
    is not read), and its queries see their own keys causally by position. The cache is only
    read: the caller writes this call's keys into it afterwards.

    One softmax over both parts, merged as a flash kernel merges blocks (a shared maximum and sum
    in float32), so the cache is never concatenated or copied: it is (B, K, S, H), the order its
    two contractions batch and contract in. This is the KV-cached path for every implementation:
    a decode step is memory-bound, where a fused kernel gains nothing.

    Returns:
        (B, T, N, H) in the queries' dtype.
    """
    b, t, n, h = q_BTNH.shape
    k_heads = k_BTKH.shape[2]
    q_BTKGH = q_BTNH.reshape(b, t, k_heads, n // k_heads, h)
    lowest = jnp.finfo(jnp.float32).min

    def scaled(s_BKGTS: jax.Array, mask_BTS: jax.Array) -> jax.Array:
        s_BKGTS = s_BKGTS.astype(jnp.float32) / math.sqrt(h)
        return jnp.where(mask_BTS[:, None, None], s_BKGTS, lowest)

    cached_BS = jnp.arange(cache_k_BKSH.shape[2])[None, :] < positions_BT[:, :1]
    old_BKGTS = scaled(
        jnp.einsum("BTKGH,BKSH->BKGTS", q_BTKGH, cache_k_BKSH),
        jnp.broadcast_to(cached_BS[:, None, :], (b, t, cached_BS.shape[1])),
    )
    new_BKGTU = scaled(jnp.einsum("BTKGH,BUKH->BKGTU", q_BTKGH, k_BTKH),
                       positions_BT[:, None, :] <= positions_BT[:, :, None])  # fmt: skip
    top_BKGT1 = jnp.maximum(old_BKGTS.max(-1, keepdims=True), new_BKGTU.max(-1, keepdims=True))
    p_old_BKGTS, p_new_BKGTU = jnp.exp(old_BKGTS - top_BKGT1), jnp.exp(new_BKGTU - top_BKGT1)
    total_BKGT = p_old_BKGTS.sum(-1) + p_new_BKGTU.sum(-1)
    dtype = q_BTNH.dtype
    out_BTKGH = jnp.einsum(
        "BKGTS,BKSH->BTKGH", p_old_BKGTS.astype(dtype), cache_v_BKSH
    ) + jnp.einsum("BKGTU,BUKH->BTKGH", p_new_BKGTU.astype(dtype), v_BTKH)
    out_BTKGH = out_BTKGH.astype(jnp.float32) / jnp.moveaxis(total_BKGT, 3, 1)[..., None]
    return out_BTKGH.astype(dtype).reshape(b, t, n, h)


def _xla(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask_BTS: jax.Array):
    b, t, n, h = q_BTNH.shape
    k_heads = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(b, t, k_heads, n // k_heads, h)
    scores_BKGTS = jnp.einsum("BTKGH,BSKGH->BKGTS", q_BTKGH, k_BSKH[:, :, :, None, :])
    scores_BKGTS = scores_BKGTS.astype(jnp.float32) / math.sqrt(h)
    scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS, jnp.finfo(jnp.float32).min)
    probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(q_BTNH.dtype)
    out_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", probs_BKGTS, v_BSKH)
    return out_BTKGH.reshape(b, t, n, h)


def implementation(name: str, platform: str, dtype: str) -> str:
    """The implementation `model.attention=name` runs on `platform` (jax's backend name: cpu,
    gpu, tpu) in the compute dtype `dtype`, where cuDNN's kernel works: the one decision that
    `resolve` (the model, `jaxpar bench`, `jaxpar analyze`) and the planner's cost model (for a
    hardware profile's platform) share. cuDNN's flash kernel exists on GPUs, for half precision
    only."""
    fused = platform == "gpu" and dtype in ("bfloat16", "float16")
    if name == "xla" or (name == "auto" and not fused):
        return "xla"
    return "cudnn" if fused else "dot_product"


def resolve(
    name: str,
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: jnp.dtype,
    notice: Callable[[str], None] = lambda line: print(f"jaxpar: {line}", file=sys.stderr),
) -> str:
    """The implementation `attend` runs for `model.attention=name` on this platform.

    Raises:
        JaxparError: `dot_product` on a GPU where cuDNN's kernel fails for this model.
    """
    impl = implementation(name, jax.default_backend(), jnp.dtype(dtype).name)
    if impl != "cudnn":
        return impl
    failure = _cudnn_failure(heads, kv_heads, head_dim, jnp.dtype(dtype).name)
    if failure is None:
        return "cudnn"
    if name == "dot_product":
        raise JaxparError(
            f"model.attention=dot_product: cuDNN attention fails on this GPU ({failure}); use "
            "model.attention=xla or auto"
        )
    notice(f"cuDNN attention is not available here ({failure}); using model.attention=xla")
    return "xla"


@cache
def _cudnn_failure(heads: int, kv_heads: int, head_dim: int, dtype: str) -> str | None:
    """Why cuDNN's attention fails for these head shapes, or None when a causal forward and
    backward, as in training, compiles and runs."""
    q = jnp.zeros((1, 128, heads, head_dim), dtype)
    kv = jnp.zeros((1, 128, kv_heads, head_dim), dtype)

    def train(q, k, v):
        return jnp.sum(attend(q, k, v, impl="cudnn").astype(jnp.float32))

    try:
        jax.block_until_ready(jax.jit(jax.grad(train, argnums=(0, 1, 2)))(q, kv, kv))
    except Exception as e:  # cuDNN reports unsupported cases through many exception types
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}".strip()
    return None
