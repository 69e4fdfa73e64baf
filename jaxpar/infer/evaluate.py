"""`jaxpar eval`: the negative log-likelihood and perplexity of a loaded model on token rows, and
the rows of a text or a `.npy` file of token ids."""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxpar.errors import JaxparError
from jaxpar.infer.loaded import LoadedModel
from jaxpar.model.llama import token_nll


def evaluate(model: LoadedModel, rows: list[np.ndarray], batch: int = 8) -> dict[str, float | int]:
    """Mean negative log-likelihood per predicted token, and perplexity, of token rows (each row
    predicts its tokens 1.. from the ones before; at most `context` + 1 tokens a row).

    Returns:
        {"nll": nats per token, "perplexity": exp(nll), "tokens": predicted tokens counted}.

    Raises:
        JaxparError: no row of 2 tokens or more, or a row longer than the context + 1.
    """
    rows = [r for r in rows if len(r) >= 2]
    if not rows:
        raise JaxparError("nothing to evaluate: every sequence needs at least 2 tokens")
    longest = max(len(r) for r in rows)
    if longest > model.context + 1:
        raise JaxparError(
            f"a sequence of {longest} tokens exceeds the model's context of {model.context} "
            f"(+1 for the last target)"
        )
    placement = model.placement

    @jax.jit
    def nll(params, tokens_BT, mask_BT):
        n_BT = token_nll(placement.logits(params, tokens_BT[:, :-1]), tokens_BT[:, 1:])
        return jnp.sum(n_BT * mask_BT), jnp.sum(mask_BT)

    spec = placement.spec
    unit = spec.data * spec.pipeline  # the pipeline splits the batch over both
    b = -(-min(batch, len(rows)) // unit) * unit
    total, count = 0.0, 0
    sharding = placement.batch_sharding
    with jax.set_mesh(placement.mesh):
        for start in range(0, len(rows), b):
            tokens, mask = _padded(rows[start : start + b], b, longest)
            s, n = nll(
                model.params, jax.device_put(tokens, sharding), jax.device_put(mask, sharding)
            )
            total += float(s)
            count += int(n)
    mean = total / count
    return {"nll": mean, "perplexity": math.exp(mean), "tokens": count}


def _padded(rows: list[np.ndarray], batch: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """`rows` as a zero-padded (batch, width) int32 array, and the (batch, width - 1) float32 mask
    of the targets they predict."""
    tokens = np.zeros((batch, width), np.int32)
    mask = np.zeros((batch, width - 1), np.float32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
        mask[i, : len(r) - 1] = 1
    return tokens, mask


def text_rows(ids: list[int], context: int) -> list[np.ndarray]:
    """Cuts one long token sequence into windows of `context` + 1 tokens that overlap by one, so
    every token but the first is predicted exactly once."""
    ids_array = np.asarray(ids, np.int32)
    return [ids_array[i : i + context + 1] for i in range(0, max(len(ids) - 1, 1), context)]


def read_token_rows(path: Path, model: LoadedModel) -> list[np.ndarray]:
    """The rows of an int .npy array [batch, length] of token ids, checked against the model."""
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise JaxparError(f"--tokens {str(path)!r} is not a .npy array: {e}") from None
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise JaxparError(
            f"--tokens {str(path)!r} holds a {array.dtype} array of shape {array.shape}; "
            "expected integers [batch, length]"
        )
    model.check_ids(array.ravel().tolist(), f"--tokens {str(path)!r}")
    return [row.astype(np.int32) for row in array]
