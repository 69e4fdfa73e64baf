"""A Llama-style decoder in Flax NNX with logical axis names on every parameter.

Dimension key (suffixes on array names, letters in einsum strings):
    B batch   T sequence (queries)   S sequence (keys, in attention only)   D model dim
    N query heads   K kv heads   G query heads per kv head   H head dim   F mlp hidden   V vocab
    C fused projections (G queries + key + value per kv head, or gate + up)

Tensor parallelism is Megatron's, expressed only through logical names: q/k/v and gate/up are
column-parallel (output dims `heads`/`kv_heads`/`mlp`), the attention output and MLP down are
row-parallel (input dims `heads`/`mlp`), and the embedding and LM head are split over `vocab`. XLA
turns each row-parallel contraction into one all-reduce of a (B, T, D) activation.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpar.config import ModelConfig
from jaxpar.pipeline.layout import StageLayout
from jaxpar.sharding import (
    ACT_EMBED,
    ACT_KV_HEADS,
    ACT_MLP,
    ACT_VOCAB,
    BATCH,
    EMBED,
    HEAD_DIM,
    HEADS,
    KV_HEADS,
    LAYERS,
    MLP,
    NORM,
    OUTER_BATCH,
    SEQ,
    STAGE,
    VOCAB,
    Rules,
)

X_AXES = (BATCH, SEQ, ACT_EMBED)
OUTER_X_AXES = (OUTER_BATCH, SEQ, ACT_EMBED)


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, axes: tuple[str, ...]) -> nnx.Param:
    """A float32 parameter drawn from N(0, std^2), truncated at 2 std, tagged with logical axes."""
    init = jax.nn.initializers.truncated_normal(std)
    return nnx.Param(init(rngs.params(), shape, jnp.float32), logical_axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=(NORM,))
        self.eps = eps

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        x = x_BTD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * self.scale[...]).astype(x_BTD.dtype)


def rope(x_BTNH: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding in Hugging Face's convention: dimension i pairs with i + H/2."""
    h = x_BTNH.shape[-1]
    inv_freq_H2 = theta ** (-jnp.arange(0, h, 2, dtype=jnp.float32) / h)
    angle_BTH2 = positions_BT[..., None].astype(jnp.float32) * inv_freq_H2
    cos, sin = jnp.cos(angle_BTH2)[:, :, None, :], jnp.sin(angle_BTH2)[:, :, None, :]
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)


class KVCache(NamedTuple):
    """One layer's keys and values, (B, S, K, H) each, S the longest sequence it can hold."""

    k: jax.Array
    v: jax.Array


