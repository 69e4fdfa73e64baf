"""What a chatbot waits for: warm time to first token and time per output token of KV-cached
generation, one token a dispatch against a block of 8 on the device, and with speculative
decoding (n-gram prompt lookup, and a draft model), per layout, dtype and batch size, next to
the memory-bandwidth limit (the bytes a decode step reads over the chip's bandwidth, from its
hardware profile).

Usage:
    python experiments/decode_latency.py          # CPU: one device and pipeline=4, simulated
    python experiments/decode_latency.py --gpu    # one GPU: the 1.1B (TinyLlama's shape)

CPU: a 4-layer d=64 model (byte tokens) and a 4-layer d=24 draft model, both trained for a few
hundred steps on a file of repeated Python, so that the model repeats what its prompt holds (as a
chatbot quoting its context does) and prompt lookup has something to find. Each layout runs in
its own process (the simulated device count is fixed when JAX starts). Per layout, dtype, batch
(1, 8, 32) and way: a 64-token prompt from the file, then 128 greedy tokens, once to compile and
warm up, then `TRIES` times timed. Reported: the median time to first token (from the call, as
`Generation.prefill_s`), the median and p99 time per output token (each block's time over its
tokens), tokens per target pass and the drafts kept. GPU: random weights in bfloat16 (the
timings do not depend on them, the drafts kept do: prompt lookup finds little in random text),
a 512-token prompt. Writes results/decode_latency{,_gpu}.json, .md and .png. Wall-clock on a
shared 2-core host: compare the rows with each other, not with GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import RESULTS, write_results

LAYOUTS = ["data=1", "pipeline=4"]
BATCHES = [1, 8, 32]
# (64 steps: the host's share of a step, one block's host work spread over 64 tokens)
WAYS = ["1 step", "8 steps", "64 steps", "ngram:4", "draft:4"]
TARGET = ["model.layers=4", "model.dim=64", "model.heads=4", "model.kv_heads=4",
          "model.mlp_dim=192", "model.vocab=256"]  # fmt: skip
# (as many layers as the target: a draft model lives on the target's mesh, a layer a stage at
# least; narrower, a fifth of its parameters)
DRAFT = ["model.layers=4", "model.dim=24", "model.heads=2", "model.kv_heads=2",
         "model.mlp_dim=64", "model.vocab=256"]  # fmt: skip
# TinyLlama 1.1B's shape (the GPU run)
LLAMA_1B = ["model.layers=22", "model.dim=2048", "model.heads=32", "model.kv_heads=4",
            "model.mlp_dim=5632", "model.vocab=32000"]  # fmt: skip
CORPUS = (
    "def add(a, b):\n    return a + b\n\n"
    "def scale(xs, k):\n    return [k * x for x in xs]\n\n"
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n\n"
)
CONTEXT, NEW, TRIES = 256, 128, 3


def train(folder: Path) -> tuple[Path, Path]:
    """The target and draft runs, trained on `CORPUS` repeated."""
    corpus = folder / "corpus.txt"
    corpus.write_text(CORPUS * 200)
    runs = []
    for name, sizes, steps in (("target", TARGET, 300), ("draft", DRAFT, 300)):
        run = folder / name
        argv = [sys.executable, "-m", "jaxpar", "train", "--out", str(run), "--mesh", "data=1",
                *sizes, f"train.seq_len={CONTEXT}", "train.batch_size=8", f"train.steps={steps}",
                "train.sample_tokens=0", "train.lr=3e-3", f"data.path={corpus}"]  # fmt: skip
        print(f"training the {name} model ({steps} steps) ...", flush=True)
        subprocess.run(argv, check=True, capture_output=True, timeout=1800)
        runs.append(run)
    return runs[0], runs[1]


def measure(gen, prompts: list[list[int]], way: str, drafter) -> dict:
    """One way of decoding `prompts`: warmed up once, then `TRIES` timed runs."""
    from jaxpar.infer.sampling import GREEDY

    steps = int(way.split()[0]) if way.endswith("steps") else 1
    gen.generate(prompts, NEW, GREEDY, steps=steps, drafter=drafter)
    runs = [gen.generate(prompts, NEW, GREEDY, steps=steps, drafter=drafter)
            for _ in range(TRIES)]  # fmt: skip
    token_s = [s for r in runs for s in r.decode_s]
    tokens = sum(len(ids) for ids in runs[-1].new_ids)
    return {
        "way": way,
        "ttft_ms": 1e3 * statistics.median(r.prefill_s for r in runs),
        "token_ms": 1e3 * statistics.median(token_s),
        "token_p99_ms": 1e3 * float(np.percentile(token_s, 99)),
        "tokens_per_s": len(prompts) / statistics.mean(token_s),
        "tokens_per_pass": tokens / len(prompts) / runs[-1].passes if runs[-1].passes else None,
        "kept": runs[-1].accepted / runs[-1].drafted if runs[-1].drafted else None,
    }


def worker(layout: str, target: str, draft: str, gpu: bool) -> None:
    """Measures one layout; prints one JSON row per dtype, batch and way."""
    from jaxpar.mesh import parse_mesh, prepare

    spec = prepare(parse_mesh(layout), tune_runtime=True)
    import jax

    from jaxpar.config import load_config
    from jaxpar.infer.load import load_run
    from jaxpar.infer.loaded import LoadedModel
    from jaxpar.infer.speculate import ModelDrafter, NgramDrafter
    from jaxpar.mesh import make_mesh
    from jaxpar.placement import Placement
    from jaxpar.plan.hardware import detect_hardware
    from jaxpar.train.step import Trainer

    mesh = make_mesh(spec)
    profile = detect_hardware()
    rng = np.random.default_rng(0)
    for dtype in ["bfloat16"] if gpu else ["float32", "bfloat16"]:
        if gpu:
            config = load_config(None, [*LLAMA_1B, "train.seq_len=1024", f"train.dtype={dtype}"])
            params = Trainer(Placement(config, mesh)).init_state(0).params
            placement = Placement(config, mesh, serving=True)
            model, drafter_model = LoadedModel(placement, params, 1024, None, (), "1.1B"), None
            prompt_len, ways = 512, WAYS[:4]
        else:
            model, drafter_model = (load_run(Path(r), mesh, dtype) for r in (target, draft))
            prompt_len, ways = 64, WAYS
        m = model.config.model
        weight_bytes = m.num_params * np.dtype(dtype).itemsize
        for batch in BATCHES:
            gen = model.generator(batch, prompt_len + NEW)
            if gpu:
                prompts = rng.integers(0, m.vocab, (batch, prompt_len)).tolist()
            else:  # a window of the corpus at another offset in each row
                text = list((CORPUS * 8).encode())
                prompts = [text[7 * b : 7 * b + prompt_len] for b in range(batch)]
            cache_bytes = gen._position_bytes * (prompt_len + NEW // 2) * batch  # read a step
            for way in ways:
                drafter = None
                if way.startswith("ngram"):
                    drafter = NgramDrafter(4)
                elif way.startswith("draft"):
                    drafter = ModelDrafter(drafter_model, 4, gen.rows, gen.max_len)
                row = measure(gen, prompts, way, drafter)
                bandwidth = profile.memory_gbytes_per_s
                row |= {
                    "layout": str(spec), "devices": spec.size, "dtype": dtype, "batch": batch,
                    "params": m.num_params, "platform": jax.devices()[0].platform,
                    "device": jax.devices()[0].device_kind,
                    "limit_ms": 1e3 * (weight_bytes + cache_bytes) / (bandwidth * 1e9)
                    if bandwidth else None,
                }  # fmt: skip
                print(json.dumps(row), flush=True)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["layout"], r["dtype"]) for r in rows})
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 7), squeeze=False)
    for col, (layout, dtype) in enumerate(panels):
        mine = [r for r in rows if (r["layout"], r["dtype"]) == (layout, dtype)]
        ways = list(dict.fromkeys(r["way"] for r in mine))
        for way in ways:
            line = sorted((r for r in mine if r["way"] == way), key=lambda r: r["batch"])
            batches = [r["batch"] for r in line]
            axes[0][col].plot(batches, [r["token_ms"] for r in line], "o-", label=way)
            axes[1][col].plot(batches, [r["ttft_ms"] for r in line], "o-", label=way)
        limit = sorted((r for r in mine if r["limit_ms"]), key=lambda r: r["batch"])
        if limit:
            axes[0][col].plot([r["batch"] for r in limit], [r["limit_ms"] for r in limit], "k--",
                              label="memory-bandwidth limit")  # fmt: skip
        name = "1 device" if layout == "data=1" else layout
        axes[0][col].set_title(f"time per output token (ms)\n{name}, {dtype}")
        axes[1][col].set_title(f"time to first token (ms)\n{name}, {dtype}")
        for ax in axes[:, col]:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch (sequences)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    first = rows[0]
    fig.suptitle(f"KV-cached greedy decoding, {first['params'] / 1e6:,.1f}M params, "
                 f"{first['device']}")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="the 1.1B on one GPU")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], args.worker[2], gpu=False)
        return 0
    rows = []
    if args.gpu:
        import io
        from contextlib import redirect_stdout

        out = io.StringIO()
        with redirect_stdout(out):
            worker("data=1", "", "", gpu=True)
        rows = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
    else:
        folder = Path(tempfile.mkdtemp(prefix="decode-latency-"))
        target, draft = train(folder)
        for layout in LAYOUTS:
            print(f"measuring {layout} ...", flush=True)
            env = {**os.environ, "JAX_PLATFORMS": "cpu"}
            done = subprocess.run(
                [sys.executable, __file__, "--worker", layout, str(target), str(draft)],
                env=env, capture_output=True, text=True, check=False,
            )  # fmt: skip
            if done.returncode:
                print(done.stdout, done.stderr, file=sys.stderr)
                return 1
            for line in done.stdout.splitlines():
                if line.startswith("{"):
                    rows.append(json.loads(line))
                    print(line, flush=True)
    name = "decode_latency_gpu" if args.gpu else "decode_latency"
    header = ["layout", "dtype", "batch", "way", "time to first token ms", "per token ms (median)",
              "per token ms (p99)", "tokens/s", "tokens per target pass", "drafts kept",
              "memory-bandwidth limit ms"]  # fmt: skip
    write_results(name, rows, header, lambda r: [
        "1 device" if r["devices"] == 1 else r["layout"], r["dtype"], r["batch"], r["way"],
        f"{r['ttft_ms']:.2f}", f"{r['token_ms']:.3f}", f"{r['token_p99_ms']:.3f}",
        f"{r['tokens_per_s']:,.0f}",
        "" if r["tokens_per_pass"] is None else f"{r['tokens_per_pass']:.2f}",
        "" if r["kept"] is None else f"{100 * r['kept']:.0f}%",
        "" if r["limit_ms"] is None else f"{r['limit_ms']:.4f}",
    ])  # fmt: skip
    plot(rows, RESULTS / f"{name}.png")
    return 0


if __name__ == "__main__":
    if "--gpu" not in sys.argv:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
