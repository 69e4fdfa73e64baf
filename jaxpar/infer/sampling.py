"""Sampling: how a sequence draws its tokens (`Sampling`, the one type of sampling settings, with
the one default temperature), the same as traced rows of a batch (`RowSampling`), and the one
sampler (`sample`) that `generate`, `chat` and the server all draw with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# The temperature of every command that samples when none is given (`generate`, `chat`, `serve`,
# train's closing sample): 1, the OpenAI API's default, which `serve`'s clients rely on (and vLLM's
# and Hugging Face's). `generate` and `chat` drew with 0.8 before there was one default.
DEFAULT_TEMPERATURE = 1.0


@dataclass(frozen=True)
class Sampling:
    """How one sequence draws its tokens, the one type of sampling settings (the CLI's flags, a
    server request's fields). Greedy when `temperature` is 0; else softmax(logits / temperature)
    restricted to the `top_k` most likely tokens (0: all) and the smallest set whose probability
    reaches `top_p`."""

    temperature: float = DEFAULT_TEMPERATURE
    top_k: int = 0
    top_p: float = 1.0


GREEDY = Sampling(temperature=0.0)


class RowSampling(NamedTuple):
    """How each row draws its next token, [B] each, passed as traced values so that one compiled
    step serves every mix of settings. Row b's draw uses the key fold_in(key(seed[b]), count[b]):
    a request's tokens depend on its own seed and on nothing else in the batch."""

    seed: Any  # int32
    count: Any  # int32: which new token of the row this draw is
    temperature: Any  # float32; 0 is greedy
    top_k: Any  # int32; 0 is no limit
    top_p: Any  # float32

    @classmethod
    def fill(cls, rows: int, sampling: Sampling, seeds: Any, count: int = 0) -> RowSampling:
        """Host arrays: every row with `sampling`, row b seeded `seeds[b]`."""
        return cls(
            np.broadcast_to(np.asarray(seeds, np.int32), (rows,)).copy(),
            np.full((rows,), count, np.int32),
            np.full((rows,), sampling.temperature, np.float32),
            np.full((rows,), sampling.top_k, np.int32),
            np.full((rows,), sampling.top_p, np.float32),
        )

    def put(self, row: int, sampling: Sampling, seed: int, count: int) -> None:
        """Sets host row `row` to `sampling`, seeded `seed`, drawing its token number `count`."""
        self.seed[row], self.count[row] = seed, count
        self.temperature[row], self.top_k[row], self.top_p[row] = (
            sampling.temperature, sampling.top_k, sampling.top_p
        )  # fmt: skip


def sample(logits_BV: jax.Array, rows: RowSampling) -> jax.Array:
    """Draws one token per row with that row's settings (the one sampler: `generate`, `chat` and
    the server all draw here): the argmax for a greedy row; else the argmax of the row's
    logits / temperature plus Gumbel noise from its own key (`jax.random.categorical`), over
    the tokens its top-k and top-p keep.

    A batch pays only for what its rows ask for: all greedy, one argmax; the sort that top-k
    and top-p need, only when a sampled row sets one. A row's token does not depend on which
    path the batch takes (a row without limits keeps every token on both, and its noise is
    indexed by token id, not by rank), so it depends on its own settings and seed alone.

    Returns:
        (B,) int32 token ids.
    """
    greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    drawn_B = jnp.asarray(rows.temperature, jnp.float32) > 0
    sampled_B = jax.lax.cond(
        drawn_B.any(), lambda: _draw(logits_BV, rows), lambda: greedy_B
    )
    return jnp.where(drawn_B, sampled_B, greedy_B)


def _draw(logits_BV: jax.Array, rows: RowSampling) -> jax.Array:
    """Every row's draw from softmax(logits / temperature) over the tokens it keeps."""
    choice_B = jax.vmap(jax.random.categorical)(_keys(rows), _kept_logits(logits_BV, rows))
    return choice_B.astype(jnp.int32)


def _keys(rows: RowSampling, stream: int = 0) -> jax.Array:
    """Each row's key for its draw number `count`; `stream` > 0 gives other keys for the same
    draw (speculation's coin and its second draw)."""
    def key(seed, count):
        k = jax.random.fold_in(jax.random.key(seed), count)
        return jax.random.fold_in(k, stream) if stream else k

    return jax.vmap(key)(jnp.asarray(rows.seed), jnp.asarray(rows.count))


def _kept_logits(logits_BV: jax.Array, rows: RowSampling) -> jax.Array:
    """logits / temperature where a row keeps the token (its top-k and top-p), -inf elsewhere."""
    vocab = logits_BV.shape[-1]
    temperature_B1 = jnp.asarray(rows.temperature, jnp.float32)[:, None]
    scaled_BV = logits_BV.astype(jnp.float32) / jnp.maximum(temperature_B1, 1e-6)
    top_k_B, top_p_B = jnp.asarray(rows.top_k), jnp.asarray(rows.top_p, jnp.float32)
    drawn_B = jnp.asarray(rows.temperature, jnp.float32) > 0
    limited_B = drawn_B & (((top_k_B > 0) & (top_k_B < vocab)) | (top_p_B < 1))
    keep_BV = jax.lax.cond(
        limited_B.any(),
        lambda: _kept(scaled_BV, top_k_B, top_p_B),
        lambda: jnp.ones(scaled_BV.shape, bool),
    )
    return jnp.where(keep_BV, scaled_BV, -jnp.inf)


def speculative_accept(logits_BJV: jax.Array, drafts_BK: jax.Array, drafted_B: jax.Array,
                       rows: RowSampling, draft_logits_BKV: jax.Array | None = None,
                       ) -> jax.Array:  # fmt: skip
    """Which drafted tokens a row keeps, by the standard rule that leaves the target's
    distribution exactly as it is (Leviathan et al. 2023; Chen et al. 2023), and its next token.

    `logits_BJV` are the target's after each of the row's last token and its K = J - 1 drafts
    (the first `drafted_B` real). Draft j is kept while every one before it was, with
    probability min(1, p(d) / q(d)): p the target's distribution at that position as the row
    samples (temperature, top-k, top-p), q the drafter's (its logits sampled with the same
    settings; a point mass on d when `draft_logits_BKV` is None, as for n-gram lookups). After
    the kept drafts comes a draw from max(p - q, 0) renormalized where one was refused, or from p
    where all were kept: with none drafted, the very token `sample` draws for draw number
    `count`. A greedy row keeps the drafts equal to its argmax and then adds its argmax: the
    target's greedy tokens, whatever was drafted.

    Returns:
        (B, J) int32: the kept drafts, the next token, then -1.
    """
    b, j, vocab = logits_BJV.shape
    k = j - 1
    offsets_J = jnp.arange(j, dtype=jnp.int32)

    def at_each(r: RowSampling, n: int) -> RowSampling:  # rows repeated for n positions each
        return RowSampling(*(jnp.repeat(jnp.asarray(f), n) for f in r))._replace(
            count=(jnp.asarray(r.count)[:, None] + jnp.arange(n, dtype=jnp.int32)).reshape(-1)
        )

    # The target's own draw at every position (after all drafts were kept, the row's next).
    own_BJ = sample(logits_BJV.reshape(b * j, vocab), at_each(rows, j)).reshape(b, j)
    real_BK = offsets_J[:k] < drafted_B[:, None]
    drawn_B = jnp.asarray(rows.temperature, jnp.float32) > 0

    def sampled() -> tuple[jax.Array, jax.Array]:
        flat = at_each(rows, k)
        p_BKV = jax.nn.softmax(_kept_logits(logits_BJV[:, :k].reshape(b * k, vocab), flat), -1)
        if draft_logits_BKV is None:
            q_BKV = jax.nn.one_hot(drafts_BK.reshape(-1), vocab, dtype=jnp.float32)
        else:
            q_BKV = jax.nn.softmax(_kept_logits(draft_logits_BKV.reshape(b * k, vocab), flat), -1)
        d_X1 = drafts_BK.reshape(-1, 1)
        p_d, q_d = (jnp.take_along_axis(x, d_X1, axis=1)[:, 0] for x in (p_BKV, q_BKV))
        coin = jax.vmap(jax.random.uniform)(_keys(flat, stream=1))
        keep_BK = (coin * q_d < p_d).reshape(b, k)
        residual = jnp.maximum(p_BKV - q_BKV, 0.0)
        again = jax.vmap(jax.random.categorical)(_keys(flat, stream=2), jnp.log(residual))
        return keep_BK, again.reshape(b, k).astype(jnp.int32)

    greedy_keep_BK = drafts_BK == own_BJ[:, :k]
    if k:
        keep_BK, again_BK = jax.lax.cond(
            drawn_B.any(), sampled, lambda: (greedy_keep_BK, own_BJ[:, :k])
        )
        keep_BK = jnp.where(drawn_B[:, None], keep_BK, greedy_keep_BK) & real_BK
    else:
        keep_BK, again_BK = greedy_keep_BK, own_BJ[:, :0]
    kept_B = jnp.cumprod(keep_BK, axis=1).sum(axis=1)  # the drafts kept, a prefix
    # The next token: a greedy row's argmax; a sampled row's second draw where a draft was
    # refused, else its plain draw after the last kept one.
    refused_B = kept_B < drafted_B
    again_B = jnp.take_along_axis(jnp.pad(again_BK, ((0, 0), (0, 1))), kept_B[:, None], 1)[:, 0]
    own_B = jnp.take_along_axis(own_BJ, kept_B[:, None], axis=1)[:, 0]
    next_B = jnp.where(drawn_B & refused_B, again_B, own_B)
    drafts_BJ = jnp.pad(drafts_BK, ((0, 0), (0, 1)))
    return jnp.where(offsets_J < kept_B[:, None], drafts_BJ,
                     jnp.where(offsets_J == kept_B[:, None], next_B[:, None], -1))  # fmt: skip


def _kept(scaled_BV: jax.Array, top_k_B: jax.Array, top_p_B: jax.Array) -> jax.Array:
    """Which tokens each row keeps, in vocabulary order: its `top_k` most likely (0: all) that
    are also in the smallest set whose probability reaches `top_p` (1: all), the most likely
    always. Every token of a row without limits."""
    b, vocab = scaled_BV.shape
    order_BV = jnp.argsort(-scaled_BV, axis=-1)
    probs_BV = jax.nn.softmax(jnp.take_along_axis(scaled_BV, order_BV, axis=-1), axis=-1)
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass of the more likely tokens
    top_k_B1, top_p_B1 = top_k_B[:, None], top_p_B[:, None]
    # (top_p 1 keeps every token even where the rounded mass before the last ones reaches 1)
    keep_by_rank_BV = (jnp.arange(vocab) < jnp.where(top_k_B1 > 0, top_k_B1, vocab)) & (
        (before_BV < top_p_B1) | (top_p_B1 >= 1)
    )
    keep_by_rank_BV = keep_by_rank_BV.at[:, 0].set(True)
    rows_B1 = jnp.arange(b)[:, None]
    return jnp.zeros((b, vocab), bool).at[rows_B1, order_BV].set(keep_by_rank_BV)
