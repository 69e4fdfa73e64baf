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
    def from_glob(cls, pattern: str) -> Corpus:
        """Reads every file matching `pattern` (recursive `**` allowed; `{stdlib}` expands).

        Raises:
            JaxparError: no files match, or they hold too little text.
        """
        paths = sorted(
            p for p in glob.glob(expand_path(pattern), recursive=True) if Path(p).is_file()
        )
        if not paths:
            raise JaxparError(
                f"data.path={pattern!r} matches no files; give a glob of local text files, "
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

    def batch(self, seed: int, step: int, batch: int, seq_len: int) -> np.ndarray:
        """The whole global batch of a step, (batch, seq_len + 1) int32."""
        return self.batch_rows(seed, step, batch, seq_len, np.arange(batch))


def global_batch(
    corpus: Corpus, seed: int, step: int, shape: tuple[int, int], sharding: jax.sharding.Sharding
) -> jax.Array:
    """Step `step`'s batch as a global jax.Array; this process builds only its own rows."""
    import jax

    batch, width = shape
    index_map = sharding.addressable_devices_indices_map(shape)
    local_rows = sorted({r for idx in index_map.values() for r in range(batch)[idx[0]]})
    rows = np.array(local_rows, dtype=np.int64)
    local = corpus.batch_rows(seed, step, batch, width - 1, rows)
    return jax.make_array_from_process_local_data(sharding, local, shape)
