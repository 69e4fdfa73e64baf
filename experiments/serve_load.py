"""Serving under load: continuous batching (`jaxpar serve`) against the static-batch `generate`
path and against one request at a time, on one device and on data=2,pipeline=2,tensor=2.

Usage: cd experiments && python serve_load.py [--requests N] [--quick]

The model is issue 14's small Llama (4 layers, dim 128, 8 heads, 8 kv heads, MLP 352, byte
vocabulary), trained for one step (what it says does not matter: every request ignores EOS and
decodes exactly its `max_tokens`), with a context of 1024. The workload is N requests whose prompt
lengths (16-256 tokens) and output lengths (16-128 tokens) are drawn from a fixed seed, all greedy.
For each mesh:

- continuous: a live `jaxpar serve` (64 slots, 64-token prompt pieces) driven over HTTP by
  streaming clients at concurrency 1, 4, 16 and 64 (each client sends its next request when the
  last one ends), and with Poisson arrivals at `--rate` requests/s;
- one at a time: the same server and clients, with the requests served one after another (a FIFO
  queue in front of the server: a request's time to first token includes its wait);
- static: `Generator.generate` in-process, the requests in arrival order in batches of the
  concurrency, each batch prefilled together and decoded until its longest request ends (no HTTP,
  which only flatters it); a request's tokens count until its own `max_tokens`.

Reported, as vLLM's serving benchmark reports them: request throughput, output tokens/s, and the
mean, median and p99 of time to first token (TTFT), time per output token after the first
(TPOT) and inter-token latency (ITL, between streamed chunks). Then a multi-turn chat script
(8 conversations x 4 turns over a shared system prompt) gives the prefix cache's hit rate, and the
server's metrics give the cache's memory per slot. Writes results/serve_load.json, .md and .png.
Wall-clock on a shared 2-core host: compare the modes with each other, not with GPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, write_results

MODEL = [
    "model.layers=4", "model.dim=128", "model.heads=8", "model.kv_heads=8",
    "model.mlp_dim=352", "model.vocab=256",
]  # fmt: skip
CONTEXT = 1024
SLOTS, CHUNK = 64, 64
MESHES = ["data=1", "data=2,pipeline=2,tensor=2"]
CONCURRENCY = [1, 4, 16, 64]
WAIT_S = 600  # the bound on any single wait
START = time.perf_counter()


def progress(message: str) -> None:
    print(f"[{time.perf_counter() - START:6.0f} s] {message}", file=sys.stderr, flush=True)


def workload(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """n (prompt, max_tokens) pairs: prompts of 16-256 lowercase letters and spaces (one byte
    token each), outputs of 16-128 tokens."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz     "
    return [
        ("".join(rng.choice(letters) for _ in range(rng.randint(16, 256))), rng.randint(16, 128))
        for _ in range(n)
    ]


def make_run(folder: Path) -> Path:
    run = folder / "model"
    corpus = folder / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 400)
    argv = [sys.executable, "-m", "jaxpar", "train", "--out", str(run), "--mesh", "data=1",
            *MODEL, f"train.seq_len={CONTEXT}", "train.batch_size=2", "train.steps=1",
            "train.sample_tokens=0", "train.warmup_steps=0", f"data.path={corpus}"]  # fmt: skip
    subprocess.run(argv, check=True, capture_output=True, timeout=WAIT_S)
    return run


# -- the server and its clients --------------------------------------------------------------


class Server:
    """`jaxpar serve` in a subprocess on a free port of 127.0.0.1."""

    def __init__(self, run: Path, mesh: str):
        argv = [sys.executable, "-m", "jaxpar", "serve", "--run", str(run), "--mesh", mesh,
                "--port", "0", "--model-name", "m", f"serve.max_seqs={SLOTS}",
                f"serve.prefill_chunk={CHUNK}", "serve.max_queue=1024"]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + WAIT_S
        self.url = None
        while self.url is None:
            line = self.proc.stderr.readline()
            if not line or time.monotonic() > deadline:
                raise RuntimeError("jaxpar serve did not start")
            found = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
            self.url = found and found.group(1)

    def metrics(self) -> dict[str, float]:
        import httpx

        text = httpx.get(self.url + "/metrics", timeout=WAIT_S).text
        return {m[0]: float(m[1]) for m in re.findall(r"^(jaxpar_[a-z_]+) ([0-9.e+-]+)$", text,
                                                      re.M)}  # fmt: skip

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(WAIT_S)


