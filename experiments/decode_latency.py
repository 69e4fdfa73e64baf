"""What pipeline parallelism costs a chatbot: time to first token and per-token latency of KV-cached
decoding for one model on one device, data=8, tensor=8 and pipeline=8 (simulated CPU devices), in
float32 and bfloat16, with the compiled decode step's FLOPs, bytes accessed and collectives.

Usage: python experiments/decode_latency.py
(Each layout runs in its own process, since the simulated device count is fixed when JAX starts.
Per layout, dtype and batch size (1 and 8 sequences): a 64-token prompt, then 32 greedy tokens;
the generation runs once to compile and warm up, then 3 times timed; reported are the median time
to first token and the median per-token decode latency. Matmul FLOPs count every loop trip; XLA's
bytes accessed count a loop body once. Writes results/decode_latency.json, .md and .png.
Wall-clock on a shared 2-core host: compare the layouts with each other, not with GPUs.)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from common import write_results

LAYOUTS = ["data=1", "data=8", "tensor=8", "pipeline=8"]
BATCHES = [1, 8]
DTYPES = ["float32", "bfloat16"]
MODEL = [
    "model.layers=8", "model.dim=512", "model.heads=8", "model.kv_heads=8",
    "model.mlp_dim=1536", "model.vocab=256",
]  # fmt: skip
PROMPT, NEW, TRIES = 64, 32, 3


def worker(spec_text: str) -> None:
    """Measures one layout; prints one JSON row per batch size."""
    from jaxpar.mesh import parse_mesh, prepare

    spec = prepare(parse_mesh(spec_text), tune_runtime=True)
    import numpy as np

    from jaxpar.analysis.comm import traffic
    from jaxpar.analysis.hlo import collectives, dot_flops, parse
    from jaxpar.config import load_config
    from jaxpar.infer.engine import Generator
    from jaxpar.infer.sampling import GREEDY
    from jaxpar.mesh import AXES, make_mesh
    from jaxpar.placement import Placement
    from jaxpar.train.step import Trainer

    mesh = make_mesh(spec)
    config = load_config(None, [*MODEL, "train.dtype=float32"])
    params = Trainer(Placement(config, mesh)).init_state(0).params
    rng = np.random.default_rng(0)
    for dtype in DTYPES:
        placement = Placement(config.replace(**{"train.dtype": dtype}), mesh, serving=True)
        for batch in BATCHES:
            gen = Generator(placement, params, batch=batch, max_len=PROMPT + NEW)
            prompts = rng.integers(0, 256, (batch, PROMPT)).tolist()
            gen.generate(prompts, NEW, GREEDY)  # compiles and warms up
            runs = [gen.generate(prompts, NEW, GREEDY) for _ in range(TRIES)]
            token_ms = [1e3 * statistics.median(r.decode_s) for r in runs]
            compiled = gen.decode_compiled()
            hlo = parse(compiled.as_text())
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            found = traffic(collectives(hlo, spec.sizes, AXES))
            row = {
                "layout": str(spec),
                "devices": spec.size,
                "dtype": dtype,
                "batch": batch,
                "microbatches": gen.microbatches,
                "ttft_ms": statistics.median(1e3 * r.prefill_s for r in runs),
                "token_ms": statistics.median(token_ms),
                "tokens_per_s": batch * 1e3 / statistics.median(token_ms),
                "compile_s": gen.compile_s,
                "ticks": gen.microbatches + spec.pipeline - 1,
                "decode_flops_per_device": dot_flops(hlo),
                "decode_bytes_accessed": int(cost["bytes accessed"]),
                "decode_collectives": [
                    {"kind": c.kind, "axis": c.axis, "count": c.count, "bytes": c.bytes}
                    for c in found
                ],
                "params": config.model.num_params,
            }
            print(json.dumps(row), flush=True)


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(len(DTYPES), 2, figsize=(10, 3.6 * len(DTYPES)), squeeze=False)
    x = np.arange(len(LAYOUTS))
    for row, dtype in zip(axes, DTYPES, strict=True):
        for ax, key, title in (
            (row[0], "ttft_ms", "time to first token (ms)"),
            (row[1], "token_ms", "per-token decode latency (ms)"),
        ):
            for i, batch in enumerate(BATCHES):
                values = [next(r[key] for r in rows if r["layout"] == _canonical(layout)
                               and r["batch"] == batch and r["dtype"] == dtype)
                          for layout in LAYOUTS]  # fmt: skip
                ax.bar(x + (i - 0.5) * 0.38, values, 0.38, label=f"batch {batch}")
            ax.set_xticks(x, ["1 device" if lay == "data=1" else lay for lay in LAYOUTS])
            ax.set_title(f"{title}, {dtype}")
            ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(f"KV-cached greedy decoding, {rows[0]['params'] / 1e6:.0f}M params, "
                 f"{PROMPT}-token prompt (simulated CPU devices, 2-core host)")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _canonical(layout: str) -> str:
    from jaxpar.mesh import parse_mesh

    return str(parse_mesh(layout))


def main() -> int:
    rows = []
    for layout in LAYOUTS:
        print(f"measuring {layout} ...", flush=True)
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        done = subprocess.run(
            [sys.executable, __file__, "--worker", layout], env=env, capture_output=True,
            text=True, check=False,
        )  # fmt: skip
        if done.returncode:
            print(done.stdout, done.stderr, file=sys.stderr)
            return 1
        for line in done.stdout.splitlines():
            if line.startswith("{"):
                rows.append(json.loads(line))
                print(line, flush=True)
    header = ["layout", "dtype", "batch", "micro-batches", "ticks per token",
              "decode MFLOP/device", "decode MB accessed/device", "decode collectives (count, KiB)",
              "time to first token ms", "per-token ms", "tokens/s"]  # fmt: skip
    out = write_results("decode_latency", rows, header, lambda r: [
        "1 device" if r["devices"] == 1 else r["layout"], r["dtype"], r["batch"],
        r["microbatches"], r["ticks"], f"{r['decode_flops_per_device'] / 1e6:,.1f}",
        f"{r['decode_bytes_accessed'] / 1e6:,.1f}",
        ", ".join(f"{c['kind']} {c['axis']} x{c['count']} {c['bytes'] / 1024:,.1f}"
                  for c in r["decode_collectives"] if c["bytes"] > 4 * c["count"]) or "none",
        f"{r['ttft_ms']:.1f}", f"{r['token_ms']:.2f}", f"{r['tokens_per_s']:.1f}",
    ])  # fmt: skip
    plot(rows, out / "decode_latency.png")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2])
    else:
        sys.exit(main())
