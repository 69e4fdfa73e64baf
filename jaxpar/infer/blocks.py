"""The paged KV cache's bookkeeping: which blocks of the pool each request holds, and which blocks
hold a cached prompt prefix.

The pool (`Generator.empty_cache` when paged) is `blocks` blocks of `block` consecutive positions
each; a request's block table lists the blocks that hold its positions 0.., in order. A block is
free, held by requests (a count of them), or cached: it holds a prompt's full block, named by a
digest of its tokens and of the key of the block before it, so a key names the whole prefix up to
the block's end and two prompts share a block only when they agree on every token up to there.
A new request whose prompt starts with cached blocks takes them by reference (its table points to
them, their count goes up) and computes only the rest. A shared block is never written: only full
prompt blocks are cached, and a request writes only positions after the ones it found cached. A
cached block that no request holds is kept until its space is wanted, least recently used first.
This class is host bookkeeping only; one instance per `data` shard, whose pool it counts.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np


class BlockPool:
    """Block ids 0..blocks-1: a free list, a count of holders per block, and the cached prefix
    blocks by key (those no request holds are evicted least recently used first).

    Args:
        blocks: the pool's size in blocks.
        block: positions per block.
        prefix_cache: keep full prompt blocks for later prompts that start with them.
    """

    def __init__(self, blocks: int, block: int, prefix_cache: bool = True):
        self.blocks, self.block, self.prefix_cache = blocks, block, prefix_cache
        self._free = list(range(blocks - 1, -1, -1))  # popped from the end: 0 first
        self._holders = [0] * blocks
        self._cached: OrderedDict[bytes, int] = OrderedDict()  # least recently used first
        self._key_of: dict[int, bytes] = {}
        self.queried_tokens = 0  # prompt tokens looked up
        self.hit_tokens = 0  # of them, found cached

    @property
    def used(self) -> int:
        """Blocks some request holds."""
        return sum(n > 0 for n in self._holders)

    @property
    def available(self) -> int:
        """Blocks `allocate` can hand out: free, or cached and held by no request."""
        return self.blocks - self.used

    def claimed(self, blocks: Sequence[int]) -> int:
        """How many of `blocks` (cached ones) a new holder would take from `available`."""
        return sum(not self._holders[b] for b in blocks)

    @property
    def cached(self) -> int:
        return len(self._cached)

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def allocate(self) -> int | None:
        """A block for one holder: a free one, else the least recently used cached block no
        request holds (forgetting its prefix); None when every block is held."""
        if self._free:
            block = self._free.pop()
        else:
            victim = next((k for k, b in self._cached.items() if not self._holders[b]), None)
            if victim is None:
                return None
            block = self._cached.pop(victim)
            del self._key_of[block]
        self._holders[block] = 1
        return block

    def release(self, blocks: Sequence[int]) -> None:
        """Drops one holder of each block; a block no one holds is free again (or stays cached,
        evictable)."""
        for block in blocks:
            assert self._holders[block] > 0, f"block {block} released more often than held"
            self._holders[block] -= 1
            if not self._holders[block] and block not in self._key_of:
                self._free.append(block)

    def _keys(self, ids: Sequence[int], n: int) -> list[bytes]:
        """The keys of the first `n` full blocks of `ids`."""
        keys, parent = [], b""
        tokens = np.asarray(ids, np.int64)
        for i in range(n):
            block = tokens[i * self.block : (i + 1) * self.block]
            parent = hashlib.sha256(parent + block.tobytes()).digest()
            keys.append(parent)
        return keys

    def match(self, ids: Sequence[int]) -> list[int]:
        """The cached blocks that hold the longest prefix of `ids` (full blocks, leaving at least
        one token to compute: its logits give the next token); nothing changes."""
        hits: list[int] = []
        if self.prefix_cache:
            for key in self._keys(ids, (len(ids) - 1) // self.block):
                if key not in self._cached:
                    break
                hits.append(self._cached[key])
        return hits

    def take(self, hits: Sequence[int], queried: int) -> None:
        """One more holder of each of `hits` (what `match` found for `queried` prompt tokens),
        now the most recently used."""
        for block in hits:
            self._holders[block] += 1
            self._cached.move_to_end(self._key_of[block])
        if self.prefix_cache:
            self.queried_tokens += queried
            self.hit_tokens += len(hits) * self.block

    def publish(self, ids: Sequence[int], table: Sequence[int]) -> None:
        """Caches the full blocks of prompt `ids`, held in blocks `table` (in order), that are
        not cached yet (a prompt computed twice at once keeps the first copy cached)."""
        if not self.prefix_cache:
            return
        for key, block in zip(self._keys(ids, len(ids) // self.block), table, strict=False):
            if key in self._cached or block in self._key_of:
                continue
            self._cached[key], self._key_of[block] = block, key

    def check(self) -> None:
        """Asserts the accounting: every block free, held or cached, and free blocks neither."""
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        for block in range(self.blocks):
            kept = self._holders[block] > 0 or block in self._key_of
            assert kept != (block in free), f"block {block} is lost or both free and kept"
        assert {b: k for k, b in self._cached.items()} == self._key_of
