"""The prefix cache's bookkeeping: which blocks of prompt positions the pool holds.

A block is `block` consecutive prompt positions starting at a multiple of `block`. Its key is a
digest of its tokens and of the key of the block before it, so a key names the whole prefix up to
the block's end: two prompts share a block only when they agree on every token up to there. The
pool's device memory (`Generator.empty_pool`) holds the keys and values; this class only maps keys
to pool blocks, least recently used first, and counts hits.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np


class PrefixCache:
    """Keys of cached prompt blocks -> pool block ids, evicted least recently used.

    Args:
        blocks: the pool's size in blocks.
        block: positions per block.
    """

    def __init__(self, blocks: int, block: int):
        self.blocks, self.block = blocks, block
        self._entries: OrderedDict[bytes, int] = OrderedDict()  # least recently used first
        self._free = list(range(blocks))
        self.queried_tokens = 0  # prompt tokens looked up
        self.hit_tokens = 0  # of them, found in the pool

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def _keys(self, ids: Sequence[int], n: int) -> list[bytes]:
        """The keys of the first `n` full blocks of `ids`."""
        keys, parent = [], b""
        tokens = np.asarray(ids, np.int64)
        for i in range(n):
            parent = hashlib.sha256(parent + tokens[i * self.block : (i + 1) * self.block]
                                    .tobytes()).digest()  # fmt: skip
            keys.append(parent)
        return keys

    def lookup(self, ids: Sequence[int]) -> list[int]:
        """The pool blocks that hold the longest cached prefix of `ids`, in order, leaving at
        least one token of `ids` to compute (its logits give the first new token)."""
        self.queried_tokens += len(ids)
        hits: list[int] = []
        for key in self._keys(ids, (len(ids) - 1) // self.block):
            if key not in self._entries:
                break
            self._entries.move_to_end(key)
            hits.append(self._entries[key])
        self.hit_tokens += len(hits) * self.block
        return hits

    def insert(self, ids: Sequence[int]) -> dict[int, int]:
        """Makes room for the full blocks of `ids` that the pool does not hold yet.

        Returns:
            block index -> the pool block to copy it to (evicting the least recently used
            blocks of other prefixes; fewer than asked when the pool is smaller than `ids`).
        """
        keys = self._keys(ids, len(ids) // self.block)
        mine = set(keys)
        placed: dict[int, int] = {}
        for i, key in enumerate(keys):
            if key in self._entries:
                self._entries.move_to_end(key)
                continue
            if not self._free:
                victim = next((k for k in self._entries if k not in mine), None)
                if victim is None:
                    break
                self._free.append(self._entries.pop(victim))
            self._entries[key] = placed[i] = self._free.pop()
        return placed
