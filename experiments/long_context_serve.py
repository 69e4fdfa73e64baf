"""Serving long prompts on the `context` axis: the per-device memory of a prompt's prefill as the
prompt grows, the longest prompt that runs here, and its time to first token.

Usage: python experiments/long_context_serve.py [--memory-only] [--longest N]

One small Llama (4 layers, d 256, 8/8 heads, MLP 768, vocab 256, float32, `model.attention_block
=512`), randomly initialised, served one prompt at a time (`Generator`, batch 1) on 8 simulated
CPU devices with `context=8` (the cache striped over them, the prompt's prefill a ring of its
queries) against one device:

1. Memory (compile only): the compiled prefill step's per-device peak (arguments + outputs +
   temporaries - aliased) and each device's share of the cache, for prompts of 4K to 128K tokens.
2. Time to first token (this host: 2 cores under 8 simulated devices, so ratios, not speeds):
   `generate` of 8 greedy tokens after a prompt of N - 8 tokens, N = 4K on both layouts, then on
   `context=8` alone for N = 16K and on up to `--longest` (default 32K).

Writes results/long_context_serve.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import time

from common import write_results

from jaxpar.mesh import parse_mesh, prepare

MODEL = [
    "model.layers=4", "model.dim=256", "model.heads=8", "model.kv_heads=8", "model.mlp_dim=768",
    "model.vocab=256", "train.dtype=float32", "model.attention_block=512",
]  # fmt: skip
MEMORY_LENGTHS = [4096, 16384, 65536, 131072]
NEW_TOKENS = 8


def generator(context: int, length: int):
    """The model on `context` devices (one: no context axis), ready for prompts of `length`."""
    import jax
    from flax import nnx

    from jaxpar.config import load_config
    from jaxpar.infer.engine import Generator
    from jaxpar.mesh import make_mesh
    from jaxpar.placement import Placement, serving_config

    config = serving_config(load_config(None, [*MODEL, f"train.seq_len={length}"]))
    spec = parse_mesh(f"context={context}")
    mesh = make_mesh(spec, jax.devices()[: spec.size])
    placement = Placement(config, mesh, serving=True)
    with jax.set_mesh(mesh):
        init = jax.jit(lambda: nnx.split(placement.new_model(0))[1],
                       out_shardings=placement.param_shardings)  # fmt: skip
        params = init()
    return Generator(placement, params, batch=1, max_len=length)


def prefill_memory(context: int, length: int) -> dict:
    import jax
    import numpy as np

    from jaxpar.model.llama import KVCache

    g = generator(context, length)
    shape = jax.ShapeDtypeStruct(g._cache_shape, g.dtype, sharding=g.cache_sharding)
    tokens = np.zeros((g.rows, length), np.int32)
    lengths = np.full(g.rows, length - NEW_TOKENS, np.int32)
    args = (g.top, g.weights, KVCache(shape, shape), g._rows(tokens), g._rows(lengths),
            g._sampling(None, g.rows))  # fmt: skip
    start = time.perf_counter()
    m = g._step("_prefill", args).memory_analysis()
    peak = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes)  # fmt: skip
    return {
        "what": "memory", "context": context, "prompt_tokens": length - NEW_TOKENS,
        "cache_tokens_per_device": g.device_tokens, "peak_bytes": int(peak),
        "temp_bytes": int(m.temp_size_in_bytes), "compile_s": round(time.perf_counter() - start, 1),
    }  # fmt: skip


def first_token(context: int, length: int) -> dict:
    import numpy as np

    from jaxpar.infer.sampling import GREEDY

    g = generator(context, length)
    prompt = np.random.default_rng(0).integers(0, 256, length - NEW_TOKENS).tolist()
    out = g.generate([prompt], NEW_TOKENS, GREEDY)
    return {
        "what": "first_token", "context": context, "prompt_tokens": len(prompt),
        "cache_tokens_per_device": g.device_tokens, "time_to_first_token_s":
        round(out.prefill_s, 2), "decode_tokens_per_s": round(out.tokens_per_s, 1),
        "compile_s": round(out.compile_s, 1), "new_ids": out.new_ids[0],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--memory-only", action="store_true")
    parser.add_argument("--longest", type=int, default=32768)
    args = parser.parse_args()
    prepare(parse_mesh("context=8"), tune_runtime=True)  # 8 simulated CPU devices
    rows, start = [], time.perf_counter()
    for length in MEMORY_LENGTHS:
        for context in (1, 8):
            rows.append(prefill_memory(context, length))
            r = rows[-1]
            print(f"[{time.perf_counter() - start:.0f}s] prefill of {r['prompt_tokens']:,} tokens"
                  f" on context={context}: peak {r['peak_bytes'] / 2**20:,.1f} MiB per device",
                  file=sys.stderr, flush=True)  # fmt: skip
    if not args.memory_only:
        # One device's prefill of 16K tokens needs about 21 GiB (its cached attention is not
        # blocked), more than this host has: it is timed at 4K only.
        timed = [(1, 4096), (8, 4096), (8, 16384)]
        n = 32768
        while n <= args.longest:
            timed.append((8, n))
            n *= 2
        for context, length in timed:
            rows.append(first_token(context, length))
            r = rows[-1]
            print(f"[{time.perf_counter() - start:.0f}s] {r['prompt_tokens']:,} tokens on "
                  f"context={context}: first token after {r['time_to_first_token_s']} s",
                  file=sys.stderr, flush=True)  # fmt: skip
    write_results(
        "long_context_serve",
        rows,
        ["measure", "context", "prompt tokens", "cache tokens / device", "peak MiB / device",
         "time to first token (s)"],
        lambda r: [r["what"], r["context"], f"{r['prompt_tokens']:,}",
                   f"{r['cache_tokens_per_device']:,}",
                   f"{r['peak_bytes'] / 2**20:,.1f}" if "peak_bytes" in r else "",
                   r.get("time_to_first_token_s", "")],
    )  # fmt: skip


if __name__ == "__main__":
    main()
