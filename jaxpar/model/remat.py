"""What a layer's backward pass keeps (`model.remat`): the policy of the checkpoint around each
layer in the layer scan, and the names the model gives to values a policy may keep.

- `none`: keeps everything autodiff would, but for two ops whose own backward keeps their
  inputs, as fused kernels do: flash attention (the scores' matmul runs again,
  `jaxpar.model.attention.flash`) and SwiGLU's activation (`jaxpar.model.llama.swiglu`).
- `full`: keeps the layer's input; recomputes the whole layer.
- `dots`: keeps every matmul's output; recomputes norms, RoPE, softmax and activations.
- `dots_no_batch`: keeps the weights' matmuls (no batch dimension: Q/K/V, attention output and
  MLP projections); recomputes attention's two matmuls and the elementwise work.
- `dots_no_batch_attn`: as `dots_no_batch`, plus each layer's attention output (and the outputs of
  cuDNN's fused kernel, softmax statistics included, so the kernel never runs twice); with the
  XLA path's plain einsums (`model.attention_block=0`) the backward recomputes only the scores'
  matmul and softmax; with flash attention, attention's whole forward (`jaxpar.model.flops`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

ATTENTION = "attention"  # `checkpoint_name` of each layer's attention output


def _keep_all_but_slot(primitive: Any, *_: Any, **__: Any) -> bool:
    """Saves everything for the backward pass except dynamic reads (a slot's weights out of the
    stage's): those are recomputed from the stage's weights, which are kept once."""
    return primitive.name not in ("dynamic_slice", "squeeze")


def _fused_attention(primitive: Any, *_: Any, **__: Any) -> bool:
    """cuDNN's fused attention forward (jax.nn.dot_product_attention, implementation="cudnn"):
    its outputs include the softmax statistics its backward kernel reads."""
    return primitive.name.startswith("dot_product_attention_fwd")


_either = jax.checkpoint_policies.save_from_both_policies
_POLICIES: dict[str, Callable | None] = {
    "full": None,  # save nothing: recompute the whole layer
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_no_batch_attn": _either(
        _either(
            jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
            jax.checkpoint_policies.save_only_these_names(ATTENTION),
        ),
        _fused_attention,
    ),
}


def checkpointed(layer: Callable, remat: str, repeats: int) -> Callable:
    """`layer` under the checkpoint `remat` names. With several repeats a layer reads its slot's
    weights inside, and even `none` recomputes that read rather than keep a copy per tick."""
    if remat == "none" and repeats == 1:
        return layer
    policy = _POLICIES[remat] if remat != "none" else _keep_all_but_slot
    return jax.checkpoint(layer, policy=policy, prevent_cse=False)
