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
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from functools import cache

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
) -> jax.Array:
    """Grouped-query attention of `q` over `k` and `v` (N a multiple of K), masked by position.

    Args:
        q_positions_BT, k_positions_BS: the positions of queries and keys; both None means
            0..T-1 and 0..S-1 in every row (T == S: plain causal attention).
        impl: one of `IMPLS` (see `resolve`).

    Returns:
        (B, T, N, H) in the queries' dtype.
    """
    t, s = q_BTNH.shape[1], k_BSKH.shape[1]
    causal = q_positions_BT is None and k_positions_BS is None
    if q_positions_BT is None:
        q_positions_BT = jnp.broadcast_to(jnp.arange(t), q_BTNH.shape[:2])
    if k_positions_BS is None:
        k_positions_BS = jnp.broadcast_to(jnp.arange(s), k_BSKH.shape[:2])
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