class Attention(nnx.Module):
    """Causal grouped-query attention; heads are split over `tensor` (kv heads with them)."""

    def __init__(self, cfg: ModelConfig, rules: Rules, *, rngs: nnx.Rngs):
        d, n, k, h = cfg.dim, cfg.heads, cfg.kv_heads, cfg.head_dim
        std_in, std_out = 1 / math.sqrt(d), 1 / math.sqrt(n * h * 2 * cfg.layers)
        self.wq_DNH = _param(rngs, (d, n, h), std_in, (EMBED, HEADS, HEAD_DIM))
        self.wk_DKH = _param(rngs, (d, k, h), std_in, (EMBED, KV_HEADS, HEAD_DIM))
        self.wv_DKH = _param(rngs, (d, k, h), std_in, (EMBED, KV_HEADS, HEAD_DIM))
        self.wo_NHD = _param(rngs, (n, h, d), std_out, (HEADS, HEAD_DIM, EMBED))
        self.cfg, self.rules = cfg, rules

    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array) -> jax.Array:
        return self.cached(x_BTD, positions_BT, None)[0]

    def cached(
        self, x_BTD: jax.Array, positions_BT: jax.Array, cache: KVCache | None
    ) -> tuple[jax.Array, KVCache | None]:
        """Attention, writing this call's keys and values into `cache` when one is given.

        With a cache, T > 1 is a prefill from position 0 (the cache's first T positions are
        written, attention is causal within the call) and T = 1 one decode step: each row writes
        its key and value at its own position and attends to every cached position up to it.
        """
        cfg, dtype = self.cfg, x_BTD.dtype
        k_heads, g, h = cfg.kv_heads, cfg.heads // cfg.kv_heads, cfg.head_dim
        # One fused projection, as Megatron's QKV: C = G query heads + 1 key + 1 value per kv head.
        # Query head n belongs to kv head n // G, so the concatenation stays local to each tensor
        # rank, and the backward pass needs one all-reduce of dx instead of three.
        d = x_BTD.shape[-1]
        w_DKCH = jnp.concatenate(
            [
                self.wq_DNH[...].reshape(d, k_heads, g, h),
                self.wk_DKH[...][:, :, None, :],
                self.wv_DKH[...][:, :, None, :],
            ],
            axis=2,
        ).astype(dtype)
        qkv_BTKCH = jnp.einsum("BTD,DKCH->BTKCH", x_BTD, w_DKCH)
        qkv_BTKCH = self.rules.constrain(qkv_BTKCH, (BATCH, SEQ, ACT_KV_HEADS, None, None))
        b, t = x_BTD.shape[:2]
        q_BTNH = qkv_BTKCH[:, :, :, :g].reshape(b, t, cfg.heads, h)
        k_BSKH, v_BSKH = qkv_BTKCH[:, :, :, g], qkv_BTKCH[:, :, :, g + 1]
        q_BTNH = rope(q_BTNH, positions_BT, cfg.rope_theta)
        k_BSKH = rope(k_BSKH, positions_BT, cfg.rope_theta)
        mask_BTS = positions_BT[:, :, None] >= positions_BT[:, None, :]  # causal
        if cache is not None and t > 1:
            cache = KVCache(cache.k.at[:, :t].set(k_BSKH), cache.v.at[:, :t].set(v_BSKH))
        elif cache is not None:
            # A select rather than a scatter: rows write at different positions, and the
            # cache's batch and kv-head shardings carry through elementwise.
            s_positions = jnp.arange(cache.k.shape[1])
            at_BS11 = (s_positions[None, :] == positions_BT)[:, :, None, None]
            cache = KVCache(
                jnp.where(at_BS11, k_BSKH, cache.k), jnp.where(at_BS11, v_BSKH, cache.v)
            )
            k_BSKH, v_BSKH = cache.k, cache.v
            mask_BTS = s_positions[None, None, :] <= positions_BT[:, :, None]

        q_BTKGH = q_BTNH.reshape(b, t, k_heads, g, h)
        scores_BKGTS = jnp.einsum("BTKGH,BSKGH->BKGTS", q_BTKGH, k_BSKH[:, :, :, None, :])
        scores_BKGTS = scores_BKGTS.astype(jnp.float32) / math.sqrt(h)
        mask_BKGTS = mask_BTS[:, None, None]
        scores_BKGTS = jnp.where(mask_BKGTS, scores_BKGTS, jnp.finfo(jnp.float32).min)
        probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(dtype)
        out_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", probs_BKGTS, v_BSKH)
        out_BTNH = out_BTKGH.reshape(b, t, cfg.heads, h)
        out_BTD = jnp.einsum("BTNH,NHD->BTD", out_BTNH, self.wo_NHD[...].astype(dtype))
        return self.rules.constrain(out_BTD, X_AXES), cache