async def one_request(client, url: str, prompt: str, max_tokens: int) -> dict:
    """Streams one greedy completion; the times of its chunks, from when it was sent."""
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    sent = time.perf_counter()
    chunks, tokens = [], 0
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            doc = json.loads(line[6:])
            if doc.get("usage"):
                tokens = doc["usage"]["completion_tokens"]
            elif doc["choices"] and doc["choices"][0]["text"]:
                chunks.append(time.perf_counter())
    return {"sent": sent, "chunks": chunks, "tokens": tokens, "prompt": len(prompt)}


async def drive(url: str, work, concurrency: int | None, rate: float | None,
                one_at_a_time: bool = False) -> tuple[list[dict], float]:  # fmt: skip
    """Runs the workload against the server: `concurrency` clients in a closed loop, or Poisson
    arrivals at `rate`; with `one_at_a_time`, a lock lets one request in at once (its wait counts
    toward its time to first token)."""
    import httpx

    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    lock = asyncio.Lock()
    async with httpx.AsyncClient(timeout=WAIT_S, limits=limits) as client:

        async def run(prompt: str, max_tokens: int) -> dict:
            arrived = time.perf_counter()
            if one_at_a_time:
                async with lock:
                    record = await one_request(client, url, prompt, max_tokens)
            else:
                record = await one_request(client, url, prompt, max_tokens)
            record["sent"] = arrived
            return record

        start = time.perf_counter()
        if rate is None:
            queue = list(work)

            async def worker() -> list[dict]:
                done = []
                while queue:
                    done.append(await run(*queue.pop(0)))
                return done

            results = await asyncio.gather(*(worker() for _ in range(concurrency)))
            records = [r for rs in results for r in rs]
        else:
            rng = random.Random(1)
            tasks = []
            for prompt, max_tokens in work:
                tasks.append(asyncio.create_task(run(prompt, max_tokens)))
                await asyncio.sleep(rng.expovariate(rate))
            records = list(await asyncio.gather(*tasks))
        return records, time.perf_counter() - start


async def chat_script(url: str, conversations: int = 8, turns: int = 4) -> None:
    """Multi-turn chats over one shared system prompt; each turn resends the whole history."""
    import httpx

    system = ("You are a helpful assistant for a small team of engineers. Answer briefly, "
              "in plain words, and say when you do not know. ") * 3  # fmt: skip
    rng = random.Random(2)
    async with httpx.AsyncClient(timeout=WAIT_S) as client:

        async def converse(i: int) -> None:
            messages = [{"role": "system", "content": system}]
            for t in range(turns):
                words = " ".join(rng.choice(["how", "why", "what", "mesh", "cache", "slot",
                                             "token", "stage"]) for _ in range(8))  # fmt: skip
                messages.append({"role": "user", "content": f"user {i} turn {t}: {words}?"})
                body = {"model": "m", "messages": messages, "max_tokens": 32, "temperature": 0,
                        "ignore_eos": True}  # fmt: skip
                reply = (await client.post(url + "/v1/chat/completions", json=body)).json()
                messages.append(reply["choices"][0]["message"])

        await asyncio.gather(*(converse(i) for i in range(conversations)))


# -- the static batch (in-process, one mesh per process) -------------------------------------


