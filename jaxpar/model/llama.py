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
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxpar.config import ModelConfig
from jaxpar.model import context
from jaxpar.model.attention import attend, attend_cached
from jaxpar.model.layout import StageLayout
from jaxpar.model.remat import ATTENTION
from jaxpar.model.taps import SCALE, einsum
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
_ROW = 128  # random draws are transformed as (rows, 128) arrays; see truncated_normal


def truncated_normal(
    key: jax.Array, shape: tuple[int, ...], std: float, rules: Rules, axes: tuple[str, ...]
) -> jax.Array:
    """float32 draws from N(0, std^2) truncated at 2 std, the values of
    `jax.nn.initializers.truncated_normal`, bit for bit the same on every mesh layout.

    The random bits depend only on each element's index, but XLA's CPU code for `erf_inv` (jax
    0.12) rounds some elements differently depending on the shape of the array it runs on (an
    innermost dimension of 4 and one of 16 disagree in the last bit), and a sharded init runs it
    on each device's shard. So each device turns the uniform draws of its own shard (`axes` say
    which) into normal ones as one (rows, 128) array, the same innermost dimension on every layout;
    the optimization barrier keeps XLA from fusing that back into the shard's own shape.
    """
    sqrt2 = np.array(np.sqrt(2), np.float32)
    lower, upper = np.float32(-2.0), np.float32(2.0)
    u = jax.random.uniform(
        key, shape, jnp.float32, minval=jax.lax.erf(lower / sqrt2),
        maxval=jax.lax.erf(upper / sqrt2),
    )  # fmt: skip

    def normal(u: jax.Array) -> jax.Array:
        local, n = u.shape, u.size
        rows = -(-n // _ROW)
        u = jnp.pad(u.reshape(-1), (0, rows * _ROW - n)).reshape(rows, _ROW)
        x = sqrt2 * jax.lax.erf_inv(u)
        inf = np.float32(np.inf)
        x = jnp.clip(x, jax.lax.nextafter(lower, inf), jax.lax.nextafter(upper, -inf))
        x = jax.lax.optimization_barrier(x * jnp.array(std, jnp.float32))
        return x.reshape(-1)[:n].reshape(local)

    return rules.per_shard(normal, u, axes)


def _param(
    rngs: nnx.Rngs, shape: tuple[int, ...], std: float, rules: Rules, axes: tuple[str, ...]
) -> nnx.Param:
    """A float32 parameter drawn by `truncated_normal`, tagged with logical axes."""
    return nnx.Param(truncated_normal(rngs.params(), shape, std, rules, axes), logical_axes=axes)


Project = Callable[[str, str, jax.Array, jax.Array], jax.Array]


def rms_norm(
    x_BTD: jax.Array, scale_D: jax.Array, eps: float, project: Project = einsum, name: str = ""
) -> jax.Array:
    """RMSNorm in float32, returned in the input's dtype."""
    x = x_BTD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return project(name, SCALE, x, scale_D).astype(x_BTD.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=(NORM,))
        self.eps = eps

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        return rms_norm(x_BTD, self.scale[...], self.eps)


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
    """One layer's keys and values, (B, K, S, H) each, S the longest sequence it can hold
    (positions next to the head dim: see `jaxpar.infer.engine`)."""

    k: jax.Array
    v: jax.Array


class BlockWeights(NamedTuple):
    """One block's weights as its matmuls consume them, derived from the parameters once per step
    (training) or once per loaded model (serving) by `Block.weights`, never per layer call.

    A stacked Block gives them with the same leading axes ([P, v * c, ...] for `Llama.blocks`).
    """

    attn_norm_D: jax.Array
    w_qkv_DKCH: jax.Array  # C = G query heads + 1 key + 1 value per kv head
    wo_NHD: jax.Array
    mlp_norm_D: jax.Array
    w_gate_up_DCF: jax.Array  # C = gate, up
    w_down_FD: jax.Array


# The logical axes of `Llama.blocks.weights(...)`, as the parameters they come from have them.
BLOCK_WEIGHT_AXES = BlockWeights(
    attn_norm_D=(STAGE, LAYERS, NORM),
    w_qkv_DKCH=(STAGE, LAYERS, EMBED, KV_HEADS, None, HEAD_DIM),
    wo_NHD=(STAGE, LAYERS, HEADS, HEAD_DIM, EMBED),
    mlp_norm_D=(STAGE, LAYERS, NORM),
    w_gate_up_DCF=(STAGE, LAYERS, EMBED, None, MLP),
    w_down_FD=(STAGE, LAYERS, MLP, EMBED),
)


class Attention(nnx.Module):
    """Causal grouped-query attention; heads are split over `tensor` (kv heads with them)."""

    def __init__(self, cfg: ModelConfig, rules: Rules, impl: str, *, rngs: nnx.Rngs):
        d, n, k, h = cfg.dim, cfg.heads, cfg.kv_heads, cfg.head_dim
        std_in, std_out = 1 / math.sqrt(d), 1 / math.sqrt(n * h * 2 * cfg.layers)
        self.wq_DNH = _param(rngs, (d, n, h), std_in, rules, (EMBED, HEADS, HEAD_DIM))
        self.wk_DKH = _param(rngs, (d, k, h), std_in, rules, (EMBED, KV_HEADS, HEAD_DIM))
        self.wv_DKH = _param(rngs, (d, k, h), std_in, rules, (EMBED, KV_HEADS, HEAD_DIM))
        self.wo_NHD = _param(rngs, (n, h, d), std_out, rules, (HEADS, HEAD_DIM, EMBED))
        self.cfg, self.rules, self.impl = cfg, rules, impl

    def fused_qkv(self, dtype: jnp.dtype) -> jax.Array:
        """(..., D, K, C, H): one fused projection, as Megatron's QKV. Query head n belongs to kv
        head n // G, so the concatenation stays local to each tensor rank, and the backward pass
        needs one all-reduce of dx instead of three."""
        wq = self.wq_DNH[...]
        *lead, d, _, h = wq.shape
        k_heads = self.cfg.kv_heads
        parts = [
            wq.reshape(*lead, d, k_heads, self.cfg.heads // k_heads, h),
            self.wk_DKH[...][..., None, :],
            self.wv_DKH[...][..., None, :],
        ]
        return jnp.concatenate(parts, axis=-2).astype(dtype)

    def apply(
        self,
        w: BlockWeights,
        x_BTD: jax.Array,
        positions_BT: jax.Array | None,
        cache: KVCache | None,
        project: Project = einsum,
    ) -> tuple[jax.Array, KVCache | None]:
        """Attention on the block's derived weights, reading a KV cache when one is given.
        Positions None mean 0..T-1 in every row.

        With a cache, row b's cache holds its positions below its first one here
        (`positions_BT[b, 0]`; none when positions are None) and the queries attend to those and,
        causally, to this call's keys: a prefill (positions None), a prompt piece after a cached
        prefix, or a decode step (T = 1) are one path. The cache is only read; the second result
        is this call's keys and values, (B, T, K, H) each, for the caller to write into it.
        With the cache split over `context` (inside a program manual over it), it is striped
        and positions are always given (`context.attend_cached`).
        """
        cfg, dtype = self.cfg, x_BTD.dtype
        b, t = x_BTD.shape[:2]
        g, h = cfg.heads // cfg.kv_heads, cfg.head_dim
        qkv_BTKCH = project("w_qkv_DKCH", "BTD,DKCH->BTKCH", x_BTD, w.w_qkv_DKCH.astype(dtype))
        qkv_BTKCH = self.rules.constrain(qkv_BTKCH, (BATCH, SEQ, ACT_KV_HEADS, None, None))
        q_BTNH = qkv_BTKCH[:, :, :, :g].reshape(b, t, cfg.heads, h)
        k_BTKH, v_BTKH = qkv_BTKCH[:, :, :, g], qkv_BTKCH[:, :, :, g + 1]
        rope_positions_BT = positions_BT
        if rope_positions_BT is None:  # this piece's share of 0..T-1 (all of it but on `context`)
            rope_positions_BT = jnp.broadcast_to(
                context.positions(t, cfg.context_load_balance), (b, t)
            )
        q_BTNH = rope(q_BTNH, rope_positions_BT, cfg.rope_theta)
        k_BTKH = rope(k_BTKH, rope_positions_BT, cfg.rope_theta)
        if cache is not None and positions_BT is not None and context.pieces() > 1:
            out_BTNH = context.attend_cached(q_BTNH, k_BTKH, v_BTKH, positions_BT, cache.k,
                                             cache.v, block=cfg.attention_block)  # fmt: skip
        elif cache is not None and positions_BT is not None:
            out_BTNH = attend_cached(q_BTNH, k_BTKH, v_BTKH, positions_BT, cache.k, cache.v)
        elif positions_BT is None and context.pieces() > 1:  # the sequence split over `context`
            out_BTNH = context.attend(
                q_BTNH, k_BTKH, v_BTKH, strategy=cfg.context_attention,
                balanced=cfg.context_load_balance, block=cfg.attention_block,
            )  # fmt: skip
        else:  # nothing cached before this call: plain (causal) attention on its own keys
            out_BTNH = attend(q_BTNH, k_BTKH, v_BTKH, positions_BT, positions_BT, self.impl,
                              cfg.attention_block)  # fmt: skip
        out_BTNH = checkpoint_name(out_BTNH, ATTENTION)  # what remat may keep
        out_BTD = project("wo_NHD", "BTNH,NHD->BTD", out_BTNH, w.wo_NHD.astype(dtype))
        new = None if cache is None else KVCache(k_BTKH.astype(cache.k.dtype),
                                                  v_BTKH.astype(cache.v.dtype))  # fmt: skip
        return self.rules.constrain(out_BTD, X_AXES), new


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) * up, whose backward pass keeps its two inputs alone: autodiff would also keep
    the sigmoid, the silu and their products, four more (B, T, F) arrays per layer, each a stack
    over the layers and ticks that XLA fills before the loop."""
    return jax.nn.silu(gate) * up


def _swiglu_forward(gate: jax.Array, up: jax.Array) -> tuple[jax.Array, tuple]:
    return swiglu(gate, up), (gate, up)


def _swiglu_backward(kept: tuple, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    gate, up = kept
    sigmoid = jax.nn.sigmoid(gate)
    return g * up * sigmoid * (1 + gate * (1 - sigmoid)), g * gate * sigmoid


swiglu.defvjp(_swiglu_forward, _swiglu_backward)


class SwiGLU(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); the hidden dimension F is split over `tensor`."""

    def __init__(self, cfg: ModelConfig, rules: Rules, *, rngs: nnx.Rngs):
        d, f = cfg.dim, cfg.mlp_dim
        std_in, std_out = 1 / math.sqrt(d), 1 / math.sqrt(f * 2 * cfg.layers)
        self.w_gate_DF = _param(rngs, (d, f), std_in, rules, (EMBED, MLP))
        self.w_up_DF = _param(rngs, (d, f), std_in, rules, (EMBED, MLP))
        self.w_down_FD = _param(rngs, (f, d), std_out, rules, (MLP, EMBED))
        self.rules = rules

    def fused_gate_up(self, dtype: jnp.dtype) -> jax.Array:
        """(..., D, C, F): gate and up as one contraction, so the backward pass all-reduces dx
        once."""
        return jnp.stack([self.w_gate_DF[...], self.w_up_DF[...]], axis=-2).astype(dtype)

    def apply(self, w: BlockWeights, x_BTD: jax.Array, project: Project = einsum) -> jax.Array:
        dtype = x_BTD.dtype
        gate_up_BTCF = project(
            "w_gate_up_DCF", "BTD,DCF->BTCF", x_BTD, w.w_gate_up_DCF.astype(dtype)
        )
        gate_BTF, up_BTF = gate_up_BTCF[:, :, 0], gate_up_BTCF[:, :, 1]
        h_BTF = self.rules.constrain(swiglu(gate_BTF, up_BTF), (BATCH, SEQ, ACT_MLP))
        out_BTD = project("w_down_FD", "BTF,FD->BTD", h_BTF, w.w_down_FD.astype(dtype))
        return self.rules.constrain(out_BTD, X_AXES)


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x)).

    The parameters live here; `weights` derives what the matmuls consume, and `apply` computes on
    those alone, so a stack of blocks derives its weights once for all the layers and ticks that
    use them.
    """

    def __init__(self, cfg: ModelConfig, rules: Rules, impl: str, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, rules, impl, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg, rules, rngs=rngs)

    def weights(self, dtype: jnp.dtype) -> BlockWeights:
        """The derived weights, matmul weights in `dtype`; norm scales stay float32 (RMSNorm
        computes in float32). Works on a stacked Block: the result keeps its leading axes."""
        return BlockWeights(
            attn_norm_D=self.attn_norm.scale[...],
            w_qkv_DKCH=self.attn.fused_qkv(dtype),
            wo_NHD=self.attn.wo_NHD[...].astype(dtype),
            mlp_norm_D=self.mlp_norm.scale[...],
            w_gate_up_DCF=self.mlp.fused_gate_up(dtype),
            w_down_FD=self.mlp.w_down_FD[...].astype(dtype),
        )

    def apply(
        self,
        w: BlockWeights,
        x_BTD: jax.Array,
        positions_BT: jax.Array | None = None,
        cache: KVCache | None = None,
        project: Project = einsum,
    ) -> tuple[jax.Array, KVCache | None]:
        """One block on one layer's derived weights, reading a KV cache and returning this call's
        keys and values (see `Attention.apply`); `project` computes every weight's contraction
        (see `einsum`)."""
        eps = self.attn_norm.eps
        normed_BTD = rms_norm(x_BTD, w.attn_norm_D, eps, project, "attn_norm_D")
        attn_BTD, cache = self.attn.apply(w, normed_BTD, positions_BT, cache, project)
        x_BTD = x_BTD + attn_BTD
        normed_BTD = rms_norm(x_BTD, w.mlp_norm_D, eps, project, "mlp_norm_D")
        return x_BTD + self.mlp.apply(w, normed_BTD, project), cache


class Llama(nnx.Module):
    """Token embedding, a stack of blocks run by a scan, final norm, LM head (untied by default).

    The blocks' parameters are stored by pipeline stage, [P, v * c, ...] on logical axes
    (`stage`, `layers`, ...), as `layout` says; without pipelining that is [1, L, ...]. They are
    drawn in logical layer order first, so a model initialises identically on every layout. A scan
    keeps compile time flat in depth: XLA sees one block body with a trip count.

    Args:
        attention: the implementation `attend` runs (`jaxpar.model.attention.resolve`).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        rules: Rules,
        *,
        rngs: nnx.Rngs,
        layout: StageLayout | None = None,
        attention: str = "xla",
    ):
        self.cfg, self.rules = cfg, rules
        self.layout = layout = layout or StageLayout(cfg.layers)
        self.embed_VD = _param(rngs, (cfg.vocab, cfg.dim), 1.0, rules, (VOCAB, EMBED))

        @nnx.split_rngs(splits=cfg.layers)
        @nnx.vmap(transform_metadata={nnx.PARTITION_NAME: LAYERS, "logical_axes": LAYERS})
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rules, attention, rngs=rngs)

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
                rngs, (cfg.dim, cfg.vocab), 1 / math.sqrt(cfg.dim), rules, (EMBED, VOCAB)
            )

    def top(self) -> TopWeights:
        """The weights outside the block stack: the embedding table, the final norm's scale and
        the LM head (the table's transpose when tied)."""
        head_DV = self.embed_VD[...].T if self.cfg.tie_embeddings else self.head_DV[...]
        return TopWeights(self.embed_VD[...], self.final_norm.scale[...], head_DV)

    def embed(self, tokens_BT: jax.Array, dtype: jnp.dtype) -> jax.Array:
        return embed(self.top(), tokens_BT, dtype, self.rules, OUTER_BATCH)

    def logits(self, x_BTD: jax.Array) -> jax.Array:
        """float32 logits (B, T, V), split over `tensor` along V; never gathered here."""
        return logits(self.top(), x_BTD, self.final_norm.eps, self.rules, OUTER_BATCH)

    def __call__(
        self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None, dtype=jnp.float32
    ) -> jax.Array:
        """The plain sequential model, one scan over the layers in logical order (the reference
        the pipeline executor is tested against). Args: token ids (B, T); positions (B, T), None
        for 0..T-1. Returns: float32 logits (B, T, V)."""
        x_BTD = self.embed(tokens_BT, dtype)
        weights_L = jax.tree.map(self.layout.to_logical, self.blocks.weights(jnp.float32))

        def body(x_BTD: jax.Array, w: BlockWeights) -> tuple[jax.Array, None]:
            out_BTD, _ = self.blocks.apply(w, x_BTD, positions_BT)
            return self.rules.constrain(out_BTD, X_AXES), None

        x_BTD, _ = jax.lax.scan(body, self.rules.constrain(x_BTD, X_AXES), weights_L)
        return self.logits(x_BTD)


