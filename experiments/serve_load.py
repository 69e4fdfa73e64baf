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
server's metrics give the cache's memory. Writes results/serve_load.json, .md and .png.

`--paged`: at one KV memory budget (4 full contexts: 256 blocks of 16 positions), fixed slots
(4 slots, each able to hold a whole context: nothing is ever preempted) against paged blocks
(32 slots sharing the same 256 blocks, blocks taken as tokens arrive, the youngest request
preempted when they run out), on a mixed workload: 56 short requests (prompts of 16-64 tokens,
16-64 new) and 8 long ones (512-768 and 128-256), from 32 clients. Adds the most requests in
flight and the preemptions (from /metrics, sampled every 20 ms), and the decode step of each
cache on its own (the paged one reads through block tables: a gather). Writes
results/serve_load_paged.json, .md and .png.

`--processes`: the same mesh (data=2,pipeline=2,tensor=2) served by one process of 8 devices and
by two processes of 4 (`jaxpar launch -n 2`: each step's inputs handed from process 0 to the
other), at concurrency 1 and 16. Writes results/serve_load_processes.json and .md.

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
import threading
import time
from pathlib import Path

from common import RESULTS, train_one_step, write_results

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


def mixed_workload(seed: int = 3) -> list[tuple[str, int]]:
    """56 short requests (prompts of 16-64 tokens, 16-64 new) and 8 long ones (512-768 and
    128-256), shuffled."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz     "

    def text(n: int) -> str:
        return "".join(rng.choice(letters) for _ in range(n))

    work = [(text(rng.randint(16, 64)), rng.randint(16, 64)) for _ in range(56)]
    work += [(text(rng.randint(512, 768)), rng.randint(128, 256)) for _ in range(8)]
    rng.shuffle(work)
    return work


# -- the server and its clients --------------------------------------------------------------


class Server:
    """`jaxpar serve` in a subprocess on a free port of 127.0.0.1 (with `processes`, as that many
    processes of one job, through `jaxpar launch`)."""

    def __init__(self, run: Path, mesh: str, *overrides: str, processes: int = 1):
        argv = [sys.executable, "-m", "jaxpar"]
        if processes > 1:
            from jaxpar.mesh import parse_mesh

            per = parse_mesh(mesh).size // processes
            argv += ["launch", "-n", str(processes), "--devices-per-process", str(per), "--"]
        argv += ["serve", "--run", str(run), "--mesh", mesh, "--port", "0", "--model-name", "m",
                 f"serve.max_seqs={SLOTS}", f"serve.prefill_chunk={CHUNK}",
                 "serve.max_queue=1024", *overrides]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env)  # fmt: skip
        deadline = time.monotonic() + WAIT_S
        self.url = None
        while self.url is None:
            line = self.proc.stdout.readline()
            if not line or time.monotonic() > deadline:
                raise RuntimeError("jaxpar serve did not start")
            found = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
            self.url = found and found.group(1)
        # (its later lines are read and dropped, so that a full pipe never blocks it)
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

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


async def drive_watched(server: Server, work, concurrency: int) -> tuple[list[dict], float, dict]:
    """`drive` in a closed loop, with the server's /metrics sampled every 20 ms: the most
    requests in flight and the most blocks held."""
    import httpx

    peaks, stop = {"in_flight": 0.0, "blocks_used": 0.0}, asyncio.Event()
    names = {"in_flight": "jaxpar_active_slots", "blocks_used": "jaxpar_kv_blocks_used"}

    async def watch() -> None:
        async with httpx.AsyncClient(timeout=WAIT_S) as client:
            while not stop.is_set():
                text = (await client.get(server.url + "/metrics")).text
                for key, name in names.items():
                    found = re.search(rf"^{name} (\S+)$", text, re.M)
                    peaks[key] = max(peaks[key], float(found[1]))
                await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    records, duration = await drive(server.url, work, concurrency, None)
    stop.set()
    await watcher
    return records, duration, peaks


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


def step_worker(run: str) -> None:
    """Times one decode step of 8 rows on one device, rows of a whole context against blocks
    read through tables (each row's 64 blocks scattered over the pool), reading the first 128
    positions and all 1,024; prints one JSON object, ms (median of 200, best of 3 alternated
    rounds)."""
    from jaxpar.mesh import make_mesh, parse_mesh, prepare

    spec = prepare(parse_mesh("data=1"), tune_runtime=True)
    import numpy as np

    from jaxpar.infer.engine import Generator
    from jaxpar.infer.load import load_run

    model = load_run(Path(run), make_mesh(spec), "float32", warn=lambda m: None)
    rows, block = 8, 16
    per_row = CONTEXT // block
    tables = np.random.default_rng(0).permutation(rows * per_row).reshape(rows, per_row)
    gens = {
        "fixed slots": (Generator(model.placement, model.params, batch=rows, max_len=CONTEXT),
                        None),
        "paged": (Generator(model.placement, model.params, batch=rows, max_len=CONTEXT,
                            blocks=rows * per_row, block=block), tables),
    }  # fmt: skip
    zeros = np.zeros(rows, np.int32)
    caches = {name: g.empty_cache() for name, (g, _) in gens.items()}
    best: dict[str, float] = {}
    for _ in range(3):
        for span in (128, CONTEXT):
            for name, (g, table) in gens.items():
                key = f"{name}, span {span}"
                times = []
                for i in range(201):
                    start = time.perf_counter()
                    caches[name], _, token = g.decode(caches[name], zeros, zeros + 100, None,
                                                      None, span, table)  # fmt: skip
                    np.asarray(token)
                    if i:  # (the first compiles)
                        times.append(time.perf_counter() - start)
                best[key] = min(best.get(key, 1e9), statistics.median(times) * 1e3)
    print(json.dumps(best))


def paged(run: Path) -> None:
    """Fixed slots against paged blocks at one KV memory budget (the module docstring)."""
    budget = 4 * (CONTEXT // 16)  # blocks of 16: 4 full contexts
    work = mixed_workload()
    rows = []
    for name, slots in (("fixed slots", 4), ("paged", 32)):
        server = Server(run, "data=1", f"serve.max_seqs={slots}", "serve.block_size=16",
                        f"serve.kv_blocks={budget}")  # fmt: skip
        try:
            asyncio.run(drive(server.url, work[:4], 4, None))  # warm the HTTP path
            before = server.metrics()
            progress(f"{name}: {len(work)} mixed requests from 32 clients")
            records, duration, peaks = asyncio.run(drive_watched(server, work, 32))
            after = server.metrics()
        finally:
            server.close()
        rows.append({"cache": name, "slots": slots, "kv_blocks": budget, **peaks,
                     "preemptions": after["jaxpar_preemptions_total"]
                     - before["jaxpar_preemptions_total"],
                     **summarize(records, duration)})  # fmt: skip
    progress("decode steps of each cache on its own")
    out = subprocess.run([sys.executable, __file__, "--step-worker", str(run)], check=True,
                         stdout=subprocess.PIPE, text=True, timeout=WAIT_S)  # fmt: skip
    steps = json.loads(out.stdout.splitlines()[-1])

    def ms(d: dict) -> str:
        return f"{d['mean']:,.1f} / {d['median']:,.1f} / {d['p99']:,.1f}"

    header = ["cache", "slots", "blocks of 16", "most in flight", "most blocks held",
              "preemptions", "req/s", "output tok/s", "TTFT ms mean/med/p99",
              "TPOT ms mean/med/p99"]  # fmt: skip
    results = write_results("serve_load_paged", rows, header, lambda r: [
        r["cache"], r["slots"], r["kv_blocks"], f"{r['in_flight']:.0f}",
        f"{r['blocks_used']:.0f}", f"{r['preemptions']:.0f}",
        f"{r['request_throughput']:.2f}", f"{r['output_tokens_per_s']:,.0f}", ms(r["ttft_ms"]),
        ms(r["tpot_ms"]),
    ])  # fmt: skip
    with (results / "serve_load_paged.md").open("a") as f:
        f.write("\n| decode step, 8 rows, one device | ms |\n|---|---|\n")
        f.writelines(f"| {k} | {v:.3f} |\n" for k, v in steps.items())
    saved = results / "serve_load_paged.json"
    doc = {"load": json.loads(saved.read_text()), "decode_step_ms": steps}
    saved.write_text(json.dumps(doc, indent=2) + "\n")
    plot_paged(rows, results / "serve_load_paged.png")


def processes(run: Path) -> None:
    """One process of 8 devices against two processes of 4, on one mesh."""
    mesh, work, rows = "data=2,pipeline=2,tensor=2", workload(32), []
    for count in (1, 2):
        server = Server(run, mesh, processes=count)
        try:
            asyncio.run(drive(server.url, work[:4], 4, None))  # warm the HTTP path
            for concurrency in (1, 16):
                progress(f"{count} process(es): concurrency {concurrency}")
                records, duration = asyncio.run(drive(server.url, work, concurrency, None))
                rows.append({"processes": count, "concurrency": concurrency,
                             **summarize(records, duration)})  # fmt: skip
        finally:
            server.close()

    def ms(d: dict) -> str:
        return f"{d['mean']:,.1f} / {d['median']:,.1f} / {d['p99']:,.1f}"

    header = ["processes x devices", "concurrency", "req/s", "output tok/s",
              "TTFT ms mean/med/p99", "TPOT ms mean/med/p99", "ITL ms mean/med/p99"]  # fmt: skip
    write_results("serve_load_processes", rows, header, lambda r: [
        f"{r['processes']} x {8 // r['processes']}", r["concurrency"],
        f"{r['request_throughput']:.2f}", f"{r['output_tokens_per_s']:,.0f}", ms(r["ttft_ms"]),
        ms(r["tpot_ms"]), ms(r["itl_ms"]),
    ])  # fmt: skip


# -- figures ---------------------------------------------------------------------------------


def plot_paged(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("in_flight", None, "most requests in flight"),
              ("output_tokens_per_s", None, "output tokens/s"),
              ("ttft_ms", "median", "median time to first token (ms)"),
              ("tpot_ms", "median", "median time per output token (ms)")]  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    names = [r["cache"] for r in rows]
    for ax, (key, sub, label) in zip(axes, panels, strict=True):
        values = [r[key] if sub is None else r[key][sub] for r in rows]
        ax.bar(names, values, color=["#888", "#3a7"])
        ax.set_title(label, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"one KV budget of {rows[0]['kv_blocks']} blocks x 16 positions, "
                 "56 short + 8 long requests, 32 clients", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)


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
    parser.add_argument("--paged", action="store_true", help="fixed slots against paged blocks")
    parser.add_argument("--processes", action="store_true", help="one process against two")
    parser.add_argument("--static-worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--step-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.static_worker:
        static_worker(*args.static_worker)
        return
    if args.step_worker:
        step_worker(args.step_worker)
        return
    if args.paged or args.processes:
        with tempfile.TemporaryDirectory() as folder:
            run = train_one_step(Path(folder) / "model", MODEL, CONTEXT, WAIT_S)
            if args.paged:
                paged(run)
            if args.processes:
                processes(run)
        return
    meshes = MESHES[:1] if args.quick else MESHES
    n = 16 if args.quick else args.requests
    work = workload(n)
    rows, extra = [], {}
    with tempfile.TemporaryDirectory() as folder:
        run = train_one_step(Path(folder) / "model", MODEL, CONTEXT, WAIT_S)
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
                    "kv_block_bytes": after["jaxpar_kv_block_bytes"],
                    "kv_blocks": after["jaxpar_kv_blocks"], "slots": after["jaxpar_slots"],
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
              f" paged KV cache of {e['kv_blocks']:.0f} blocks of"
              f" {e['kv_block_bytes'] / 2**10:.0f} KiB for {e['slots']:.0f} slots")  # fmt: skip
    plot(rows, results / "serve_load.png")


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
