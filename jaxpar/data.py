"""Byte-level tokens from local text files, and step-pure batches.

The batch of step s is a pure function of (seed, s): each row is a window of the corpus starting
at an offset drawn from a generator seeded with (seed, s). Runs therefore reproduce exactly and
resume at any step without iterator state. Each process materialises only the rows its devices
hold and hands them to `jax.make_array_from_process_local_data`, so the same code serves many hosts.
"""

from __future__ import annotations

import glob
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from jaxpar.errors import JaxparError

if TYPE_CHECKING:
    import jax

VOCAB = 256  # one token per byte


def expand_path(pattern: str) -> str:
    return pattern.replace("{stdlib}", sysconfig.get_paths()["stdlib"])


@dataclass(frozen=True)
class Corpus:
    """All matched files' bytes, in sorted-path order, as one uint8 token array."""

    tokens: np.ndarray
    files: int

    @classmethod
    def from_glob(cls, pattern: str, key: str = "data.path") -> Corpus:
        """Reads every file matching `pattern` (recursive `**` allowed; `{stdlib}` expands);
        `key` is the config key that gave it, for the error.

        Raises:
            JaxparError: no files match, or they hold too little text.
        """
        paths = sorted(
            p for p in glob.glob(expand_path(pattern), recursive=True) if Path(p).is_file()
        )
        if not paths:
            raise JaxparError(
                f"{key}={pattern!r} matches no files; give a glob of local text files, "
                "e.g. 'data/*.txt' or the default '{stdlib}/*.py'"
            )
        chunks = [np.frombuffer(Path(p).read_bytes(), dtype=np.uint8) for p in paths]
        return cls(tokens=np.concatenate(chunks), files=len(paths))

    def check_fits(self, seq_len: int) -> None:
        if len(self.tokens) < seq_len + 1:
            raise JaxparError(
                f"data.path holds {len(self.tokens)} bytes, too few for train.seq_len={seq_len}; "
                "add text or lower train.seq_len"
            )

    def batch_rows(
        self, seed: int, step: int, batch: int, seq_len: int, rows: np.ndarray
    ) -> np.ndarray:
        """Rows `rows` of step `step`'s global (batch, seq_len + 1) int32 batch."""
        rng = np.random.default_rng([seed, step])
        # Windows of seq_len + 1 tokens; the last one starts at len - seq_len - 1.
        starts = rng.integers(0, len(self.tokens) - seq_len, size=batch)[rows]
        index = starts[:, None] + np.arange(seq_len + 1)[None, :]
        return self.tokens[index].astype(np.int32)

    def split(self, fraction: float) -> tuple[Corpus, Corpus]:
        """The first 1 - `fraction` of the bytes and the rest: training and held-out text."""
        cut = len(self.tokens) - int(len(self.tokens) * fraction)
        return Corpus(self.tokens[:cut], self.files), Corpus(self.tokens[cut:], self.files)

    def windows(self, seq_len: int) -> int:
        """How many windows of seq_len + 1 tokens, overlapping by one, the text holds: held-out
        batches are made of them in order, so every token but the first is predicted once."""
        return max(0, (len(self.tokens) - 1) // seq_len)

    def window_rows(self, first: int, seq_len: int, rows: np.ndarray) -> np.ndarray:
        """Windows `first + rows` (see `windows`) as int32 rows of seq_len + 1 tokens."""
        index = (first + rows)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
        return self.tokens[index].astype(np.int32)

    def batch(self, seed: int, step: int, batch: int, seq_len: int) -> np.ndarray:
        """The whole global batch of a step, (batch, seq_len + 1) int32."""
        return self.batch_rows(seed, step, batch, seq_len, np.arange(batch))


def global_batch(
    corpus: Corpus, seed: int, step: int, shape: tuple[int, int], sharding: jax.sharding.Sharding
) -> jax.Array:
    """Step `step`'s batch as a global jax.Array; this process builds only its own rows."""
    batch, width = shape
    return _global(lambda rows: corpus.batch_rows(seed, step, batch, width - 1, rows), shape,
                   sharding)  # fmt: skip


def held_out_batch(
    corpus: Corpus, index: int, shape: tuple[int, int], sharding: jax.sharding.Sharding
) -> jax.Array:
    """Held-out batch `index`: windows index * batch .. (index + 1) * batch - 1 of `corpus`."""
    batch, width = shape
    return _global(lambda rows: corpus.window_rows(index * batch, width - 1, rows), shape,
                   sharding)  # fmt: skip


def _global(make_rows, shape: tuple[int, int], sharding: jax.sharding.Sharding) -> jax.Array:
    """A global (batch, width) array of which this process builds only the rows its devices hold
    (`make_rows(row indices)`)."""
    import jax

    index_map = sharding.addressable_devices_indices_map(shape)
    local_rows = sorted({r for idx in index_map.values() for r in range(shape[0])[idx[0]]})
    local = make_rows(np.array(local_rows, dtype=np.int64))
    return jax.make_array_from_process_local_data(sharding, local, shape)
