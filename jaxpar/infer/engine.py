"""KV-cached generation on the mesh: one prefill, then one-token decode steps compiled once.

The cache is [P, C, B, S, K, H] per key and value: stage, layer slot, batch (over `data`), position,
kv head (over `tensor`), head dim. Each pipeline stage keeps only its own layers' cache. The layer
stack runs in one `jax.shard_map`, manual over `pipeline` (and `data` when it has several
replicas), around the tick loop every forward pass runs (`forward_ticks`), on a GPipe table: the
batch is cut into M micro-batches (M = P when the rows allow, else 1), stage s works on
micro-batch t - s at tick t and hands its activation to stage s + 1 with `lax.ppermute`, so with
several micro-batches every stage is busy once the pipeline is full. A decode step is then
M + P - 1 ticks of one token each.

The embedding, the LM head and sampling run outside, with the batch over `data` and the vocabulary
over `tensor`; the last stage's outputs are broadcast from it to the others, (B, T, D). The new
tokens come back replicated, so every process of a multi-process job can read them.

The weights are prepared once, when the generator is built: the blocks' fused projections
(`Block.weights`) and the embedding and head, all in the compute dtype. A decode step reads them
as they are; it neither casts nor concatenates a weight.
"""

from __future__ import annotations

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
from jaxpar.mesh import DATA, PIPELINE
from jaxpar.model.llama import BLOCK_WEIGHT_AXES, BlockWeights, KVCache, Llama
from jaxpar.pipeline.executor import forward_ticks
from jaxpar.pipeline.schedule import Schedule
from jaxpar.placement import Placement, logical_axes
from jaxpar.sharding import ACT_KV_HEADS, BATCH, LAYERS, NORM, SEQ, STAGE

CACHE_AXES = (STAGE, LAYERS, BATCH, SEQ, ACT_KV_HEADS, None)


@dataclass(frozen=True)
class Sampling:
    """Greedy when `temperature` is 0; else softmax(logits / temperature) restricted to the
    `top_k` most likely tokens (0: all) and the smallest set whose probability reaches `top_p`."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0


def sample(logits_BV: jax.Array, key: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """Draws one token per row (traced parameters: one compiled step serves every setting)."""
    vocab = logits_BV.shape[-1]
    greedy_B = jnp.argmax(logits_BV, axis=-1)
    scaled_BV = logits_BV / jnp.maximum(temperature, 1e-6)
    order_BV = jnp.argsort(-scaled_BV, axis=-1)
    sorted_BV = jnp.take_along_axis(scaled_BV, order_BV, axis=-1)
    rank_V = jnp.arange(vocab)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass of the more likely tokens
    keep_BV = (rank_V < jnp.where(top_k > 0, top_k, vocab)) & (before_BV < top_p)
    keep_BV = keep_BV.at[:, 0].set(True)
    choice_B = jax.random.categorical(key, jnp.where(keep_BV, sorted_BV, -jnp.inf), axis=-1)
    sampled_B = jnp.take_along_axis(order_BV, choice_B[:, None], axis=-1)[:, 0]
    return jnp.where(temperature > 0, sampled_B, greedy_B).astype(jnp.int32)


@dataclass(frozen=True)
class Generation:
    """What `Generator.generate` returns: new ids per prompt, and timing."""

    new_ids: list[list[int]]
    prefill_s: float  # time to first token: prefill and the first sample, on the host
    decode_s: list[float]  # each later token's step
    compile_s: float

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second per sequence after the first (the decode rate)."""
        return len(self.decode_s) / sum(self.decode_s) if self.decode_s else 0.0