class SwiGLU(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); the hidden dimension F is split over `tensor`."""

    def __init__(self, cfg: ModelConfig, rules: Rules, *, rngs: nnx.Rngs):
        d, f = cfg.dim, cfg.mlp_dim
        self.w_gate_DF = _param(rngs, (d, f), 1 / math.sqrt(d), (EMBED, MLP))
        self.w_up_DF = _param(rngs, (d, f), 1 / math.sqrt(d), (EMBED, MLP))
        self.w_down_FD = _param(rngs, (f, d), 1 / math.sqrt(f * 2 * cfg.layers), (MLP, EMBED))
        self.rules = rules

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        dtype = x_BTD.dtype
        # Gate and up as one contraction, so the backward pass all-reduces dx once.
        w_DCF = jnp.stack([self.w_gate_DF[...], self.w_up_DF[...]], axis=1).astype(dtype)
        gate_up_BTCF = jnp.einsum("BTD,DCF->BTCF", x_BTD, w_DCF)
        gate_BTF, up_BTF = gate_up_BTCF[:, :, 0], gate_up_BTCF[:, :, 1]
        h_BTF = self.rules.constrain(jax.nn.silu(gate_BTF) * up_BTF, (BATCH, SEQ, ACT_MLP))
        out_BTD = jnp.einsum("BTF,FD->BTD", h_BTF, self.w_down_FD[...].astype(dtype))
        return self.rules.constrain(out_BTD, X_AXES)


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, rules: Rules, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, rules, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg, rules, rngs=rngs)

    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array) -> jax.Array:
        return self.cached(x_BTD, positions_BT, None)[0]

    def cached(
        self, x_BTD: jax.Array, positions_BT: jax.Array, cache: KVCache | None
    ) -> tuple[jax.Array, KVCache | None]:
        """The block, reading and writing a KV cache (see `Attention.cached`)."""
        attn_BTD, cache = self.attn.cached(self.attn_norm(x_BTD), positions_BT, cache)
        x_BTD = x_BTD + attn_BTD
        return x_BTD + self.mlp(self.mlp_norm(x_BTD)), cache


class Llama(nnx.Module):
    """Token embedding, a stack of blocks run by a scan, final norm, LM head (untied by default).

    The blocks' parameters are stored by pipeline stage, [P, v * c, ...] on logical axes
    (`stage`, `layers`, ...), as `layout` says; without pipelining that is [1, L, ...]. They are
    drawn in logical layer order first, so a model initialises identically on every layout. A scan
    keeps compile time flat in depth: XLA sees one block body with a trip count.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        rules: Rules,
        *,
        rngs: nnx.Rngs,
        layout: StageLayout | None = None,
    ):
        self.cfg, self.rules = cfg, rules
        self.layout = layout = layout or StageLayout(cfg.layers)
        self.embed_VD = _param(rngs, (cfg.vocab, cfg.dim), 1.0, (VOCAB, EMBED))

        @nnx.split_rngs(splits=cfg.layers)
        @nnx.vmap(transform_metadata={nnx.PARTITION_NAME: LAYERS, "logical_axes": LAYERS})
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rules, rngs=rngs)

        graphdef, blocks_L = nnx.split(make_blocks(rngs))
        blocks_SC = jax.tree.map(
            lambda v: v.replace(
                layout.to_stages(v.get_value()), logical_axes=(STAGE, *v.logical_axes)
            ),
            blocks_L,
            is_leaf=lambda x: isinstance(x, nnx.Variable),
        )
        self.blocks = nnx.merge(graphdef, blocks_SC)
        self.final_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.head_DV = _param(
                rngs, (cfg.dim, cfg.vocab), 1 / math.sqrt(cfg.dim), (EMBED, VOCAB)
            )

    def embed(self, tokens_BT: jax.Array, dtype: jnp.dtype) -> jax.Array:
        # A one-hot contraction over the vocab-sharded table is Megatron's vocab-parallel
        # embedding: each tensor rank looks up the ids it owns, then one all-reduce of (B, T, D).
        onehot_BTV = jax.nn.one_hot(tokens_BT, self.cfg.vocab, dtype=dtype)
        onehot_BTV = self.rules.constrain(onehot_BTV, (OUTER_BATCH, SEQ, ACT_VOCAB))
        x_BTD = jnp.einsum("BTV,VD->BTD", onehot_BTV, self.embed_VD[...].astype(dtype))
        return self.rules.constrain(x_BTD, OUTER_X_AXES)

    def logits(self, x_BTD: jax.Array) -> jax.Array:
        """float32 logits (B, T, V), split over `tensor` along V; never gathered here."""
        x_BTD = self.final_norm(self.rules.constrain(x_BTD, OUTER_X_AXES))
        w_DV = self.embed_VD[...].T if self.cfg.tie_embeddings else self.head_DV[...]
        logits_BTV = jnp.einsum("BTD,DV->BTV", x_BTD, w_DV.astype(x_BTD.dtype))
        return self.rules.constrain(logits_BTV.astype(jnp.float32), (OUTER_BATCH, SEQ, ACT_VOCAB))

    def __call__(
        self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None, dtype=jnp.float32
    ) -> jax.Array:
        """Args: token ids (B, T). Returns: float32 logits (B, T, V)."""
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
        x_BTD = self.embed(tokens_BT, dtype)
        graphdef, blocks_SC = nnx.split(self.blocks)
        blocks_L = jax.tree.map(self.layout.to_logical, blocks_SC)

        def body(x_BTD: jax.Array, layer_state: nnx.State) -> tuple[jax.Array, None]:
            block = nnx.merge(graphdef, layer_state)
            return self.rules.constrain(block(x_BTD, positions_BT), X_AXES), None

        x_BTD, _ = jax.lax.scan(body, self.rules.constrain(x_BTD, X_AXES), blocks_L)
        return self.logits(x_BTD)


def token_nll(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Negative log-likelihood of each target token (B, T), vocab-parallel.

    With V split over `tensor`, the max, the sum of exponentials and the target logit are each
    partial per rank and reduced with one all-reduce of (B, T); (B, T, V) is never gathered.
    """
    m_BT = jax.lax.stop_gradient(jnp.max(logits_BTV, axis=-1))
    shifted_BTV = logits_BTV - m_BT[..., None]
    lse_BT = jnp.log(jnp.sum(jnp.exp(shifted_BTV), axis=-1))
    onehot_BTV = jax.nn.one_hot(targets_BT, logits_BTV.shape[-1], dtype=logits_BTV.dtype)
    target_BT = jnp.sum(shifted_BTV * onehot_BTV, axis=-1)
    return lse_BT - target_BT


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Mean next-token negative log-likelihood (see `token_nll`)."""
    return jnp.mean(token_nll(logits_BTV, targets_BT))
