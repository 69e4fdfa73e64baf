"""The matmul FLOPs of one decoder layer, from the model's shapes alone: one definition, read by
the stage placement (which tick granularity a schedule runs), `jaxpar.analysis` and the planner.
"""

from __future__ import annotations

from jaxpar.config import ModelConfig
from jaxpar.model.attention import query_block

# The forward matmuls each `model.remat` runs again in the backward pass (`jaxpar.model.remat`):
# `full` all but the MLP's down projection, whose output the backward pass never reads.
RECOMPUTED = {
    "none": (),
    "full": ("qkv", "out", "gate_up", "scores", "values"),
    "dots": (),
    "dots_no_batch": ("scores", "values"),
    "dots_no_batch_attn": ("scores",),
}
WEIGHTED = ("qkv", "out", "gate_up", "down")  # the matmuls with a weight (attention's have none)


def layer_forward(cfg: ModelConfig, seq: int, causal: bool = False) -> dict[str, float]:
    """One layer's forward matmul FLOPs per token, by matmul. Attention's two matmuls count every
    key position, as the XLA path computes them, or with `causal` the half a causal kernel
    computes (the convention of MaxText's and flash-attention's MFU)."""
    d, f, h, n, k = cfg.dim, cfg.mlp_dim, cfg.head_dim, cfg.heads, cfg.kv_heads
    keys = seq / 2 if causal else seq
    return {
        "qkv": 2 * d * (n + 2 * k) * h, "out": 2 * n * h * d, "gate_up": 2 * 2 * d * f,
        "down": 2 * f * d, "scores": 2 * keys * n * h, "values": 2 * keys * n * h,
    }  # fmt: skip


# With cuDNN's fused kernel (`jaxpar.model.remat`): the kernel's backward always recomputes the
# scores; a policy that does not keep the kernel's outputs (every one but `none` and
# `dots_no_batch_attn`: the kernel is no dot) runs its forward, both matmuls, again.
KERNEL_RECOMPUTED = {
    "none": ("scores",),
    "full": ("qkv", "out", "gate_up", "scores", "values", "scores"),
    "dots": ("scores", "values", "scores"),
    "dots_no_batch": ("scores", "values", "scores"),
    "dots_no_batch_attn": ("scores",),
}


def recomputed(
    cfg: ModelConfig, seq: int, remat: str | None = None, impl: str = "xla"
) -> list[str]:
    """The forward matmuls a layer's backward pass runs again on one device (compiled, counted)
    with the attention implementation `impl`: those `remat` (the config's by default)
    recomputes, and attention's own. cuDNN's: `KERNEL_RECOMPUTED`. Where the XLA path runs
    flash attention (`jaxpar.model.attention.query_block`), the scores its backward recomputes;
    a policy that keeps no attention output but its matmuls' then recomputes attention's whole
    forward, the log-sum-exp being no matmul; in one block XLA computes the forward's scores and
    the backward's once."""
    if impl == "cudnn":
        return list(KERNEL_RECOMPUTED[remat or cfg.remat])
    again = list(RECOMPUTED[remat or cfg.remat])
    block = query_block(seq, cfg.attention_block) if impl == "xla" else 0
    if block:
        if "scores" in again and "values" not in again:
            again.append("values")
        if not ("values" in again and block == seq):
            again.append("scores")
    return again


def job_costs(cfg: ModelConfig, seq: int) -> tuple[float, float, float]:
    """One layer's F, B and W matmul FLOPs per token, as a split backward runs them: F the
    forward; B the input gradient (one matmul per weighted matmul, two per attention matmul) and
    the forward matmuls `model.remat` and flash attention recompute; W the weight gradients
    (one per weighted matmul)."""
    forward = layer_forward(cfg, seq)
    weighted = sum(forward[name] for name in WEIGHTED)
    attention = forward["scores"] + forward["values"]
    redone = sum(forward[name] for name in recomputed(cfg, seq))
    return weighted + attention, weighted + 2 * attention + redone, weighted


def top_costs(cfg: ModelConfig) -> tuple[float, float]:
    """The embedding's and the LM head's (with the loss) matmul FLOPs per token, forward and
    backward together: the embedding is a one-hot contraction over the vocabulary (forward and
    weight gradient), the head a matmul with its input and weight gradients."""
    contraction = 2 * cfg.dim * cfg.vocab
    return 2 * contraction, 3 * contraction