class Generator:
    """A model on a mesh, ready to prefill and decode a batch of `batch` rows up to `max_len`.

    Args:
        placement: a serving placement (`Placement(config, mesh, serving=True)`).
        params: parameters laid out by `placement.param_shardings`.
        batch: rows per call, before padding to a multiple of `data`.
        max_len: prompt plus new tokens, the cache's length.
    """

    def __init__(self, placement: Placement, params: nnx.State, *, batch: int, max_len: int):
        if not placement.serving:
            raise ValueError("a Generator needs a serving placement (Placement(..., serving=True))")
        spec = placement.spec
        self.placement, self.mesh, self.dtype = placement, placement.mesh, placement.dtype
        self.data, self.stages = spec.data, spec.pipeline
        self.rows = -(-batch // spec.data) * spec.data  # padded to a multiple of `data`
        local = self.rows // spec.data
        self.microbatches = self.stages if local % self.stages == 0 else 1
        self.max_len = max_len
        self.graphdef = placement.graphdef
        self._prefills: dict[int, jax.stages.Compiled] = {}
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

    @cached_property
    def _cache_abstract(self) -> jax.ShapeDtypeStruct:
        """One of the cache's two arrays, as a shape, dtype and sharding."""
        m = self.placement.config.model
        shape = (
            self.stages, self.placement.layout.slots_per_stage, self.rows, self.max_len,
            m.kv_heads, m.head_dim,
        )  # fmt: skip
        return jax.ShapeDtypeStruct(shape, self.dtype, sharding=self.cache_sharding)

    @cached_property
    def _zeros(self) -> Any:
        c = self._cache_abstract
        return jax.jit(lambda: jnp.zeros(c.shape, c.dtype), out_shardings=c.sharding)

    def empty_cache(self) -> KVCache:
        return KVCache(self._zeros(), self._zeros())

    # -- the steps ---------------------------------------------------------------------------

    def _stack(self, model: Llama, weights: BlockWeights, x_BTD, positions_BT, cache: KVCache):
        """The layer stack on (B, T, D) through the pipelined shard_map; returns (x, cache).
        Positions None mean 0..T-1 in every row (a prefill)."""
        p, m = self.stages, self.microbatches
        manual = {PIPELINE} if self.data == 1 else {PIPELINE, DATA}
        batch_axis = DATA if DATA in manual else None
        valid = jnp.asarray(self.placement.layout.valid)
        prefill = positions_BT is None  # then the positions are 0..T-1 in every row
        if prefill:
            positions_BT = jnp.broadcast_to(jnp.arange(x_BTD.shape[1], dtype=jnp.int32),
                                            x_BTD.shape[:2])  # fmt: skip

        def stages(weights_1X, cache_1X: KVCache, x_BTD, positions_BT):
            stage = jax.lax.axis_index(PIPELINE)
            weights_X = jax.tree.map(lambda a: a[0], weights_1X)
            cache_X = KVCache(*(c[0] for c in cache_1X))
            # The inputs are the same on every stage; what each stage carries is its own.
            x_BTD = jax.lax.pcast(x_BTD, (PIPELINE,), to="varying")
            b_all, t, d = x_BTD.shape
            b = b_all // m
            x_MbTD = x_BTD.reshape(m, b, t, d)
            positions_MbT = positions_BT.reshape(m, b, t)

            def layers(h_bTD, positions_bT, cache_X: KVCache):
                def layer(h_bTD, slot):
                    w, real, k, v = slot
                    out_bTD, new = model.blocks.apply(w, h_bTD, positions_bT, KVCache(k, v))
                    return jnp.where(real, out_bTD, h_bTD), (new.k, new.v)

                slots = (weights_X, valid[stage, 0], *cache_X)
                h_bTD, (k, v) = jax.lax.scan(layer, h_bTD, slots)
                return h_bTD, KVCache(k, v)

            def run(repeat, micro, active, h_bTD, cache_X: KVCache):
                rows = [jax.lax.dynamic_slice_in_dim(c, micro * b, b, axis=1) for c in cache_X]
                h_bTD, new = layers(h_bTD, None if prefill else positions_MbT[micro],
                                    KVCache(*rows))  # fmt: skip
                cache_X = KVCache(*(
                    jax.lax.dynamic_update_slice_in_dim(c, jnp.where(active, n, r), micro * b, 1)
                    for c, n, r in zip(cache_X, new, rows, strict=True)
                ))  # fmt: skip
                return h_bTD, cache_X

            out_MbTD, cache_X = forward_ticks(Schedule("gpipe", p, m), run, x_MbTD, cache_X)
            return out_MbTD.reshape(1, b_all, t, d), KVCache(*(c[None] for c in cache_X))

        cache_spec = PartitionSpec(PIPELINE, None, batch_axis)
        x_spec = PartitionSpec(batch_axis)
        y_PBTD, cache = jax.shard_map(
            stages,
            mesh=self.mesh,
            in_specs=(PartitionSpec(PIPELINE), KVCache(cache_spec, cache_spec), x_spec, x_spec),
            out_specs=(PartitionSpec(PIPELINE, batch_axis), KVCache(cache_spec, cache_spec)),
            axis_names=manual,
        )(weights, cache, x_BTD, positions_BT)
        return y_PBTD[p - 1], cache  # only the last stage's outputs are the model's

    def _forward(self, top, weights, cache, tokens_BT, positions_BT):
        model = self._model(top)
        x_BTD = model.embed(tokens_BT, self.dtype)
        x_BTD, cache = self._stack(model, weights, x_BTD, positions_BT, cache)
        return model.logits(x_BTD), cache

    def _prefill(self, top, weights, cache, tokens_BT, lengths_B, key, temperature, top_k, top_p):
        logits_BTV, cache = self._forward(top, weights, cache, tokens_BT, None)
        logits_BV = jnp.take_along_axis(logits_BTV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
        key = jax.random.wrap_key_data(key)
        return cache, logits_BV, sample(logits_BV, key, temperature, top_k, top_p)

    def _decode(self, top, weights, cache, token_B, position_B, key, temperature, top_k, top_p):
        logits_BTV, cache = self._forward(
            top, weights, cache, token_B[:, None], position_B[:, None]
        )
        logits_BV = logits_BTV[:, 0]
        key = jax.random.wrap_key_data(key)
        return cache, logits_BV, sample(logits_BV, key, temperature, top_k, top_p)

    @cached_property
    def _jitted(self) -> tuple[Any, Any]:
        rows = NamedSharding(self.mesh, PartitionSpec(DATA))
        replicated = self.placement.replicated  # the new tokens, readable by every process
        out = (KVCache(self.cache_sharding, self.cache_sharding), rows, replicated)
        kwargs = dict(out_shardings=out, donate_argnums=2)
        return jax.jit(self._prefill, **kwargs), jax.jit(self._decode, **kwargs)

    def _rows(self, x: np.ndarray | jax.Array) -> jax.Array:
        return global_array(x, NamedSharding(self.mesh, PartitionSpec(DATA)))

    def _replicated(self, key: jax.Array, sampling: Sampling) -> tuple[jax.Array, ...]:
        """The step's key (as its raw bits) and sampling settings, replicated."""
        values = (jax.random.key_data(key), *_sampling_args(sampling))
        return tuple(global_array(x, self.placement.replicated) for x in values)

    def _abstract_args(self, tokens_shape: tuple[int, ...]) -> tuple:
        """Abstract (top, weights, cache, tokens, vector, key, sampling...) to compile a step
        for."""
        abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)  # noqa: E731
        rows = NamedSharding(self.mesh, PartitionSpec(DATA))
        c = self._cache_abstract
        return (
            jax.tree.map(abstract, self.top),
            jax.tree.map(abstract, self.weights),
            KVCache(c, c),
            jax.ShapeDtypeStruct(tokens_shape, jnp.int32, sharding=rows),
            jax.ShapeDtypeStruct((self.rows,), jnp.int32, sharding=rows),
            *(abstract(x) for x in self._replicated(jax.random.key(0), Sampling())),
        )

    def _compile(self, jitted: Any, args: tuple) -> jax.stages.Compiled:
        start = time.perf_counter()
        with jax.set_mesh(self.mesh):
            compiled = jitted.lower(*args).compile()
        self.compile_s += time.perf_counter() - start
        return compiled

    def _prefill_step(self, prompt_len: int) -> jax.stages.Compiled:
        """Prefill for prompts padded to `prompt_len`, compiled once per width."""
        if prompt_len not in self._prefills:
            args = self._abstract_args((self.rows, prompt_len))
            self._prefills[prompt_len] = self._compile(self._jitted[0], args)
        return self._prefills[prompt_len]

    @cached_property
    def _decode_step(self) -> jax.stages.Compiled:
        """The one-token decode step, compiled once."""
        top, weights, cache, _, vector, *rest = self._abstract_args((self.rows,))
        return self._compile(self._jitted[1], (top, weights, cache, vector, vector, *rest))

    def decode_compiled(self) -> jax.stages.Compiled:
        """The compiled decode step (for FLOP, byte and collective accounting)."""
        return self._decode_step

    def prefill(self, cache, tokens_BT, lengths_B, key, sampling: Sampling = Sampling()):
        """Runs the prompts (right-padded, (B, T) with T <= max_len): returns the cache, the
        logits at each row's last prompt token and the first new token."""
        prefill = self._prefill_step(tokens_BT.shape[1])
        args = self._replicated(key, sampling)
        return prefill(
            self.top, self.weights, cache, self._rows(tokens_BT), self._rows(lengths_B), *args
        )

    def decode(self, cache, token_B, position_B, key, sampling: Sampling = Sampling()):
        """One token per row at its own position: returns the cache, the logits and the next
        token. Compiled once: every step has the same shapes."""
        args = self._replicated(key, sampling)
        return self._decode_step(
            self.top, self.weights, cache, self._rows(token_B), self._rows(position_B), *args
        )

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: Sampling = Sampling(),
        *,
        seed: int = 0,
        stop_ids: Sequence[int] = (),
        on_tokens: Callable[[list[int | None]], None] | None = None,
    ) -> Generation:
        """Generates up to `max_new_tokens` after each prompt (a row stops after a stop id).

        `on_tokens(ids)` receives each step's new token per prompt as soon as it is on the host
        (for streaming); None for a prompt that has already stopped.
        """
        n = len(prompts)
        if not 0 < n <= self.rows:
            raise JaxparError(f"{n} prompts for a generator built for {self.rows} rows")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.max_len:
            raise JaxparError(
                f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the "
                f"context of {self.max_len}"
            )
        width = min(self.max_len, _bucket(longest))
        tokens = np.zeros((self.rows, width), np.int32)
        lengths = np.ones((self.rows,), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
            lengths[i] = len(p)
        compile_before = self.compile_s
        self._prefill_step(width)  # compiled before the clock starts
        _ = self._decode_step
        keys = jax.random.split(jax.random.key(seed), max_new_tokens)
        start = time.perf_counter()
        cache, _, token_B = self.prefill(self.empty_cache(), tokens, lengths, keys[0], sampling)
        new = [[] for _ in range(n)]
        done = np.zeros(n, bool)
        stops = set(stop_ids)
        decode_s, prefill_s = [], 0.0
        position_B = lengths.copy()
        for step in range(max_new_tokens):
            host = np.asarray(token_B)[:n]
            if step == 0:
                prefill_s = time.perf_counter() - start
            else:
                decode_s.append(time.perf_counter() - start)
            step_ids: list[int | None] = []
            for i, tok in enumerate(host.tolist()):
                step_ids.append(None if done[i] else tok)
                if not done[i]:
                    new[i].append(tok)
                    done[i] = tok in stops
            if on_tokens is not None:
                on_tokens(step_ids)
            if done.all() or step == max_new_tokens - 1:
                break
            start = time.perf_counter()
            cache, _, token_B = self.decode(cache, token_B, position_B, keys[step + 1], sampling)
            position_B = position_B + 1
        return Generation(new, prefill_s, decode_s, self.compile_s - compile_before)


def _sampling_args(s: Sampling) -> tuple[np.ndarray, ...]:
    return np.float32(s.temperature), np.int32(s.top_k), np.float32(s.top_p)


def _bucket(n: int) -> int:
    """Prompt widths are padded to a power of two (at least 16): few prefill compilations."""
    return max(16, 1 << (n - 1).bit_length())
