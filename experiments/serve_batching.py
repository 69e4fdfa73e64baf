"""Batching that pays on one device: what a decode step costs per row, what its time goes to, and
16 concurrent requests through the openai client against the same 16 one at a time.

Usage: python experiments/serve_batching.py [--label NAME] [--rounds N]

On one CPU device (`JAX_PLATFORMS=cpu`, one host device), for two byte-vocabulary Llamas trained
for one step (what they say does not matter):

- small: 4 layers, d=64, 4 heads / 4 kv heads, mlp 176, context 128;
- load: `serve_load.py`'s model, 4 layers, d=128, 8 / 8 heads, mlp 352, context 1024.

1. The decode step (`Generator.decode` of a 16-row generator, compiled once, timed after warm-up)
   at 1, 8 and 16 rows, greedy and sampled (temperature 1, top-k 40, top-p 0.9), for the small
   model over its 128 positions and the load model over 128 and 1,024: the median of 200 calls,
   the best of `--rounds` rounds that alternate the row counts.
2. Where a step's time goes: jax.profiler's trace of 100 greedy steps at 1 and 16 rows, each
   XLA:CPU thunk's own time (its nested thunks' taken out) attributed to a part by the source
   function of its HLO instruction: the layer stack (projections, attention, the scan's slices),
   the LM head, `sample`'s parts (its sort, the keys and noise, the rest), the cache write. CPU
   time summed over XLA's threads, so it can exceed the step's wall-clock.
3. `jaxpar serve` (the default 8 slots) on the small model, driven by the openai client: 16
   greedy requests of 24 tokens each (EOS ignored), streamed, all at once against one after
   another, in `--rounds` alternating rounds (the median of their ratios), and the same without
   streaming. The two must give the same texts.

Each run adds its rows under `--label` (default "this tree") to results/serve_batching.json and
rewrites the tables and the plot from all the labels there, so that one code base against
another is `PYTHONPATH=/path/to/other/checkout python experiments/serve_batching.py --label X`
(the server subprocess inherits the path). Wall-clock on a shared 2-core host: compare rows of
one run, and labels by their ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gzip
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, train_one_step, write_results

MODELS = {
    "small": (["model.layers=4", "model.dim=64", "model.heads=4", "model.kv_heads=4",
               "model.mlp_dim=176", "model.vocab=256"], 128),
    "load": (["model.layers=4", "model.dim=128", "model.heads=8", "model.kv_heads=8",
              "model.mlp_dim=352", "model.vocab=256"], 1024),
}  # fmt: skip
STEPS = [("small", 128), ("load", 128), ("load", 1024)]  # (model, span) of the step timings
ROWS = [1, 8, 16]
REQUESTS, TOKENS = 16, 24
WAIT_S = 600


# -- the decode step -------------------------------------------------------------------------


def generator(run: Path):
    from jaxpar.infer.engine import Generator
    from jaxpar.infer.load import load_run
    from jaxpar.mesh import make_mesh, parse_mesh

    model = load_run(run, make_mesh(parse_mesh("data=1")), "float32", warn=lambda m: None)
    return Generator(model.placement, model.params, batch=16, max_len=model.context)


class Stepper:
    """Decode steps of n rows over `span` positions on one cache, the tokens read back."""

    def __init__(self, gen, span: int):
        self.gen, self.span, self.cache = gen, span, gen.empty_cache()

    def __call__(self, n: int, sampling, repeats: int) -> list[float]:
        import numpy as np

        from jaxpar.infer.sampling import RowSampling

        tokens, positions = np.zeros(n, np.int32), np.full(n, self.span // 2, np.int32)
        rows, active = RowSampling.fill(n, sampling, np.arange(n)), np.ones(n, bool)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            self.cache, _, new = self.gen.decode(self.cache, tokens, positions, rows, active,
                                                 self.span)  # fmt: skip
            np.asarray(new)
            times.append(time.perf_counter() - start)
        return times


def step_costs(gen, model: str, span: int, rounds: int) -> list[dict]:
    from jaxpar.infer.sampling import GREEDY, Sampling

    step, out = Stepper(gen, span), []
    for label, sampling in (("greedy", GREEDY), ("top-k 40, top-p 0.9", Sampling(1.0, 40, 0.9))):
        best = {n: float("inf") for n in ROWS}
        for _ in range(rounds):
            for n in ROWS:
                step(n, sampling, 10)  # compiled and warm
                best[n] = min(best[n], statistics.median(step(n, sampling, 200)))
        out += [{"part": "step", "model": model, "span": span, "sampling": label, "rows": n,
                 "ms": best[n] * 1e3} for n in ROWS]  # fmt: skip
    return out


def _source_parts(hlo: str) -> dict[str, str]:
    """Each HLO instruction's part of the step, from the innermost jaxpar function of its
    source frame (the module's StackFrames table) and its op name."""
    section, functions, locations, frames = None, {}, {}, {}
    for line in hlo.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
        elif not line.strip():
            section = None
        elif section == "FunctionNames":
            i, name = line.split(" ", 1)
            functions[int(i)] = name.strip('"')
        elif section == "FileLocations":
            m = re.match(r"(\d+) \{file_name_id=\d+ function_name_id=(\d+)", line)
            locations[int(m[1])] = functions[int(m[2])]
        elif section == "StackFrames":
            m = re.match(r"(\d+) \{file_location_id=(\d+)", line)
            frames[int(m[1])] = locations[int(m[2])]
    parts = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{([^}]*)\}", hlo, re.M):
        frame = re.search(r"stack_frame_id=(\d+)", m[2])
        op = re.search(r'op_name="([^"]*)"', m[2])
        parts[m[1]] = _part(frames[int(frame[1])] if frame else "", op[1] if op else "")
    return parts


