"""KV-cached generation on the mesh: one prefill, then one-token decode steps compiled once.

The cache is [P, C, B, S, K, H] per key and value: stage, layer slot, batch (over `data`), position,
kv head (over `tensor`), head dim. Each pipeline stage keeps only its own layers' cache. The layer
stack runs in one `jax.shard_map`, manual over `pipeline` (and `data` when it has several
replicas), around a `lax.scan` over ticks, as in training's GPipe schedule: the batch is cut into
M micro-batches (M = P when the rows allow, else 1), stage s works on micro-batch t - s at tick t
and hands its activation to stage s + 1 with `lax.ppermute`, so with several micro-batches every
stage is busy once the pipeline is full. A decode step is then M + P - 1 ticks of one token each.

The embedding, the LM head and sampling run outside, with the batch over `data` and the vocabulary
over `tensor`; the last stage's outputs are broadcast from it to the others, (B, T, D).
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

from jaxpar.config import Config
from jaxpar.errors import JaxparError
from jaxpar.mesh import mesh_spec_of
from jaxpar.model.llama import KVCache, Llama
from jaxpar.pipeline.layout import StageLayout
from jaxpar.sharding import ACT_KV_HEADS, BATCH, LAYERS, OUTER_BATCH, SEQ, STAGE, Rules, rules_for

PIPE = "pipeline"
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


def serving_rules(rules: Rules) -> Rules:
    """The training preset with the embedding's and head's batch over `data` only: a serving
    batch is small and need not divide over `data` x `pipeline`."""
    mapping = tuple((k, "data" if k == OUTER_BATCH else v) for k, v in rules.mapping)
    return Rules(rules.name, mapping)


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
        config: the model's config; `parallel` and `pipeline` settings of training do not apply
            (serving uses the plain rules preset for the mesh and one layer chunk per stage).
        mesh: the device mesh.
        params: parameters laid out by the `param_shardings` of a `Trainer` for
            `serving_config(config)` on `mesh` (as `jaxpar.infer.serve` loads them).
        batch: rows per call, before padding to a multiple of `data`.
        max_len: prompt plus new tokens, the cache's length.
    """

    def __init__(
        self,
        config: Config,
        mesh: jax.sharding.Mesh,
        params: nnx.State,
        *,
        batch: int,
        max_len: int,
        dtype: jnp.dtype = jnp.float32,
    ):
        spec = mesh_spec_of(mesh)
        self.config, self.mesh, self.params, self.dtype = config, mesh, params, jnp.dtype(dtype)
        self.data, self.stages = spec.data, spec.pipeline
        self.rules = serving_rules(rules_for(spec.data, spec.pipeline, spec.tensor, fsdp=False))
        self.layout = StageLayout(config.model.layers, spec.pipeline)
        self.rows = -(-batch // spec.data) * spec.data  # padded to a multiple of `data`
        local = self.rows // spec.data
        self.microbatches = self.stages if local % self.stages == 0 else 1
        self.max_len = max_len
        m = config.model
        model = nnx.eval_shape(
            lambda: Llama(m, self.rules, rngs=nnx.Rngs(params=0), layout=self.layout)
        )
        self.graphdef, _ = nnx.split(model)
        self._prefills: dict[int, jax.stages.Compiled] = {}
        self.compile_s = 0.0  # spent compiling so far

    @cached_property
    def cache_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, self.rules.spec(CACHE_AXES))

    @cached_property
    def _cache_abstract(self) -> jax.ShapeDtypeStruct:
        """One of the cache's two arrays, as a shape, dtype and sharding."""
        m = self.config.model
        shape = (
            self.stages, self.layout.slots_per_stage, self.rows, self.max_len, m.kv_heads,
            m.head_dim,
        )  # fmt: skip
        return jax.ShapeDtypeStruct(shape, self.dtype, sharding=self.cache_sharding)

    @cached_property
    def _zeros(self) -> Any:
        c = self._cache_abstract
        return jax.jit(lambda: jnp.zeros(c.shape, c.dtype), out_shardings=c.sharding)

    def empty_cache(self) -> KVCache:
        return KVCache(self._zeros(), self._zeros())

    def _stack(self, model: Llama, x_BTD, positions_BT, cache: KVCache):
        """The layer stack on (B, T, D) through the pipelined shard_map; returns (x, cache)."""
        p, m = self.stages, self.microbatches
        blocks_graphdef, blocks_state = nnx.split(model.blocks)
        manual = {PIPE} if self.data == 1 else {PIPE, "data"}
        batch_axis = "data" if "data" in manual else None
        valid = jnp.asarray(self.layout.valid)

        def stages(state_1X, cache_1X: KVCache, x_BTD, positions_BT):
            stage = jax.lax.axis_index(PIPE)
            state_X = jax.tree.map(lambda a: a[0], state_1X)
            cache_X = KVCache(*(c[0] for c in cache_1X))
            # The inputs are the same on every stage; what each stage carries is its own.
            x_BTD = jax.lax.pcast(x_BTD, (PIPE,), to="varying")
            b_all, t, d = x_BTD.shape
            b = b_all // m
            x_MbTD = x_BTD.reshape(m, b, t, d)
            positions_MbT = positions_BT.reshape(m, b, t)

            def layers(h_bTD, positions_bT, cache_X: KVCache):
                def layer(h_bTD, slot):
                    layer_state, real, k, v = slot
                    block = nnx.merge(blocks_graphdef, layer_state)
                    out_bTD, new = block.cached(h_bTD, positions_bT, KVCache(k, v))
                    return jnp.where(real, out_bTD, h_bTD), (new.k, new.v)

                h_bTD, (k, v) = jax.lax.scan(layer, h_bTD, (state_X, valid[stage, 0], *cache_X))
                return h_bTD, KVCache(k, v)

            def tick(carry, now):
                recv_bTD, cache_X, out_MbTD = carry
                job = now - stage
                active = (job >= 0) & (job < m)
                micro = jnp.clip(job, 0, m - 1)
                h_bTD = jnp.where(stage == 0, x_MbTD[micro], recv_bTD)
                rows = [jax.lax.dynamic_slice_in_dim(c, micro * b, b, axis=1) for c in cache_X]
                h_bTD, new = layers(h_bTD, positions_MbT[micro], KVCache(*rows))
                cache_X = KVCache(*(
                    jax.lax.dynamic_update_slice_in_dim(c, jnp.where(active, n, r), micro * b, 1)
                    for c, n, r in zip(cache_X, new, rows, strict=True)
                ))  # fmt: skip
                last = active & (stage == p - 1)
                out_MbTD = out_MbTD.at[micro].set(jnp.where(last, h_bTD, out_MbTD[micro]))
                if p > 1:
                    h_bTD = jax.lax.ppermute(h_bTD, PIPE, [(i, (i + 1) % p) for i in range(p)])
                return (h_bTD, cache_X, out_MbTD), None

            carry = (jnp.zeros_like(x_MbTD[0]), cache_X, jnp.zeros_like(x_MbTD))
            (_, cache_X, out_MbTD), _ = jax.lax.scan(tick, carry, jnp.arange(m + p - 1))
            return out_MbTD.reshape(1, b_all, t, d), KVCache(*(c[None] for c in cache_X))

        cache_spec = PartitionSpec(PIPE, None, batch_axis)
        x_spec = PartitionSpec(batch_axis)
        y_PBTD, cache = jax.shard_map(
            stages,
            mesh=self.mesh,
            in_specs=(PartitionSpec(PIPE), KVCache(cache_spec, cache_spec), x_spec, x_spec),
            out_specs=(PartitionSpec(PIPE, batch_axis), KVCache(cache_spec, cache_spec)),
            axis_names=manual,
        )(blocks_state, cache, x_BTD, positions_BT)
        return y_PBTD[p - 1], cache  # only the last stage's outputs are the model's

    def _forward(self, params, cache, tokens_BT, positions_BT):
        model = nnx.merge(self.graphdef, params)
        x_BTD = model.embed(tokens_BT, self.dtype)
        x_BTD, cache = self._stack(model, x_BTD, positions_BT, cache)
        return model.logits(x_BTD), cache

    def _prefill(self, params, cache, tokens_BT, lengths_B, key, temperature, top_k, top_p):
        t = tokens_BT.shape[1]
        positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), tokens_BT.shape)
        logits_BTV, cache = self._forward(params, cache, tokens_BT, positions_BT)
        logits_BV = jnp.take_along_axis(logits_BTV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
        return cache, logits_BV, sample(logits_BV, key, temperature, top_k, top_p)

    def _decode(self, params, cache, token_B, position_B, key, temperature, top_k, top_p):
        logits_BTV, cache = self._forward(params, cache, token_B[:, None], position_B[:, None])
        logits_BV = logits_BTV[:, 0]
        return cache, logits_BV, sample(logits_BV, key, temperature, top_k, top_p)

    @cached_property
    def _jitted(self) -> tuple[Any, Any]:
        rows = NamedSharding(self.mesh, PartitionSpec("data"))
        out = (KVCache(self.cache_sharding, self.cache_sharding), rows, rows)
        kwargs = dict(out_shardings=out, donate_argnums=1)
        return jax.jit(self._prefill, **kwargs), jax.jit(self._decode, **kwargs)

    def _rows(self, x: np.ndarray | jax.Array) -> jax.Array:
        return jax.device_put(x, NamedSharding(self.mesh, PartitionSpec("data")))

    def _replicated(self, *xs: Any) -> tuple[jax.Array, ...]:
        return jax.device_put(xs, NamedSharding(self.mesh, PartitionSpec()))

    def _abstract_args(self, tokens_shape: tuple[int, ...]) -> tuple:
        """Abstract (params, cache, tokens, vector, key, sampling...) to compile a step for."""
        abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)  # noqa: E731
        rows = NamedSharding(self.mesh, PartitionSpec("data"))
        c = self._cache_abstract
        return (
            jax.tree.map(abstract, self.params),
            KVCache(c, c),
            jax.ShapeDtypeStruct(tokens_shape, jnp.int32, sharding=rows),
            jax.ShapeDtypeStruct((self.rows,), jnp.int32, sharding=rows),
            *(abstract(x) for x in self._replicated(jax.random.key(0), *_sampling_args())),
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
        params, cache, _, vector, *rest = self._abstract_args((self.rows,))
        return self._compile(self._jitted[1], (params, cache, vector, vector, *rest))

    def decode_hlo(self) -> str:
        """The compiled decode step's optimized HLO (for FLOP and collective accounting)."""
        return self._decode_step.as_text()

    def prefill(self, cache, tokens_BT, lengths_B, key, sampling: Sampling = Sampling()):
        """Runs the prompts (right-padded, (B, T) with T <= max_len): returns the cache, the
        logits at each row's last prompt token and the first new token."""
        prefill = self._prefill_step(tokens_BT.shape[1])
        args = self._replicated(key, *_sampling_args(sampling))
        return prefill(self.params, cache, self._rows(tokens_BT), self._rows(lengths_B), *args)

    def decode(self, cache, token_B, position_B, key, sampling: Sampling = Sampling()):
        """One token per row at its own position: returns the cache, the logits and the next
        token. Compiled once: every step has the same shapes."""
        args = self._replicated(key, *_sampling_args(sampling))
        return self._decode_step(
            self.params, cache, self._rows(token_B), self._rows(position_B), *args
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
        position_B = self._rows(lengths)
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


def _sampling_args(s: Sampling = Sampling()) -> tuple[jax.Array, jax.Array, jax.Array]:
    return jnp.float32(s.temperature), jnp.int32(s.top_k), jnp.float32(s.top_p)


def _bucket(n: int) -> int:
    """Prompt widths are padded to a power of two (at least 16): few prefill compilations."""
    return max(16, 1 << (n - 1).bit_length())


def serving_config(config: Config) -> Config:
    """The config with the training-only layout settings reset: plain rules, one chunk per stage."""
    return config.replace(**{
        "parallel.fsdp": False, "pipeline.schedule": "gpipe", "pipeline.repeats": 1,
        "pipeline.microbatches": 1, "pipeline.remat": "none",
    })  # fmt: skip