class TopWeights(NamedTuple):
    """What the ends of the model compute with: `embed` and `logits` take these alone, so the
    pipeline can run them for one micro-batch inside its ticks."""

    embed_VD: jax.Array
    final_norm_D: jax.Array
    head_DV: jax.Array


def embed(
    top: TopWeights, tokens_BT: jax.Array, dtype: jnp.dtype, rules: Rules, batch: str = BATCH
) -> jax.Array:
    """Token embeddings (B, T, D). A one-hot contraction over the vocab-sharded table is
    Megatron's vocab-parallel embedding: each tensor rank looks up the ids it owns, then one
    all-reduce of (B, T, D). `batch`: the logical axis of the rows."""
    onehot_BTV = jax.nn.one_hot(tokens_BT, top.embed_VD.shape[0], dtype=dtype)
    onehot_BTV = rules.constrain(onehot_BTV, (batch, SEQ, ACT_VOCAB))
    x_BTD = jnp.einsum("BTV,VD->BTD", onehot_BTV, top.embed_VD.astype(dtype))
    return rules.constrain(x_BTD, (batch, SEQ, ACT_EMBED))


def logits(
    top: TopWeights, x_BTD: jax.Array, eps: float, rules: Rules, batch: str = BATCH
) -> jax.Array:
    """float32 logits (B, T, V) of the final norm and LM head, split over `tensor` along V."""
    x_BTD = rms_norm(rules.constrain(x_BTD, (batch, SEQ, ACT_EMBED)), top.final_norm_D, eps)
    logits_BTV = jnp.einsum("BTD,DV->BTV", x_BTD, top.head_DV.astype(x_BTD.dtype))
    return rules.constrain(logits_BTV.astype(jnp.float32), (batch, SEQ, ACT_VOCAB))


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
