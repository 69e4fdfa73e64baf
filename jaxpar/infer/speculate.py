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
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from jaxpar.errors import JaxparError

if TYPE_CHECKING:
    import jax

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

    def kept(self, block_BJ, drafts_BK, drafted_B, last_B, position_B, table_BN=None) -> None:
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
        model: the draft model (a `LoadedModel`, with the target's vocabulary: `load_draft`),
            on the target's mesh.
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
        from jaxpar.infer.engine import Generator

        self.model, self.k = model, k
        self.generator = Generator(model.placement, model.params, batch=rows, max_len=max_len,
                                   blocks=blocks, block=block)  # fmt: skip
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

    def kept(self, block_BJ, drafts_BK, drafted_B, last_B, position_B, table_BN=None) -> None:
        """Where the target kept every draft, feeds the last one (its keys and values were never
        computed: a block feeds each draw but the last), so that the next draft starts from a
        full cache."""
        kept_B = (block_BJ >= 0).sum(axis=1) - 1
        full_B = (kept_B == drafted_B) & (drafted_B > 0)
        if not full_B.any():
            return
        g, rows = self.generator, len(last_B)
        last_draft_B = drafts_BK[np.arange(rows), np.maximum(drafted_B - 1, 0)]
        at_B = position_B + drafted_B
        span = g.span_for(int(at_B.max()) + 1)
        self.cache = g.decode(self.cache, last_draft_B, at_B, None, full_B, span, table_BN)[0]


def load_draft(path: str, mesh: jax.sharding.Mesh, dtype: str, vocab: int):
    """The draft model at `path` (a jaxpar run folder or a Hugging Face folder) on `mesh`, once
    its configuration shows it has the target's `vocab` tokens.

    Raises:
        JaxparError: `path` is neither kind of folder, or the vocabularies differ.
    """
    from jaxpar.config import load_config
    from jaxpar.infer.load import load_hf, load_run
    from jaxpar.interop.hf_config import read_hf_config
    from jaxpar.runs import CONFIG

    folder = Path(path)
    if (folder / CONFIG).is_file():
        load, model = load_run, load_config(folder / CONFIG).model
    elif (folder / "config.json").is_file():
        load, model = load_hf, read_hf_config(folder)[0]
    else:
        raise JaxparError(
            f"the draft model {path!r} is neither a jaxpar run folder ({CONFIG}) nor a Hugging "
            "Face folder (config.json)"
        )
    if model.vocab != vocab:
        raise JaxparError(
            f"the draft model {path!r} has a vocabulary of {model.vocab:,} tokens and the target "
            f"{vocab:,}: a draft model must share the target's tokenizer"
        )
    return load(folder, mesh, dtype)


def make_drafter(speculation: Speculation | None, target, rows: int, max_len: int,
                 dtype: str = "auto", blocks: int = 0, block: int = 16):  # fmt: skip
    """The drafter `speculation` names for `target`'s generator of `rows` rows up to `max_len`
    (paged: `blocks` blocks of `block` positions; None: none); a draft model is loaded onto the
    target's mesh.

    Raises:
        JaxparError: the draft model cannot be read, or does not fit the target.
    """
    if speculation is None:
        return None
    if target.placement.spec.context > 1:
        raise JaxparError("speculative decoding needs context=1: a verify pass's tokens would be "
                          "split over the context axis")  # fmt: skip
    if speculation.kind == "ngram":
        return NgramDrafter(speculation.k)
    draft = load_draft(speculation.path, target.placement.mesh, dtype, target.config.model.vocab)
    return ModelDrafter(draft, speculation.k, rows, max_len, blocks, block)