def _part(function: str, op: str) -> str:
    if function.startswith("sample") or function.startswith("_draw") or function == "_kept":
        if "sort" in op:
            return "sample: sort"
        if any(s in op for s in ("gumbel", "uniform", "threefry", "fold_in", "random")):
            return "sample: keys and noise"
        return "sample: the rest"
    if "logits" in function:
        return "LM head"
    if "attend" in function or "scores" in function or function == "joined":
        return "layers: attention"
    if function.endswith("run.<locals>.<genexpr>"):
        return "cache write"
    if function.endswith("run.<locals>.<listcomp>") or "layer" in function:
        return "layers: scan (slices, select)"
    if function in ("Block.apply", "rms_norm", "Attention.apply", "SwiGLU.apply", "swiglu",
                    "rope", "einsum", "Rules.constrain"):  # fmt: skip
        return "layers: projections, MLP, norms"
    return "other (embedding, copies, loop)"


def _own_times(events: list[dict]) -> collections.Counter:
    """Each event name's time less the time of the events nested in it, per thread."""
    own: collections.Counter = collections.Counter()
    by_thread = collections.defaultdict(list)
    for e in events:
        by_thread[(e["pid"], e["tid"])].append(e)
    for thread in by_thread.values():
        thread.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[dict] = []
        for e in thread:
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
                stack.pop()
            if stack:
                own[stack[-1]["name"]] -= e["dur"]
            own[e["name"]] += e["dur"]
            stack.append(e)
    return own


def decode_program(gen, n: int, span: int):
    """The compiled n-row decode step over `span` positions (`Generator.decode`'s)."""
    args, layout = gen.decode_inputs(gen.empty_cache(), n)
    return gen._step("_decode", args, layout=layout, span=span)


