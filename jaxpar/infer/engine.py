"""KV-cached generation on the mesh: one prefill, then one-token decode steps compiled once.

The cache is [P, C, B, K, S, H] per key and value: stage, layer slot, batch (over `data`), kv head
(over `tensor`), position, head dim. Positions sit next to the head dim so that a decode step's
attention contracts each row's keys and values where they lie, B and K leading as a batched dot
wants them (with positions before the kv heads, XLA:CPU copied each layer's span of the cache into
that order on every step: the largest cost of a 16-row step). Each pipeline stage keeps only its
own layers' cache. The layer stack runs in the stage program every pass over the stages runs
(`StageProgram`: one `jax.shard_map`, manual over `pipeline` and `data`, around a scan over
ticks), on a GPipe table: the batch is cut into M micro-batches (M = P when the rows allow, else
1), stage s works on micro-batch t - s at tick t and hands its activation to stage s + 1 with
`lax.ppermute`, so with several micro-batches every stage is busy once the pipeline is full. A
decode step is then M + P - 1 ticks of one token each.

On a mesh with `context` > 1 the cache's positions are split over it, striped (position p on
piece p % C, so a decode step writes on one piece and every piece's share grows evenly), and the
stage program is manual over `context` too: a prompt run is split over the pieces, each holding
the tokens whose positions it keeps, and its attention is a ring of the queries over the pieces'
shares of the cache; a decode step's token is on every piece, each attends it over its share, and
one reduction per layer merges them (`jaxpar.model.context.attend_cached`). A context no single
device's memory holds is served so; `cache_summary` says what each device holds.

The embedding, the LM head and sampling run outside, with the batch over `data` and the vocabulary
over `tensor`; the last stage's outputs are broadcast from it to the others, (B, T, D). The new
tokens come back replicated, so every process of a multi-process job can read them.

The weights are prepared once, when the generator is built: the blocks' fused projections
(`Block.weights`) and the embedding and head, all in the compute dtype. A decode step reads them
as they are; it neither casts nor concatenates a weight.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxpar.distributed import global_array
from jaxpar.errors import JaxparError
from jaxpar.infer.sampling import GREEDY, RowSampling, Sampling, sample, speculative_accept
from jaxpar.infer.speculate import verify_round
from jaxpar.mesh import DATA, PIPELINE
from jaxpar.model import context
from jaxpar.model.llama import BLOCK_WEIGHT_AXES, BlockWeights, KVCache, Llama
from jaxpar.pipeline.program import (
    StageProgram,
    microbatch_count,
    sequence_axis,
)
from jaxpar.pipeline.schedule import Schedule
from jaxpar.placement import Placement, logical_axes
from jaxpar.sharding import ACT_KV_HEADS, BATCH, LAYERS, NORM, SEQ, STAGE

# (paged: the pool's blocks in place of the rows, over `data`, and a block's positions in place
# of the row's)
CACHE_AXES = (STAGE, LAYERS, BATCH, ACT_KV_HEADS, SEQ, None)
# Shapes are bucketed so that a few compilations serve every request: prompt widths are padded to
# a power of two of at least MIN_PROMPT_WIDTH tokens, and decode steps are compiled for cache spans
# of powers of two from MIN_DECODE_SPAN positions up to the whole cache.
MIN_PROMPT_WIDTH = 16
MIN_DECODE_SPAN = 128
# Tokens a row that `generate` decodes per dispatch (one block on the device, no host between).
DECODE_STEPS = 8
# A decode block's stop ids per row: the end-of-sequence ids and a request's first own ones.
STOP_IDS = 4


def check_context(prompt_len: int, new_tokens: int, context: int, what: str = "new tokens") -> None:
    """The one rule that a prompt and its new tokens fit the context (a generator's `max_len`, a
    loaded model's `context`); `what` names the count of new tokens as the caller spells it.

    Raises:
        JaxparError: they do not fit; the message gives the lengths.
    """
    if prompt_len + new_tokens > context:
        raise JaxparError(
            f"prompt of {prompt_len} tokens + {what} {new_tokens} exceeds the model's context of "
            f"{context} tokens"
        )


@dataclass(frozen=True)
class Generation:
    """What `Generator.generate` returns: new ids per prompt, and timing."""

    new_ids: list[list[int]]
    prefill_s: float  # time to first token: prefill and the first sample, on the host
    # each later token's time: a round's (a decode block's, a verify pass's) over the tokens a
    # row drew in it on average, once for each of its steps
    decode_s: list[float]
    compile_s: float
    # Speculative decoding: target passes (`Generator.verify`), tokens drafted and kept.
    passes: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second per sequence after the first (the decode rate)."""
        return len(self.decode_s) / sum(self.decode_s) if self.decode_s else 0.0


class Generator:
    """A model on a mesh, ready to prefill and decode a batch of `batch` rows up to `max_len`.

    A static batch (`generate`) fills the cache's rows all at once. The server
    (`jaxpar.infer.scheduler`) pages it: the cache is a pool of `blocks` blocks of `block`
    positions per `data` shard, [P, C, data x blocks, K, block, H], and each step takes a block
    table per row (`table`, [B, max_len / block], block ids of the row's shard) that says which
    blocks hold the row's positions 0, block, 2 block, ...; it fills its rows one request at a
    time with prompt pieces (`prefill_chunk`) and decodes every active row together (`decode`).
    A paged step gathers each row's blocks into the order attention reads (a gather, in XLA; a
    paged-attention kernel would read them where they lie) and writes the positions it computes
    into their blocks. Every step writes only the positions it computes, in place.

    Args:
        placement: a serving placement (`Placement(config, mesh, serving=True)`).
        params: parameters laid out by `placement.param_shardings`.
        batch: rows per call, before padding to a multiple of `data`.
        max_len: prompt plus new tokens, the longest sequence a row holds.
        blocks, block: a paged cache of this many blocks of this many positions per `data` shard
            (blocks 0: rows of `max_len` positions).
    """

    def __init__(
        self,
        placement: Placement,
        params: nnx.State,
        *,
        batch: int,
        max_len: int,
        blocks: int = 0,
        block: int = 16,
    ):
        if not placement.serving:
            raise JaxparError(
                "a Generator needs a serving placement (Placement(..., serving=True))"
            )
        spec = placement.spec
        self.placement, self.mesh, self.dtype = placement, placement.mesh, placement.dtype
        self.data, self.stages = spec.data, spec.pipeline
        self.rows = -(-batch // spec.data) * spec.data  # padded to a multiple of `data`
        self.local_rows = self.rows // spec.data  # the rows of one `data` shard
        self.microbatches = microbatch_count(self.local_rows, self.stages)  # of a full batch
        self.context = spec.context  # pieces of the cache's positions
        self.max_len = max_len
        self.length = -(-max_len // self.context) * self.context  # the cache's positions
        if blocks and (block % self.context or self.length % block):
            raise JaxparError(
                f"serve.block_size={block} must divide the context of {self.length} positions "
                f"and be a multiple of context={self.context}: each block's positions are split "
                "evenly over the context axis"
            )
        self.blocks, self.block = blocks, block
        self.graphdef = placement.graphdef
        self._compiled: dict[tuple, jax.stages.Compiled] = {}
        self._spare: KVCache | None = None  # `generate`'s cache, kept for its next call
        self.compile_s = 0.0  # spent compiling so far
        self.top, self.weights = self._prepare(params)

    # -- weights and cache -------------------------------------------------------------------

    def _prepare(self, params: nnx.State) -> tuple[nnx.State, BlockWeights]:
        """The parameters as the steps read them, made once: the embedding and head cast to the
        compute dtype (norm scales stay float32), and the blocks' derived weights."""
        p, dtype = self.placement, self.dtype
        top_shardings = nnx.State({k: v for k, v in p.param_shardings.items() if k != "blocks"})
        weight_shardings = BlockWeights(
            *(NamedSharding(self.mesh, p.rules.spec(axes)) for axes in BLOCK_WEIGHT_AXES)
        )

        def prepare(params: nnx.State) -> tuple[nnx.State, BlockWeights]:
            model = nnx.merge(self.graphdef, params)
            top = nnx.State({k: v for k, v in params.items() if k != "blocks"})

            def cast(v: nnx.Variable) -> nnx.Variable:
                return v if NORM in logical_axes(v) else v.replace(v.get_value().astype(dtype))

            top = jax.tree.map(cast, top, is_leaf=lambda x: isinstance(x, nnx.Variable))
            return top, model.blocks.weights(dtype)

        with jax.set_mesh(self.mesh):
            return jax.jit(prepare, out_shardings=(top_shardings, weight_shardings))(params)

    def _model(self, top: nnx.State) -> Llama:
        """The model around the prepared top-level weights; its blocks' parameters are only
        shapes (the steps compute on `self.weights`)."""
        blocks = nnx.State({"blocks": self.placement.abstract_params["blocks"]})
        return nnx.merge(self.graphdef, blocks, top)

    @cached_property
    def cache_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, self.placement.rules.spec(CACHE_AXES))

    @functools.cache  # noqa: B019 (one per generator, as long as it lives)
    def _zeros_program(self, shape: tuple[int, ...], sharding: NamedSharding) -> Callable:
        """Zeros of `shape`, compiled once (a new jit of a new function each call compiled it
        again: 40-50 ms before every `generate` on one CPU device)."""
        return jax.jit(lambda: jnp.zeros(shape, self.dtype), out_shardings=sharding)

    def _zeros(self, shape: tuple[int, ...], sharding: NamedSharding) -> KVCache:
        zeros = self._zeros_program(shape, sharding)
        return KVCache(zeros(), zeros())

    @property
    def _layer_shape(self) -> tuple[int, int]:
        return self.stages, self.placement.layout.slots_per_stage

    @property
    def _cache_shape(self) -> tuple[int, ...]:
        m = self.placement.config.model
        paged = (self.data * self.blocks, self.block)
        rows, length = paged if self.blocks else (self.rows, self.length)
        return (*self._layer_shape, rows, m.kv_heads, length, m.head_dim)

    def empty_cache(self) -> KVCache:
        return self._zeros(self._cache_shape, self.cache_sharding)

    @property
    def _position_bytes(self) -> int:
        """The cache's bytes per position of a row: keys and values of every layer."""
        m = self.placement.config.model
        return 2 * m.layers * m.kv_heads * m.head_dim * jnp.dtype(self.dtype).itemsize

    @property
    def slot_bytes(self) -> int:
        """The bytes of a row of `max_len` positions (a slot's, unpaged)."""
        return self._position_bytes * self.length

    @property
    def block_bytes(self) -> int:
        return self._position_bytes * self.block

    @property
    def device_tokens(self) -> int:
        """Tokens of cache one device holds (for its stage's layers): its `data` shard's rows or
        blocks, times its share of their positions (all of them but over `context`)."""
        if self.blocks:
            return self.blocks * self.block // self.context
        return self.local_rows * self.length // self.context

    def cache_summary(self) -> str:
        """The start-up line that says how the cache is spread over the devices."""
        shard = self.cache_sharding.shard_shape(self._cache_shape)
        per_device = 2 * math.prod(shard) * jnp.dtype(self.dtype).itemsize  # keys and values
        if self.blocks:
            return (
                f"paged KV cache of {self.blocks:,} blocks x {self.block} positions per data "
                f"shard ({self.blocks * self.block / self.length:,.1f} full contexts): each "
                f"device holds {self.device_tokens:,} tokens of it ({per_device / 2**20:,.2f} MiB)"
            )
        return (
            f"KV cache of {self.rows} rows x {self.length:,} positions: each device holds "
            f"{self.device_tokens:,} tokens of it ({self.local_rows} rows x "
            f"{self.length // self.context:,} positions, {per_device / 2**20:,.2f} MiB)"
        )

    # -- the steps ---------------------------------------------------------------------------

    def _stack(self, model: Llama, weights: BlockWeights, x_BTD, positions_BT, cache: KVCache,
               slot_B, write_B, by_seq: bool = False, span: int | None = None,
               table_BN=None):  # fmt: skip
        """The layer stack on (B, T, D) through the pipelined shard_map; returns (x, cache).

        Row b reads and writes cache row `slot_B[b]` of its `data` shard (the rows of one
        micro-batch are consecutive slots), or when paged the blocks `table_BN[b]` of its shard,
        and keeps what it wrote only where `write_B[b]`.
        Positions None mean 0..T-1 in every row (a prefill). With `by_seq`, each shard has one
        row whose positions are cut into micro-batches along the sequence (a prompt chunk): the
        stages work on consecutive pieces at once, each piece attending to what the pieces
        before it wrote on the same stage. Attention reads the cache's first `span` positions
        (None: all); every position this call computes must lie below it.

        With `context`, the cache's positions are striped over it (`context.attend_cached`); a
        prompt run that `_split`s (starting at a multiple of C) comes in `context.striped_order`,
        each piece holding the tokens whose positions it keeps, and its outputs go back in that
        order; a decode step's token (and a run too short to split) is on every piece.
        """
        p, t = self.stages, x_BTD.shape[1]
        split = self._split(t)
        program = StageProgram(self.mesh, Schedule("gpipe", p, self._microbatches(x_BTD, by_seq)))
        m = program.schedule.microbatches
        valid = jnp.asarray(self.placement.layout.valid)
        # Positions None: 0..T-1 in every row, attended causally (the cache split over `context`
        # always takes them as positions, in the stored order).
        causal = positions_BT is None and self.context == 1
        if positions_BT is None:
            order_T = context.striped_order(t, self.context) if split else np.arange(t)
            positions_BT = jnp.broadcast_to(jnp.asarray(order_T, jnp.int32), x_BTD.shape[:2])
        span_local = -(-self._span(span) // self.context)  # the cache entries attention reads
        paged = table_BN is not None
        block_local = self.block // self.context  # a block's entries on one piece

        def stages(weights_1X, cache_1X: KVCache, x_BTD, positions_BT, slot_B, write_B,
                   *table_BN):  # fmt: skip
            stage = jax.lax.axis_index(PIPELINE)
            weights_X = jax.tree.map(lambda a: a[0], weights_1X)
            cache_X = KVCache(*(c[0] for c in cache_1X))
            # The inputs are the same on every stage; what each stage carries is its own.
            x_BTD = jax.lax.pcast(x_BTD, (PIPELINE,), to="varying")
            b_all, t, d = x_BTD.shape
            if by_seq:  # every row's positions cut into M consecutive pieces
                b = b_all
                x_MbTD = x_BTD.reshape(b, m, t // m, d).swapaxes(0, 1)
                positions_MbT = positions_BT.reshape(b, m, t // m).swapaxes(0, 1)
                slot_Mb = jnp.broadcast_to(slot_B, (m, b))
                write_Mb = jnp.broadcast_to(write_B, (m, b))
                table_MbN = [jnp.broadcast_to(t, (m, *t.shape)) for t in table_BN]
            else:
                b = b_all // m
                x_MbTD, positions_MbT, slot_Mb, write_Mb, *table_MbN = (
                    program.split(a[None])
                    for a in (x_BTD, positions_BT, slot_B, write_B, *table_BN)
                )

            def layers(h_bTD, positions_bT, cache_X: KVCache):
                def layer(h_bTD, slot):
                    w, real, k, v = slot
                    out_bTD, new = model.blocks.apply(w, h_bTD, positions_bT, KVCache(k, v))
                    return jnp.where(real, out_bTD, h_bTD), new

                return jax.lax.scan(layer, h_bTD, (weights_X, valid[stage, 0], *cache_X))

            def run(repeat, micro, active, h_bTD, cache_X: KVCache):
                keep_b = active & write_Mb[micro]
                if paged:  # each row's blocks gathered in order
                    ids_bN = table_MbN[0][micro][:, : -(-span_local // block_local)]

                    def gathered(pool_CNKLH):
                        g_CbKNLH = jnp.moveaxis(pool_CNKLH[:, ids_bN], 3, 2)
                        g_CbKSH = g_CbKNLH.reshape(*g_CbKNLH.shape[:3], -1, g_CbKNLH.shape[-1])
                        return g_CbKSH[:, :, :, :span_local]

                    rows = [gathered(c) for c in cache_X]
                else:
                    row = slot_Mb[micro, 0]
                    rows = [jax.lax.dynamic_slice_in_dim(c, row, b, axis=1)[:, :, :, :span_local]
                            for c in cache_X]  # fmt: skip
                h_bTD, new_CbTKH = layers(h_bTD, None if causal else positions_MbT[micro],
                                          KVCache(*rows))  # fmt: skip
                # This call's keys and values go to their rows (blocks) and positions, in place;
                # a row that must not write (and every row of an idle tick) aims past the end,
                # dropped.
                entries = self.length // self.context
                at_bT = context.cache_index(positions_MbT[micro], entries)
                if paged:
                    held_bT = jnp.take_along_axis(table_MbN[0][micro], at_bT // block_local,
                                                  axis=1, mode="clip")  # fmt: skip
                    rows_bT = jnp.where(keep_b[:, None] & (at_bT < entries), held_bT,
                                        cache_X.k.shape[1])  # fmt: skip
                    at_bT = at_bT % block_local
                else:
                    at_bT = jnp.where(keep_b[:, None], at_bT, entries)
                    rows_bT = jnp.broadcast_to((row + jnp.arange(b))[:, None], at_bT.shape)
                # (indices around a slice put their axes first: the update is (b, T, C, K, H))
                cache_X = KVCache(*(c.at[:, rows_bT, :, at_bT].set(jnp.moveaxis(n, 0, 2),
                                                                   mode="drop")
                                    for c, n in zip(cache_X, new_CbTKH, strict=True)))  # fmt: skip
                return h_bTD, cache_X

            out_MbTD, cache_X = program.forward(run, x_MbTD, cache_X)
            if by_seq:  # each row's pieces back in order
                out_MbTD = out_MbTD.swapaxes(0, 1)
            out_1BTD = out_MbTD.reshape(1, b_all, t, d)
            return out_1BTD, KVCache(*(c[None] for c in cache_X))

        rows_axis, seq_axis = program.batch_axis, sequence_axis(program.manual)
        cache_spec = PartitionSpec(PIPELINE, None, rows_axis, None, seq_axis)
        caches, row_spec = KVCache(cache_spec, cache_spec), PartitionSpec(rows_axis)
        x_spec = PartitionSpec(rows_axis, seq_axis if split else None)
        tables = (table_BN,) if paged else ()
        in_specs = (PartitionSpec(PIPELINE), caches, x_spec, x_spec, row_spec, row_spec)
        run_stages = program(
            stages,
            in_specs=(*in_specs, *(row_spec for _ in tables)),
            out_specs=(PartitionSpec(PIPELINE, *x_spec), caches),
        )
        y_PBTD, cache = run_stages(weights, cache, x_BTD, positions_BT, slot_B, write_B, *tables)
        return y_PBTD[p - 1], cache  # only the last stage's outputs are the model's

    def _split(self, t: int) -> bool:
        """Whether a call of `t` tokens a row splits them over `context`: a prompt run of at
        least two tokens a piece does (`context.attend_cached` takes one query a row for a decode
        step's, the same on every piece); a decode step and a shorter run are on every piece."""
        return self.context > 1 and t >= 2 * self.context

    def _microbatches(self, x_BTD: jax.Array, by_seq: bool) -> int:
        """Micro-batches of a call: of one shard's rows, or (`by_seq`) of its one row's
        positions (of one piece's share when split over `context`)."""
        t = x_BTD.shape[1] // (self.context if self._split(x_BTD.shape[1]) else 1)
        n = t if by_seq else x_BTD.shape[0] // self.data
        return microbatch_count(n, self.stages)

    def _forward(self, top, weights, cache, tokens_BT, positions_BT, slot_B, write_B, last_B,
                 by_seq=False, span=None, table_BN=None):  # fmt: skip
        """Logits at each row's offset `last_B` of this call (B, V), or at each of its offsets
        `last_BJ` (B, J, V), and the cache."""
        model = self._model(top)
        t = tokens_BT.shape[1]
        if self._split(t):  # stored striped over `context` (see `_stack`)
            order_T = context.striped_order(t, self.context)
            tokens_BT = tokens_BT[:, order_T]
            if positions_BT is not None:
                positions_BT = positions_BT[:, order_T]
            last_B = context.striped_index(last_B, t, self.context)
        x_BTD = model.embed(tokens_BT, self.dtype)
        x_BTD, cache = self._stack(model, weights, x_BTD, positions_BT, cache, slot_B, write_B,
                                   by_seq, span, table_BN)  # fmt: skip
        x_BJD = jnp.take_along_axis(x_BTD, last_B.reshape(len(last_B), -1)[..., None], axis=1)
        logits_BJV = model.logits(x_BJD)
        return (logits_BJV if last_B.ndim == 2 else logits_BJV[:, 0]), cache

    def _first_slots(self, n: int) -> jax.Array:
        """The slots of n rows (a multiple of `data`): the first n / data of each shard."""
        return jnp.arange(n, dtype=jnp.int32) % (n // self.data)

    def _prefill(self, top, weights, cache, tokens_BT, lengths_B, rows: RowSampling):
        """Every row's prompt from position 0 (a static batch)."""
        write_B = jnp.ones(self.rows, bool)
        logits_BV, cache = self._forward(top, weights, cache, tokens_BT, None,
                                         self._first_slots(self.rows),
                                         write_B, lengths_B - 1)  # fmt: skip
        return cache, logits_BV, sample(logits_BV, rows)

    def _decode(self, top, weights, cache, inputs_BX, layout, span=None, steps=1):
        """Up to `steps` tokens per row, one at a time on the device, each fed back as the next
        step's input at the next position (below `span`): the host sends the block's inputs once
        and reads its tokens once. Row b draws at most `limit_B[b]` tokens and stops after one
        of its `stops_BS[b]` ids (-1: none); a stopped row writes nothing more and reads -1. The
        block ends early once every row has stopped. Inactive rows leave the cache as it is.
        The rows' inputs come `_packed`. Returns the cache, the logits of each step (B, steps, V)
        and the tokens (B, steps)."""
        x = _unpacked(inputs_BX, layout)
        rows = RowSampling(*(x[k] for k in RowSampling._fields))
        slots_B, table_BN = self._first_slots(len(inputs_BX)), x.get("table")

        def step(i, cache, token_B, live_B):
            logits_BV, cache = self._forward(
                top, weights, cache, token_B[:, None], (x["position"] + i)[:, None], slots_B,
                live_B, jnp.zeros_like(token_B), span=span, table_BN=table_BN,
            )  # fmt: skip
            new_B = sample(logits_BV, rows._replace(count=rows.count + i))
            return cache, logits_BV, jnp.where(live_B, new_B, -1)

        live_B = x["active"] & (x["limit"] > 0)
        if steps == 1:  # (no loop: one dispatch's step as lean as it can be)
            cache, logits_BV, new_B = step(0, cache, x["token"], live_B)
            return cache, logits_BV[:, None], new_B[:, None]

        b, vocab = len(inputs_BX), self.placement.config.model.vocab

        def body(carry):
            i, cache, token_B, live_B, logits_BKV, new_BK = carry
            cache, logits_BV, new_B = step(i, cache, token_B, live_B)
            stopped_B = (new_B[:, None] == x["stops"]).any(-1) | (i + 1 >= x["limit"])
            return (i + 1, cache, jnp.where(live_B, new_B, token_B), live_B & ~stopped_B,
                    logits_BKV.at[:, i].set(logits_BV.astype(jnp.float32)),
                    new_BK.at[:, i].set(new_B))  # fmt: skip

        carry = (jnp.int32(0), cache, x["token"], live_B,
                 jnp.zeros((b, steps, vocab), jnp.float32), jnp.full((b, steps), -1, jnp.int32))
        _, cache, _, _, logits_BKV, new_BK = jax.lax.while_loop(
            lambda c: (c[0] < steps) & c[3].any(), body, carry
        )
        return cache, logits_BKV, new_BK

    def _verify(self, top, weights, cache, inputs_BX, draft_logits_BKV=None, *, layout, span=None):
        """Speculative decoding's target pass: each row's last token and its `drafts` (the
        first `drafted` of k are real) at consecutive positions from its own, in one forward
        pass, keeping the drafts that the target's own draws agree with (`speculative_accept`:
        for a greedy row, its greedy tokens). The cache gets every real position's keys and
        values; those after the accepted ones are stale and are written over before any step
        reads them (attention reads a row's cache only below its first position). The rows'
        inputs come `_packed`; `draft_logits_BKV` are a draft model's (None: the drafts are
        certain, as n-gram lookups are). Returns the cache, the logits (B, k + 1, V) and the
        tokens (B, k + 1): the accepted drafts, the target's next token, then -1."""
        x = _unpacked(inputs_BX, layout)
        rows = RowSampling(*(x[k] for k in RowSampling._fields))
        drafts_BK, drafted_B = x["drafts"], x["drafted"]
        tokens_BJ = jnp.concatenate([x["token"][:, None], drafts_BK], axis=1)
        offsets_J = jnp.arange(tokens_BJ.shape[1], dtype=jnp.int32)
        # (the padding after the real drafts sits past the cache's end: never written)
        positions_BJ = jnp.where(offsets_J <= drafted_B[:, None],
                                 x["position"][:, None] + offsets_J, self.length)  # fmt: skip
        b = len(inputs_BX)
        logits_BJV, cache = self._forward(
            top, weights, cache, tokens_BJ, positions_BJ, self._first_slots(b), x["active"],
            jnp.broadcast_to(offsets_J, tokens_BJ.shape), span=span, table_BN=x.get("table"),
        )  # fmt: skip
        new_BJ = speculative_accept(logits_BJV, drafts_BK, drafted_B, rows, draft_logits_BKV)
        return cache, logits_BJV, jnp.where(x["active"][:, None], new_BJ, -1)

    def _chunk(self, top, weights, cache, inputs_RX, layout, span=None):
        """Pieces of R / data prompts per `data` shard: row r's tokens go to slot `slot_R[r]` of
        its shard (paged: to blocks `table_RN[r]`) at positions start_R[r]..; its first
        `length_R[r]` tokens are real, and the token drawn after the last of them is returned
        (the first new token, on a prompt's last piece). Attention reads the cache's first
        `span` positions (every real one is below it). The rows' inputs come `_packed`."""
        x = _unpacked(inputs_RX, layout)
        tokens_RT, start_R, length_R = x["tokens"], x["start"], x["length"]
        rows = RowSampling(*(x[k] for k in RowSampling._fields))
        offsets_T = jnp.arange(tokens_RT.shape[1], dtype=jnp.int32)
        # The padding after the real tokens sits past the cache's end: never written, never seen.
        positions_RT = jnp.where(offsets_T < length_R[:, None], start_R[:, None] + offsets_T,
                                 self.length)  # fmt: skip
        logits_RV, cache = self._forward(top, weights, cache, tokens_RT, positions_RT, x["slot"],
                                         x["active"], length_R - 1, by_seq=True, span=span,
                                         table_BN=x.get("table"))  # fmt: skip
        return cache, logits_RV, sample(logits_RV, rows)

    # -- compiled once per shape -------------------------------------------------------------

    def _step(self, name: str, args: tuple, **static: Any) -> jax.stages.Compiled:
        """Step `name` (`_prefill`, `_decode`, `_chunk`) compiled for the shapes of `args`
        (device arrays) and the `static` settings, the first time they come."""
        # (the weights' shapes never change: the key reads the rest, a step's host work)
        shapes = tuple((x.shape, x.dtype) for x in jax.tree.leaves(args[2:]))
        key = (name, shapes, tuple(sorted(static.items())))
        if key not in self._compiled:
            cache = KVCache(self.cache_sharding, self.cache_sharding)
            rows = NamedSharding(self.mesh, PartitionSpec(DATA))
            # The new tokens come back replicated, readable by every process.
            out = (cache, rows, self.placement.replicated)
            step = functools.partial(getattr(self, name), **static)
            jitted = jax.jit(step, out_shardings=out, donate_argnums=2)
            abstract = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), args
            )
            start = time.perf_counter()
            with jax.set_mesh(self.mesh):
                self._compiled[key] = jitted.lower(*abstract).compile()
            self.compile_s += time.perf_counter() - start
        return self._compiled[key]

    def _run(self, name: str, args: tuple, **static: Any) -> Any:
        return self._step(name, args, **static)(*args)

    def _rows(self, x: Any) -> jax.Array:
        return global_array(np.asarray(x), NamedSharding(self.mesh, PartitionSpec(DATA)))

    def _shared(self, x: Any) -> jax.Array:
        return global_array(np.asarray(x), self.placement.replicated)

    def _sampling(self, rows: RowSampling | None, n: int) -> RowSampling:
        rows = RowSampling.fill(n, GREEDY, 0) if rows is None else rows
        return RowSampling(*(self._rows(x) for x in rows))

    def decode_inputs(self, cache: KVCache | None = None, n: int | None = None) -> tuple:
        """The decode step's arguments for `n` (default all) active greedy rows at position 0,
        for inspecting its program: (the positional arguments, the static `layout`); the cache
        only as a shape unless one is given."""
        if cache is None:
            c = jax.ShapeDtypeStruct(self._cache_shape, self.dtype, sharding=self.cache_sharding)
            cache = KVCache(c, c)
        n = self.rows if n is None else n
        zeros = np.zeros(n, np.int32)
        table = np.zeros((n, self.length // self.block), np.int32) if self.blocks else None
        inputs, layout = self._packed(token=zeros, position=zeros, active=np.ones(n, bool),
                                      limit=zeros + 1, stops=stop_table(n),
                                      **RowSampling.fill(n, GREEDY, 0)._asdict(),
                                      **self._table(table))  # fmt: skip
        return (self.top, self.weights, cache, inputs), layout

    def decode_jaxpr(self) -> Any:
        """The decode step as a jaxpr (for inspecting what it computes for every token)."""
        with jax.set_mesh(self.mesh):
            args, layout = self.decode_inputs()
            return jax.make_jaxpr(functools.partial(self._decode, layout=layout))(*args)

    def decode_compiled(self, span: int | None = None, steps: int = 1) -> jax.stages.Compiled:
        """The compiled decode block of `steps` tokens (for FLOP, byte and collective
        accounting: one step's with `steps` 1)."""
        args, layout = self.decode_inputs()
        return self._step("_decode", args, layout=layout, span=self._span(span), steps=steps)

    def spans(self, least: int = MIN_DECODE_SPAN) -> list[int]:
        """The cache spans decode steps are compiled for: powers of two from `least`, and the
        whole cache."""
        spans, span = [], least
        while span < self.length:
            spans.append(span)
            span *= 2
        return [*spans, self.length]

    def row_counts(self) -> list[int]:
        """The decode steps' row counts per `data` shard: all the rows, then a quarter of them
        again and again while the pipeline's stages still get a micro-batch each."""
        counts, n = [], self.local_rows
        while n >= self.stages and n % self.stages == 0 and n >= 1:
            counts.append(n)
            if n < 4 * self.stages:
                break
            n //= 4
        return sorted(counts or [self.local_rows])

    def span_for(self, positions: int) -> int:
        """The shortest span of `spans()` that holds `positions` positions."""
        return next(s for s in self.spans() if s >= positions)

    def _span(self, span: int | None) -> int:
        return self.length if span is None else min(span, self.length)

    def prefill(self, cache, tokens_BT, lengths_B, rows: RowSampling | None = None):
        """Runs the prompts (right-padded, (B, T) with T <= max_len) from position 0: returns
        the cache, the logits at each row's last prompt token and the first new token."""
        args = (self._rows(tokens_BT), self._rows(lengths_B), self._sampling(rows, self.rows))
        return self._run("_prefill", (self.top, self.weights, cache, *args))

    def decode(self, cache, token_B, position_B, rows: RowSampling | None = None, active_B=None,
               span: int | None = None, table_BN=None, steps: int = 1, limit_B=None,
               stops_BS=None):  # fmt: skip
        """A block of up to `steps` tokens per row from its own position on (rows not `active_B`
        write nothing), decoded on the device without the host (see `_decode`): returns the
        cache, the logits (B, steps, V) and the tokens (B, steps), -1 after a row has stopped.

        Row b draws at most `limit_B[b]` tokens (default `steps`) and stops after any of its
        `stops_BS[b]` ids (up to `STOP_IDS` of them; the caller checks the rest). B may be fewer
        than all the rows: a multiple of `data`, the rows then being the first B / data slots
        of each shard (`row_counts`), so that a few requests in many slots compute only their
        own rows. Attention reads the cache's first `span` positions (None: all; every position
        the block writes must be below it), so that short sequences in a long cache read only
        what they need. Paged, `table_BN` gives each row's blocks, which must hold the block's
        positions. Compiled once per row count, span and `steps`."""
        n = len(token_B)
        active_B = np.ones(n, bool) if active_B is None else active_B
        rows = RowSampling.fill(n, GREEDY, 0) if rows is None else rows
        limit_B = np.full(n, steps, np.int32) if limit_B is None else limit_B
        inputs, layout = self._packed(token=token_B, position=position_B, active=active_B,
                                      limit=limit_B, stops=stop_table(n, stops_BS),
                                      **rows._asdict(), **self._table(table_BN))  # fmt: skip
        return self._run("_decode", (self.top, self.weights, cache, inputs), layout=layout,
                         span=self._span(span), steps=steps)  # fmt: skip

    def verify(self, cache, token_B, position_B, drafts_BK, drafted_B, rows: RowSampling,
               active_B, span: int | None = None, table_BN=None,
               draft_logits_BKV=None):  # fmt: skip
        """Speculative decoding's target pass (see `_verify`): each row's last token at its
        position and its `drafted_B[b]` drafts after it, checked in one forward pass. Returns
        the cache, the logits (B, k + 1, V) and the tokens (B, k + 1): the kept drafts, the
        target's next token, then -1. Compiled once per row count, span and k."""
        if self.context > 1:
            raise JaxparError("speculative decoding needs context=1: a verify pass's tokens "
                              "would be split over the context axis")  # fmt: skip
        inputs, layout = self._packed(token=token_B, position=position_B, active=active_B,
                                      drafts=drafts_BK, drafted=drafted_B, **rows._asdict(),
                                      **self._table(table_BN))  # fmt: skip
        args = (self.top, self.weights, cache, inputs, draft_logits_BKV)
        return self._run("_verify", args, layout=layout, span=self._span(span))

    def prefill_chunk(self, cache, tokens_RT, slot_R, start_R, length_R, active_R,
                      rows: RowSampling, table_RN=None, span: int | None = None):  # fmt: skip
        """Prompt pieces, R / data of them per `data` shard, each a row (see `_chunk`; the rows
        of shard s are s R / data, ..., consecutive): returns the cache, the logits after each
        row's last real token and the token drawn from them. Several rows a shard only when
        paged (an unpaged step reads consecutive slots). Attention reads the cache's first
        `span` positions (None: all; every piece must end below it), compiled once per span.

        Several prompts' pieces in one call cost little more than one's on a device that one
        piece leaves idle: on one CPU device (a 4-layer d=64 model) 8 rows of 16 tokens take 2x
        one row of 64."""
        if not self.blocks and len(tokens_RT) != self.data:
            raise JaxparError("an unpaged cache's prompt pieces are one row per data shard")
        inputs, layout = self._packed(tokens=tokens_RT, slot=slot_R, start=start_R,
                                      length=length_R, active=active_R, **rows._asdict(),
                                      **self._table(table_RN))  # fmt: skip
        args = (self.top, self.weights, cache, inputs)
        return self._run("_chunk", args, layout=layout, span=self._span(span))

    def _table(self, table_BN) -> dict[str, Any]:
        """A paged step's block tables as an input (none: unpaged)."""
        if (table_BN is None) != (not self.blocks):
            raise JaxparError("a paged cache's steps take block tables, and only its steps do")
        return {} if table_BN is None else {"table": table_BN}

    def _packed(self, **inputs: Any) -> tuple[jax.Array, tuple]:
        """A step's host inputs, [B, ...] each, as one int32 array [B, X] with rows over `data`,
        and the static layout that `_unpacked` reads it back with: one host-to-device transfer
        a step, not one per input (each is ~20 us of host time before the step can start, nine
        of them as long as a one-row decode step's compute on one CPU device). Floats travel as
        their bits."""
        columns, layout = [], []
        for name, value in inputs.items():
            value = np.asarray(value)
            flat = value.reshape(len(value), -1)
            bits = flat.view(np.int32) if value.dtype == np.float32 else flat.astype(np.int32)
            columns.append(bits)
            layout.append((name, value.dtype.name, value.shape[1:]))
        return self._rows(np.concatenate(columns, axis=1)), tuple(layout)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: Sampling,
        *,
        seed: int = 0,
        stop_ids: Sequence[int] = (),
        on_tokens: Callable[[list[int | None]], None] | None = None,
        steps: int = DECODE_STEPS,
        drafter: Any = None,
    ) -> Generation:
        """Generates up to `max_new_tokens` after each prompt (a row stops after a stop id), as
        one static batch: every prompt prefilled together, then decoded in blocks of up to
        `steps` tokens a row (`decode`) until the last row stops. Prompt i is seeded `seed + i`.
        With a `drafter` (`jaxpar.infer.speculate`), each round instead checks its drafts in
        one target pass (`verify`): the same greedy tokens, the same distribution sampled.

        `on_tokens(ids)` receives each step's new token per prompt as soon as it is on the host
        (a block's steps one after another, for streaming); None for a prompt that has stopped.
        """
        call = time.perf_counter()
        n = len(prompts)
        if not 0 < n <= self.rows:
            raise JaxparError(f"{n} prompts for a generator built for {self.rows} rows")
        if steps < 1:
            raise JaxparError(f"decode steps {steps} must be at least 1")
        longest = max(len(p) for p in prompts)
        check_context(longest, max_new_tokens, self.max_len)
        c = self.context  # a prompt run splits evenly over `context`
        width = min(self.length, -(-_bucket(longest) // c) * c)
        tokens = np.zeros((self.rows, width), np.int32)
        lengths = np.ones((self.rows,), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
            lengths[i] = len(p)
        rows = RowSampling.fill(self.rows, sampling, seed + np.arange(self.rows))
        stops = [tuple(stop_ids)] * self.rows
        compile_before = self.compile_s
        # The cache of the last call, if any: every position a step reads is written first by
        # this call (attention reads a row only below its position), so it needs no zeros.
        cache, self._spare = self._spare or self.empty_cache(), None
        span = self.span_for(longest + max_new_tokens)  # holds every row
        inputs = (self._rows(tokens), self._rows(lengths), self._sampling(rows, self.rows))
        cache, _, token_B = self._run("_prefill", (self.top, self.weights, cache, *inputs))
        if drafter is None:  # (compiled while the prefill runs, or looked up)
            self.decode_compiled(span, steps)
        block = np.asarray(token_B)[:, None]
        # Time to first token as the caller sees it, but for compiling.
        prefill_s = time.perf_counter() - call - (self.compile_s - compile_before)
        if drafter is not None:
            drafter.begin(tokens, lengths, rows)
        passes = drafted = accepted = 0
        new: list[list[int]] = [[] for _ in range(n)]
        live = np.zeros(self.rows, bool)
        live[:n] = True
        stop_set = set(stop_ids)
        decode_s: list[float] = []
        position_B, last_B = lengths.copy(), np.zeros(self.rows, np.int32)
        first, start = True, call  # the block in hand is the prefill's token
        while True:
            drawn = 0  # the block's steps that drew a token in some row
            rows_in, tokens_in = live[:n].sum(), sum(map(len, new))
            for column in block.T:
                step_ids: list[int | None] = [None] * n
                for i in np.flatnonzero(live[:n] & (column[:n] >= 0)):
                    tok = int(column[i])
                    step_ids[i] = tok
                    new[i].append(tok)
                    last_B[i] = tok
                    position_B[i] += 1
                    live[i] = tok not in stop_set and len(new[i]) < max_new_tokens
                if all(t is None for t in step_ids):
                    break
                drawn += 1
                if on_tokens is not None:
                    on_tokens(step_ids)
            if not first:  # each token a row drew took its share of the round's time
                per_row = (sum(map(len, new)) - tokens_in) / rows_in
                decode_s += [(time.perf_counter() - start) / per_row] * drawn
            first = False
            if not live.any():
                break
            start = time.perf_counter()
            # Each row's draws so far (after a verify pass, rows have kept different numbers
            # of drafts) number its next draw and bound what it may draw; the cache holds each
            # row's sequence but its last token, the next input.
            done = np.zeros(self.rows, np.int32)
            done[:n] = [len(ids) for ids in new]
            rows = rows._replace(count=done)
            limit = np.where(live, np.minimum(steps, max_new_tokens - done), 0).astype(np.int32)
            if drafter is None:
                cache, _, block = self.decode(cache, last_B, position_B - 1, rows, live,
                                              span, steps=steps, limit_B=limit,
                                              stops_BS=stops)  # fmt: skip
                block = np.asarray(block)
                continue
            # A round keeps at most max_new_tokens - done tokens: that less one drafts.
            room = np.where(live, max_new_tokens - done - 1, 0).astype(np.int32)
            drafts = drafted_B = None
            if not drafter.on_device:
                sequences = [list(p) + ids for p, ids in zip(prompts, new, strict=True)]
                sequences += [[]] * (self.rows - n)
                drafts, drafted_B, _ = drafter.draft(sequences, last_B, position_B - 1, rows,
                                                     room)  # fmt: skip
            cache, block, drafted_B, kept_B = verify_round(
                self, drafter, cache, last_B, position_B - 1, rows, live, room, span,
                drafts_BK=drafts, drafted_B=drafted_B,
            )  # fmt: skip
            passes += 1
            drafted += int(drafted_B[:n].sum())
            accepted += int(kept_B[:n].clip(0).sum())
        self._spare = cache
        return Generation(new, prefill_s, decode_s, self.compile_s - compile_before, passes,
                          drafted, accepted)


def stop_table(n: int, stops: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """Each of `n` rows' stop ids as a decode block takes them, (n, STOP_IDS), -1 where a row
    has fewer; a row's ids past the first STOP_IDS are its caller's to check (the block then
    decodes past them, and the caller drops what follows)."""
    table = np.full((n, STOP_IDS), -1, np.int32)
    for b, ids in enumerate(() if stops is None else stops):
        ids = list(ids)[:STOP_IDS]
        table[b, : len(ids)] = ids
    return table


def _unpacked(inputs_BX: jax.Array, layout: tuple) -> dict[str, jax.Array]:
    """The inputs that `Generator._packed` packed, by name, in their dtypes and shapes."""
    out, at = {}, 0
    for name, dtype, shape in layout:
        width = math.prod(shape)
        bits = inputs_BX[:, at : at + width]
        at += width
        value = (jax.lax.bitcast_convert_type(bits, jnp.float32) if dtype == "float32"
                 else bits.astype(dtype))  # fmt: skip
        out[name] = value.reshape(len(bits), *shape)
    return out


def _bucket(n: int) -> int:
    """Prompt widths are padded to a power of two (at least `MIN_PROMPT_WIDTH`): few prefill
    compilations."""
    return max(MIN_PROMPT_WIDTH, 1 << (n - 1).bit_length())