def static_worker(run: str, mesh: str, work_json: str) -> None:
    """Times `generate` on batches of each concurrency; prints one JSON list of records per
    concurrency."""
    from jaxpar.mesh import make_mesh, parse_mesh, prepare

    spec = prepare(parse_mesh(mesh), tune_runtime=True)
    from jaxpar.infer.engine import Generator, _bucket
    from jaxpar.infer.load import load_run
    from jaxpar.infer.sampling import GREEDY

    model = load_run(Path(run), make_mesh(spec), "float32", warn=lambda m: None)
    work = [(model.encode(p), n) for p, n in json.loads(work_json)]
    out = {}
    for c in CONCURRENCY:
        progress(f"{mesh}: static batches of {c}")
        gen = Generator(model.placement, model.params, batch=c, max_len=CONTEXT)
        batches = [work[i : i + c] for i in range(0, len(work), c)]
        for width in sorted({_bucket(max(len(p) for p, _ in b)) for b in batches}):
            gen.generate([[1] * min(width, CONTEXT - 128)], 2, GREEDY)  # compile every width first
        records, clock = [], 0.0
        for batch in batches:
            result = gen.generate([p for p, _ in batch], max(n for _, n in batch), GREEDY)
            for (prompt, n), _ in zip(batch, result.new_ids, strict=True):
                steps = result.decode_s[: n - 1]
                times = [clock + result.prefill_s]
                for s in steps:
                    times.append(times[-1] + s)
                records.append({"sent": clock, "chunks": times, "tokens": n,
                                "prompt": len(prompt)})  # fmt: skip
            clock += result.prefill_s + sum(result.decode_s)
        out[c] = {"records": records, "duration": clock}
    print(json.dumps(out))


# -- figures ---------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "p99": 0.0}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"mean": statistics.fmean(values), "median": statistics.median(values), "p99": p99}


