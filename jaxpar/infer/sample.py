"""Plain sampling by recomputing a fixed window: the end-of-training text sample.

The whole generation is one compiled `lax.scan` over new tokens; each tick reruns the model on a
(B, T) window and reads the logits at the last filled position. No KV cache: it costs T times
more compute than cached decoding, which is fine for a few hundred bytes from a small model.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx


@partial(jax.jit, static_argnames=("graphdef", "new_tokens", "dtype"))
def _generate(graphdef, params, window_BT, length, key, temperature, new_tokens, dtype):
    t = window_BT.shape[1]

    def tick(carry, key):
        window_BT, length = carry
        # When the window is full, slide it left by one to make room.
        full = length == t
        window_BT = jnp.where(full, jnp.roll(window_BT, -1, axis=1), window_BT)
        length = jnp.where(full, length - 1, length)
        logits_BTV = nnx.merge(graphdef, params)(window_BT, dtype=dtype)
        logits_BV = jax.lax.dynamic_index_in_dim(logits_BTV, length - 1, axis=1, keepdims=False)
        greedy_B = jnp.argmax(logits_BV, axis=-1)
        sampled_B = jax.random.categorical(key, logits_BV / jnp.maximum(temperature, 1e-6))
        token_B = jnp.where(temperature > 0, sampled_B, greedy_B).astype(window_BT.dtype)
        window_BT = jax.lax.dynamic_update_index_in_dim(window_BT, token_B, length, axis=1)
        return (window_BT, length + 1), token_B

    keys = jax.random.split(key, new_tokens)
    _, tokens_NB = jax.lax.scan(tick, (window_BT, length), keys)
    # Replicated, so that every process of a multi-process job can read it.
    return jax.lax.with_sharding_constraint(tokens_NB.T, jax.sharding.PartitionSpec())


def generate(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    prompt_BP: jax.Array,
    new_tokens: int,
    window: int,
    *,
    temperature: float = 0.8,
    seed: int = 0,
    dtype: jnp.dtype = jnp.float32,
) -> jax.Array:
    """Samples `new_tokens` after each prompt row.

    Args:
        prompt_BP: (B, P) int32 prompt ids, P >= 1; only the last `window` are used.
        window: the model's context length T.
        temperature: 0 for greedy.

    Returns:
        (B, new_tokens) int32 ids.
    """
    prompt_BP = prompt_BP[:, -window:]
    b, p = prompt_BP.shape
    window_BT = jnp.zeros((b, window), jnp.int32).at[:, :p].set(prompt_BP)
    return _generate(
        graphdef, params, window_BT, jnp.int32(p), jax.random.key(seed),
        jnp.float32(temperature), new_tokens, dtype,
    )  # fmt: skip
