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

Blocked attention (`model.attention_block`): on the XLA path a sequence longer than the block is
attended one block of queries at a time (`Partial`s, merged as a flash kernel merges them), each
block of a causal call reading only the keys at or before its own, and each recomputed in the
backward pass rather than kept: no (T, S) score matrix is ever whole. The same pieces merge the
blocks of ring attention over the `context` axis (`jaxpar.model.context`).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from functools import cache
from typing import Any, NamedTuple

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
    if impl == "xla" and 0 < block < t and t % block == 0:
        grouped = blocked(
            group(q_BTNH, k_BSKH.shape[2]), k_BSKH, v_BSKH, q_positions_BT, k_positions_BS,
            causal=causal and t == s, block=block,
        )  # fmt: skip
        return finish(grouped, q_BTNH.dtype)
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


def after(x: jax.Array, done: Any) -> jax.Array:
    """`x`, available only once `done` (any tree of arrays, or None) is computed: blocks of
    attention have no data dependence on each other, and without one XLA schedules them all at
    once, every block's scores alive together, as if there were no blocks."""
    if done is None:
        return x
    return jax.lax.optimization_barrier((x, done))[0]


def blocked(
    q_BTKGH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    q_positions: jax.Array,
    k_positions: jax.Array,
    *,
    causal: bool,
    block: int,
) -> Partial:
    """The `Partial` of queries over keys, `block` queries at a time (all at once when `block`
    is 0 or does not divide T into several blocks).

    Each block's scores exist only while it is computed, and the backward pass recomputes them
    (a checkpoint per block). With `causal`, keys and queries are the same contiguous run of
    positions in order, so query block a reads keys [0, (a + 1) * block) alone: blocks entirely
    above the diagonal cost nothing. Masks still come from the positions, (T,) and (S,) or
    (B, T) and (B, S).
    """
    t = q_BTKGH.shape[1]
    if not 0 < block < t or t % block:
        return partial(q_BTKGH, k_BSKH, v_BSKH, visible(q_positions, k_positions))

    @jax.checkpoint
    def one(q_BtKGH, k_BsKH, v_BsKH, q_pos, k_pos) -> Partial:
        return partial(q_BtKGH, k_BsKH, v_BsKH, visible(q_pos, k_pos))

    parts: list[Partial] = []
    for a in range(t // block):
        rows = slice(a * block, (a + 1) * block)
        keys = slice(0, (a + 1) * block if causal else k_BSKH.shape[1])
        q_BtKGH = after(q_BTKGH[:, rows], parts[-1] if parts else None)
        parts.append(one(q_BtKGH, k_BSKH[:, keys], v_BSKH[:, keys], q_positions[..., rows],
                         k_positions[..., keys]))  # fmt: skip
    return Partial(
        jnp.concatenate([p.out_BTKGH for p in parts], axis=1),
        *(jnp.concatenate([getattr(p, f) for p in parts], axis=3)
          for f in ("top_BKGT", "total_BKGT")),
    )  # fmt: skip


def attend_cached(
    q_BTNH: jax.Array,
    k_BTKH: jax.Array,
    v_BTKH: jax.Array,
    positions_BT: jax.Array,
    cache_k_BSKH: jax.Array,
    cache_v_BSKH: jax.Array,
) -> jax.Array:
    """Attention of this call's queries over a KV cache's first positions and over this call's
    own keys: row b's cache holds its positions below `positions_BT[b, 0]` (what is cached beyond
    is not read), and its queries see their own keys causally by position. The cache is only
    read: the caller writes this call's keys into it afterwards.

    One softmax over both parts, merged as a flash kernel merges blocks (a shared maximum and sum
    in float32), so the cache is never concatenated or copied. This is the KV-cached path for
    every implementation: a decode step is memory-bound, where a fused kernel gains nothing.

    Returns:
        (B, T, N, H) in the queries' dtype.
    """
    b, t, n, h = q_BTNH.shape
    k_heads = k_BTKH.shape[2]
    q_BTKGH = q_BTNH.reshape(b, t, k_heads, n // k_heads, h)
    lowest = jnp.finfo(jnp.float32).min

    def scores(k_BSKH: jax.Array, mask_BTS: jax.Array) -> jax.Array:
        s_BKGTS = jnp.einsum("BTKGH,BSKGH->BKGTS", q_BTKGH, k_BSKH[:, :, :, None, :])
        s_BKGTS = s_BKGTS.astype(jnp.float32) / math.sqrt(h)
        return jnp.where(mask_BTS[:, None, None], s_BKGTS, lowest)

    cached_BS = jnp.arange(cache_k_BSKH.shape[1])[None, :] < positions_BT[:, :1]
    old_BKGTS = scores(
        cache_k_BSKH, jnp.broadcast_to(cached_BS[:, None, :], (b, t, cached_BS.shape[1]))
    )
    new_BKGTU = scores(k_BTKH, positions_BT[:, None, :] <= positions_BT[:, :, None])
    top_BKGT1 = jnp.maximum(old_BKGTS.max(-1, keepdims=True), new_BKGTU.max(-1, keepdims=True))
    p_old_BKGTS, p_new_BKGTU = jnp.exp(old_BKGTS - top_BKGT1), jnp.exp(new_BKGTU - top_BKGT1)
    total_BKGT = p_old_BKGTS.sum(-1) + p_new_BKGTU.sum(-1)
    dtype = q_BTNH.dtype
    out_BTKGH = jnp.einsum(
        "BKGTS,BSKH->BTKGH", p_old_BKGTS.astype(dtype), cache_v_BSKH
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
    # cuDNN's flash kernel exists on GPUs, for half precision only.
    fused = jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    if name == "xla" or (name == "auto" and not fused):
        return "xla"
    if not fused:
        return "dot_product"
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
