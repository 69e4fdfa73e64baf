"""Speculative decoding: a cheap drafter proposes the next k tokens of every row, and the target
model checks them all in one forward pass over k + 1 positions (`Generator.verify`), keeping the
longest prefix its own draws agree with and adding its next token. A greedy row's output is the
target's own greedy output; a sampled row keeps the target's distribution exactly
(`jaxpar.infer.sampling.speculative_accept`). Each target pass yields 1 to k + 1 tokens for the
price of about one decode step where decoding is bound by reading the weights, and more on a
pipeline, where every pass crosses every stage.

Two drafters:

- `NgramDrafter` (`ngram:K`): prompt lookup. The row's last few tokens are looked up earlier in
  its prompt and output, and the tokens that followed their latest occurrence are the draft. No
  second model; it pays where the answer quotes the context (code edits, summaries, chat about a
  document).
- `ModelDrafter` (`draft:PATH:K`): a smaller model with the same vocabulary (a jaxpar run or a
  Hugging Face folder), on the same mesh, drafting k tokens in one decode block of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from jaxpar.errors import JaxparError

# Longest and shortest suffix `NgramDrafter` looks up.
NGRAM_MAX, NGRAM_MIN = 3, 1


@dataclass(frozen=True)
class Speculation:
    """A drafter and its draft length, as `--speculative` and `serve.speculative` spell it:
    `ngram:K` or `draft:PATH:K` ("" for none)."""

    kind: str  # "ngram" or "draft"
    k: int
    path: str = ""

    @classmethod
    def parse(cls, text: str, what: str = "--speculative") -> Speculation | None:
        """The speculation `text` names (None for ""). Raises JaxparError naming the value."""
        if not text:
            return None
        kind, _, rest = text.partition(":")
        path, _, k = rest.rpartition(":")
        valid = (f"{what} {text!r} must be ngram:K or draft:PATH:K, K the tokens drafted per "
                 "target pass (1 to 16)")  # fmt: skip
        if kind not in ("ngram", "draft") or (kind == "ngram") == bool(path):
            raise JaxparError(valid)
        try:
            n = int(k)
        except ValueError:
            raise JaxparError(valid) from None
        if not 1 <= n <= 16:
            raise JaxparError(valid)
        return cls(kind, n, path)


class NgramDrafter:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the row's last n
    tokens (n from `NGRAM_MAX` down to `NGRAM_MIN`; the longest match wins), up to k of them."""

    on_device = False  # drafts on the host, from the sequences so far

    def __init__(self, k: int):
        self.k = k

    def begin(self, tokens_BT: np.ndarray, lengths_B: np.ndarray, rows) -> None:
        """A new batch of prompts (nothing to prepare: the lookups read the sequences)."""

    def draft(self, sequences: Sequence[Sequence[int]], last_B, position_B, rows, room_B,
              table_BN=None):  # fmt: skip
        """Each row's drafts, (B, k) with the first `drafted_B[b]` real, at most `room_B[b]`:
        (drafts, drafted, None: they are certain)."""
        drafts, drafted = np.zeros((len(room_B), self.k), np.int32), np.zeros_like(room_B)
        for b, sequence in enumerate(sequences):
            if room_B[b] > 0:
                found = self.propose(sequence, int(min(self.k, room_B[b])))
                drafts[b, : len(found)], drafted[b] = found, len(found)
        return drafts, drafted, None

    def kept(self, kept_B, drafts_BK, drafted_B, position_B, table_BN=None) -> None:
        """The target's verdict (nothing to catch up on)."""

    def prefill_chunk(self, *args) -> None:
        """The target's prompt pieces (nothing to do: the lookups read the sequences)."""

    def warm_up(self, n: int, span: int, table_BN=None) -> None:
        """Nothing to compile."""

    def propose(self, sequence: Sequence[int], k: int) -> list[int]:
        """Up to `k` tokens that may follow `sequence` (none when its ending was not seen)."""
        seq = np.asarray(sequence, np.int64)
        for n in range(min(NGRAM_MAX, len(seq) - 1), NGRAM_MIN - 1, -1):
            tail = seq[-n:]
            # every start i < len - n where seq[i : i + n] == tail, the latest first
            windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)
            hits = np.flatnonzero((windows == tail).all(axis=1))
            if len(hits):
                start = hits[-1] + n
                return seq[start : start + k].tolist()
        return []