def breakdown(gen, model: str, span: int, n: int, folder: Path) -> list[dict]:
    import jax

    from jaxpar.infer.sampling import GREEDY

    step, repeats = Stepper(gen, span), 100
    step(n, GREEDY, 20)
    trace = folder / f"trace_{model}_{span}_{n}"
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0
    with jax.profiler.trace(str(trace), create_perfetto_trace=True, profiler_options=options):
        step(n, GREEDY, repeats)
    with gzip.open(next(trace.rglob("perfetto_trace.json.gz"))) as f:
        doc = json.load(f)
    events = doc["traceEvents"] if isinstance(doc, dict) else doc
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}  # fmt: skip
    thunks = [e for e in events if e.get("ph") == "X" and "XLAEigen" in threads.get(
        (e["pid"], e["tid"]), "") and not e["name"].startswith("ThunkExecutor")]  # fmt: skip
    parts = _source_parts(decode_program(gen, n, span).as_text())
    total: collections.Counter = collections.Counter()
    for name, us in _own_times(thunks).items():
        total[parts.get(name.removeprefix("end: "), "other (embedding, copies, loop)")] += us
    shutil.rmtree(trace, ignore_errors=True)
    return [{"part": part, "model": model, "span": span, "sampling": "greedy", "rows": n,
             "ms": us / repeats / 1e3} for part, us in total.items()]  # fmt: skip


# -- through the openai client ---------------------------------------------------------------


class Server:
    """`jaxpar serve` on one CPU device in a subprocess, on a free port of 127.0.0.1."""

    def __init__(self, run: Path):
        argv = [sys.executable, "-m", "jaxpar", "serve", "--run", str(run), "--mesh", "data=1",
                "--port", "0", "--model-name", "m"]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env)
        deadline, self.url = time.monotonic() + WAIT_S, None
        while self.url is None:
            line = self.proc.stderr.readline()
            if not line or time.monotonic() > deadline:
                raise RuntimeError("jaxpar serve did not start")
            found = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
            self.url = found and found.group(1)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(WAIT_S)


async def through_client(url: str, rounds: int) -> list[dict]:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    prompts = [f"request {i}: the quick brown fox" for i in range(REQUESTS)]

    async def one(prompt: str, stream: bool) -> str:
        kwargs = {"model": "m", "prompt": prompt, "max_tokens": TOKENS, "temperature": 0,
                  "extra_body": {"ignore_eos": True}}  # fmt: skip
        if not stream:
            return (await client.completions.create(**kwargs)).choices[0].text
        text = ""
        async for chunk in await client.completions.create(stream=True, **kwargs):
            text += chunk.choices[0].text if chunk.choices else ""
        return text

    out = []
    for stream in (True, False):
        await asyncio.gather(*(one(p, stream) for p in prompts))  # warm
        alone, together = [], []
        for _ in range(rounds):
            start = time.perf_counter()
            texts = [await one(p, stream) for p in prompts]
            alone.append(time.perf_counter() - start)
            start = time.perf_counter()
            assert await asyncio.gather(*(one(p, stream) for p in prompts)) == texts
            together.append(time.perf_counter() - start)
        ratios = [a / t for a, t in zip(alone, together, strict=True)]
        out.append({"part": "client", "stream": stream, "alone_s": statistics.median(alone),
                    "together_s": statistics.median(together),
                    "speedup": statistics.median(ratios), "speedups": ratios})  # fmt: skip
    await client.close()
    return out


# -- results ---------------------------------------------------------------------------------