def summarize(records: list[dict], duration: float) -> dict:
    ttft = [r["chunks"][0] - r["sent"] for r in records if r["chunks"]]
    tpot = [(r["chunks"][-1] - r["chunks"][0]) / (r["tokens"] - 1) for r in records
            if r["tokens"] > 1 and len(r["chunks"]) > 1]  # fmt: skip
    itl = [b - a for r in records for a, b in zip(r["chunks"], r["chunks"][1:], strict=False)]
    out_tokens = sum(r["tokens"] for r in records)
    return {
        "requests": len(records), "duration_s": duration,
        "request_throughput": len(records) / duration,
        "output_tokens_per_s": out_tokens / duration,
        "total_tokens_per_s": (out_tokens + sum(r["prompt"] for r in records)) / duration,
        "ttft_ms": {k: v * 1e3 for k, v in _stats(ttft).items()},
        "tpot_ms": {k: v * 1e3 for k, v in _stats(tpot).items()},
        "itl_ms": {k: v * 1e3 for k, v in _stats(itl).items()},
    }  # fmt: skip


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("output_tokens_per_s", None, "output tokens/s"),
              ("ttft_ms", "median", "median time to first token (ms)"),
              ("tpot_ms", "median", "median time per output token (ms)")]  # fmt: skip
    fig, axes = plt.subplots(len(MESHES), 3, figsize=(15, 4.2 * len(MESHES)), squeeze=False)
    for i, mesh in enumerate(MESHES):
        for j, (key, sub, label) in enumerate(panels):
            ax = axes[i][j]
            for mode, style in (("continuous", "o-"), ("static", "s--"), ("one at a time", "^:")):
                pts = [(r["concurrency"], r[key] if sub is None else r[key][sub]) for r in rows
                       if r["mesh"] == mesh and r["mode"] == mode and r["concurrency"]]  # fmt: skip
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, label=mode)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("concurrency")
            ax.set_title(f"{mesh}: {label}", fontsize=10)
            ax.grid(alpha=0.3)
            if i == j == 0:
                ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64, help="requests per measurement")
    parser.add_argument("--rate", type=float, default=8.0, help="Poisson arrivals per second")
    parser.add_argument("--quick", action="store_true", help="one mesh, 16 requests")
    parser.add_argument("--static-worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.static_worker:
        static_worker(*args.static_worker)
        return
    meshes = MESHES[:1] if args.quick else MESHES
    n = 16 if args.quick else args.requests
    work = workload(n)
    rows, extra = [], {}
    with tempfile.TemporaryDirectory() as folder:
        run = make_run(Path(folder))
        for mesh in meshes:
            progress(f"{mesh}: static batches")
            out = subprocess.run([sys.executable, __file__, "--static-worker", str(run), mesh,
                                  json.dumps(work)], check=True, stdout=subprocess.PIPE,
                                 text=True, timeout=WAIT_S * 4)  # fmt: skip
            for c, found in json.loads(out.stdout.splitlines()[-1]).items():
                rows.append({"mesh": mesh, "mode": "static", "concurrency": int(c),
                             **summarize(found["records"], found["duration"])})  # fmt: skip
            server = Server(run, mesh)
            try:
                asyncio.run(drive(server.url, work[:4], 4, None))  # warm the HTTP path
                # (Served one at a time, every concurrency has the same throughput; only the
                # wait grows: the lowest and the highest are measured.)
                for mode, levels in (
                    ("continuous", CONCURRENCY),
                    ("one at a time", CONCURRENCY[:: len(CONCURRENCY) - 1]),
                ):
                    for c in levels:
                        progress(f"{mesh}: {mode}, concurrency {c}")
                        records, duration = asyncio.run(
                            drive(server.url, work, c, None, one_at_a_time=mode != "continuous")
                        )
                        rows.append({"mesh": mesh, "mode": mode, "concurrency": c,
                                     **summarize(records, duration)})  # fmt: skip
                progress(f"{mesh}: Poisson at {args.rate}/s")
                records, duration = asyncio.run(drive(server.url, work, None, args.rate))
                rows.append({"mesh": mesh, "mode": "continuous", "concurrency": None,
                             "rate": args.rate, **summarize(records, duration)})  # fmt: skip
                before = server.metrics()
                progress(f"{mesh}: multi-turn chat")
                asyncio.run(chat_script(server.url))
                after = server.metrics()
                queried = (after["jaxpar_prefix_cache_queried_tokens_total"]
                           - before["jaxpar_prefix_cache_queried_tokens_total"])  # fmt: skip
                hits = (after["jaxpar_prefix_cache_hit_tokens_total"]
                        - before["jaxpar_prefix_cache_hit_tokens_total"])  # fmt: skip
                extra[mesh] = {
                    "chat_prompt_tokens": queried, "chat_prefix_hit_tokens": hits,
                    "chat_prefix_hit_rate": hits / queried if queried else 0.0,
                    "cache_bytes_per_slot": after["jaxpar_cache_bytes_per_slot"],
                    "prefix_pool_bytes": after["jaxpar_prefix_pool_bytes"],
                    "slots": after["jaxpar_slots"],
                }  # fmt: skip
            finally:
                server.close()

    def ms(d: dict) -> str:
        return f"{d['mean']:,.1f} / {d['median']:,.1f} / {d['p99']:,.1f}"

    header = ["mesh", "mode", "concurrency", "req/s", "output tok/s", "TTFT ms mean/med/p99",
              "TPOT ms mean/med/p99", "ITL ms mean/med/p99"]  # fmt: skip
    results = write_results("serve_load", rows, header, lambda r: [
        r["mesh"], r["mode"], r["concurrency"] or f"Poisson {r['rate']:g}/s",
        f"{r['request_throughput']:.2f}", f"{r['output_tokens_per_s']:,.0f}", ms(r["ttft_ms"]),
        ms(r["tpot_ms"]), ms(r["itl_ms"]),
    ])  # fmt: skip
    (RESULTS / "serve_load_cache.json").write_text(json.dumps(extra, indent=2) + "\n")
    for mesh, e in extra.items():
        print(f"{mesh}: multi-turn chat prefix-cache hit rate {e['chat_prefix_hit_rate']:.1%} "
              f"({e['chat_prefix_hit_tokens']:.0f} of {e['chat_prompt_tokens']:.0f} prompt tokens);"
              f" KV cache {e['cache_bytes_per_slot'] / 2**20:.2f} MiB per slot x {e['slots']:.0f}"
              f" slots, prefix pool {e['prefix_pool_bytes'] / 2**20:.2f} MiB")  # fmt: skip
    plot(rows, results / "serve_load.png")


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