class ModelDrafter:
    """A draft model on the target's mesh, with its own KV cache of the same rows: it prefills
    the prompts with the target, then drafts k tokens per row in one decode block, and feeds a
    draft the target kept in full (whose keys and values it never computed) before the next.

    Args:
        model: the draft model (a `LoadedModel` with the target's vocabulary,
            `jaxpar.infer.load.load_draft`), on the target's mesh.
        k: tokens drafted per target pass.
        rows, max_len: the target generator's.
        blocks, block: the target's paged cache (0: unpaged), which the draft's mirrors: the
            same blocks hold the same positions in both, so one block table serves both.
    """

    on_device = True  # drafts with its own steps, from the last token

    def __init__(self, model, k: int, rows: int, max_len: int, blocks: int = 0,
                 block: int = 16):  # fmt: skip
        if model.context < max_len:
            raise JaxparError(
                f"the draft model {model.source} has a context of {model.context} tokens, "
                f"shorter than the {max_len} this generation needs"
            )
        self.model, self.k = model, k
        self.generator = model.generator(rows, max_len, blocks, block)
        self.cache = self.generator.empty_cache() if blocks else None

    def _rows(self, rows):
        """The target's sampling rows with the draft's own seeds: the drafts' draws independent
        of the target's coins (the acceptance rule needs that)."""
        return rows._replace(seed=(np.asarray(rows.seed, np.int64) ^ 0x5EED).astype(np.int32))

    def begin(self, tokens_BT: np.ndarray, lengths_B: np.ndarray, rows) -> None:
        """Prefills the draft's cache with the batch's prompts."""
        g = self.generator
        self.cache = g.prefill(g.empty_cache(), tokens_BT, lengths_B, self._rows(rows))[0]

    def prefill_chunk(self, *args) -> None:
        """The target's prompt pieces (`Generator.prefill_chunk`'s arguments), into the draft's
        paged cache too."""
        self.cache = self.generator.prefill_chunk(self.cache, *args)[0]

    def warm_up(self, n: int, span: int, table_BN=None) -> None:
        """Compiles the catch-up step of `n` rows over `span` (`kept`), on idle rows."""
        zeros = np.zeros(n, np.int32)
        self.cache = self.generator.decode(self.cache, zeros, zeros, None, zeros.astype(bool),
                                           span, table_BN)[0]  # fmt: skip

    def draft(self, sequences, last_B, position_B, rows, room_B, table_BN=None):
        """Up to min(k, `room_B[b]`) drafts per row, drawn from the last token at
        `position_B` on as the target would draw them: (drafts (B, k), drafted (B,), the
        draft's logits (B, k, V) on the device)."""
        g = self.generator
        span = g.span_for(min(int(position_B.max()) + self.k + 1, g.length))
        live_B = room_B > 0
        self.cache, logits_BKV, drafts_BK = g.decode(
            self.cache, last_B, position_B, self._rows(rows), live_B, span, table_BN,
            steps=self.k, limit_B=room_B.astype(np.int32),
        )  # fmt: skip
        drafts_BK = np.asarray(drafts_BK)
        drafted_B = (drafts_BK >= 0).sum(axis=1).astype(np.int32)
        return np.maximum(drafts_BK, 0), drafted_B, logits_BKV

    def kept(self, kept_B, drafts_BK, drafted_B, position_B, table_BN=None) -> None:
        """Where the target kept every draft, feeds the last one (its keys and values were never
        computed: a block feeds each draw but the last), so that the next draft starts from a
        full cache."""
        full_B = (kept_B == drafted_B) & (drafted_B > 0)
        if not full_B.any():
            return
        g, rows = self.generator, len(position_B)
        last_draft_B = drafts_BK[np.arange(rows), np.maximum(drafted_B - 1, 0)]
        at_B = position_B + drafted_B
        span = g.span_for(int(at_B.max()) + 1)
        self.cache = g.decode(self.cache, last_draft_B, at_B, None, full_B, span, table_BN)[0]


def verify_round(gen, drafter, cache, token_B, position_B, rows, active_B, room_B, span: int,
                 table_BN=None, drafts_BK=None, drafted_B=None):  # fmt: skip
    """One round of speculative decoding on `gen`'s `cache`: each row's drafts, at most
    `room_B[b]` (a drafter on the device makes them here; one on the host made them before,
    `drafts_BK` and `drafted_B`, so that every process of a job checks the same ones), checked
    in one target pass (`Generator.verify`) from each row's last token `token_B` at
    `position_B`; the drafter then hears which it kept.

    Returns:
        the cache, the tokens (B, k + 1) as `verify` gives them, the drafts each row had (B,)
        and the drafts each row kept (B,; -1 for an inactive row).
    """
    draft_logits = None
    if drafter.on_device:
        drafts_BK, drafted_B, draft_logits = drafter.draft(None, token_B, position_B, rows,
                                                           room_B, table_BN)  # fmt: skip
    cache, _, block_BJ = gen.verify(cache, token_B, position_B, drafts_BK, drafted_B, rows,
                                    active_B, span, table_BN, draft_logits)  # fmt: skip
    block_BJ = np.asarray(block_BJ)
    kept_B = (block_BJ >= 0).sum(axis=1) - 1
    drafter.kept(kept_B, drafts_BK, drafted_B, position_B, table_BN)
    return cache, block_BJ, drafted_B, kept_B