def plot(rows: list[dict], labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    ax = axes[0]
    for label, style in zip(labels, ("o--", "s-", "^:", "d-."), strict=False):
        for model, span in STEPS:
            pts = [(r["rows"], r["ms"]) for r in rows if r["label"] == label
                   and r["part"] == "step" and r["sampling"] == "greedy"
                   and (r["model"], r["span"]) == (model, span)]  # fmt: skip
            if pts:
                ax.plot(*zip(*sorted(pts), strict=True), style, label=f"{label}: {model}, {span}")
    ax.set(xlabel="rows", ylabel="greedy decode step (ms)", yscale="log", xticks=ROWS)
    ax.set_title("decode step against rows (model, span)", fontsize=10)
    ax.legend(fontsize=7)
    ax = axes[1]
    parts = sorted({r["part"] for r in rows if r["part"] not in ("step", "client")})
    bars = [(label, n) for label in labels for n in (1, 16)]
    bottom = [0.0] * len(bars)
    for part in parts:
        heights = [sum(r["ms"] for r in rows if r["label"] == label and r["part"] == part
                       and r["model"] == "small" and r["rows"] == n)
                   for label, n in bars]  # fmt: skip
        ax.bar(range(len(bars)), heights, bottom=bottom, label=part)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set_xticks(range(len(bars)), [f"{label}\n{n} row{'s' * (n > 1)}" for label, n in bars],
                  fontsize=8)  # fmt: skip
    ax.set(ylabel="CPU ms per step (XLA's threads)")
    ax.set_title("small model's greedy step, by part", fontsize=10)
    ax.legend(fontsize=7)
    ax = axes[2]
    clients = [(r["label"], r["stream"], r["speedup"]) for r in rows if r["part"] == "client"]
    ax.bar(range(len(clients)), [c[2] for c in clients])
    ax.set_xticks(range(len(clients)), [f"{c[0]}\n{'stream' if c[1] else 'whole'}"
                                        for c in clients], fontsize=8)  # fmt: skip
    ax.axhline(5, color="gray", ls=":")
    ax.set(ylabel="16 one at a time / 16 together")
    ax.set_title("openai client, 16 greedy requests x 24 tokens, 8 slots", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="this tree", help="the code base measured")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        runs = {name: train_one_step(folder / name, *MODELS[name], WAIT_S) for name in MODELS}
        gens = {name: generator(run) for name, run in runs.items()}
        for model, span in STEPS:
            print(f"decode steps: {model} model, span {span}", file=sys.stderr)
            rows += step_costs(gens[model], model, span, args.rounds)
        for n in (1, 16):
            rows += breakdown(gens["small"], "small", 128, n, folder)
        server = Server(runs["small"])
        try:
            rows += asyncio.run(through_client(server.url, args.rounds))
        finally:
            server.close()
    path = RESULTS / "serve_batching.json"
    old = json.loads(path.read_text()) if path.exists() else []
    rows = [r for r in old if r["label"] != args.label] + [{"label": args.label, **r}
                                                          for r in rows]  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(rows, indent=2) + "\n")  # every label's rows; the tables follow
    labels = list(dict.fromkeys(r["label"] for r in rows))
    steps = [r for r in rows if r["part"] == "step"]
    one = {(r["label"], r["model"], r["span"], r["sampling"]): r["ms"] for r in steps
           if r["rows"] == 1}  # fmt: skip

    def step_cells(r: dict) -> list:
        ratio = r["ms"] / one[(r["label"], r["model"], r["span"], r["sampling"])]
        return [r["label"], r["model"], r["span"], r["sampling"], r["rows"], f"{r['ms']:.3f}",
                f"{ratio:.1f}"]  # fmt: skip

    write_results(
        "serve_batching_steps",
        steps,
        ["code", "model", "span", "sampling", "rows", "step ms", "x 1 row"],
        step_cells,
    )
    parts = sorted({r["part"] for r in rows if r["part"] not in ("step", "client")})
    columns = [(label, n) for label in labels for n in (1, 16)]
    table = [{"part": p, **{f"{label} {n}": sum(r["ms"] for r in rows if r["part"] == p
                            and r["label"] == label and r["rows"] == n)
                            for label, n in columns}} for p in parts]  # fmt: skip
    table.append(
        {"part": "total", **{k: sum(t[k] for t in table) for k in table[0] if k != "part"}}
    )
    write_results(
        "serve_batching_parts",
        table,
        ["part", *[f"{label}, {n} row{'s' * (n > 1)} (ms)" for label, n in columns]],
        lambda t: [t["part"], *[f"{t[f'{label} {n}']:.3f}" for label, n in columns]],
    )
    clients = [r for r in rows if r["part"] == "client"]
    write_results("serve_batching_client", clients,
                  ["code", "streamed", "16 one at a time s", "16 together s", "speedup (median)",
                   "speedups"],
                  lambda r: [r["label"], r["stream"], f"{r['alone_s']:.3f}",
                             f"{r['together_s']:.3f}", f"{r['speedup']:.2f}",
                             ", ".join(f"{s:.2f}" for s in r["speedups"])])  # fmt: skip
    plot(rows, labels, RESULTS / "serve_batching.png")


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = " ".join(
        [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=1"]
    ).strip()
    main()
