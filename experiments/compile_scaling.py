"""Compile time and compiled-program size of the train step as layers and micro-batches grow.

Usage: python experiments/compile_scaling.py
(4 simulated CPU devices, mesh pipeline=4, gpipe. Compares 4 vs 32 layers at M=4 micro-batches and
4 vs 32 micro-batches at 8 layers. Each case is compiled twice, in fresh Trainers, by
`jaxpar.analysis.report.analyze`, and the faster compile is reported, with the size of the compiled
module, which should stay flat since both the layers and the schedule's ticks are scans: its HLO
text lines, and its HLO instructions (the `name = op(...)` lines; the text also holds
source-location tables, which vary with the call stack).
Writes results/compile_scaling.json and .md.)
"""

from __future__ import annotations

import json
import os
import sys

from common import write_results

from jaxpar.mesh import parse_mesh, prepare

MESH = "pipeline=4"
CASES = [(4, 4), (32, 4), (8, 4), (8, 32)]  # (layers, micro-batches)
COMMON = [
    "model.dim=64", "model.heads=4", "model.kv_heads=2", "model.mlp_dim=128",
    "train.batch_size=32", "train.seq_len=32", "train.dtype=float32",
    "pipeline.schedule=gpipe", "model.remat=none",
]  # fmt: skip
TRIES = 2


def main() -> int:
    spec = prepare(parse_mesh(MESH), tune_runtime=True)
    from jaxpar.analysis.report import analyze
    from jaxpar.config import load_config
    from jaxpar.mesh import make_mesh
    from jaxpar.placement import Placement
    from jaxpar.train.step import Trainer

    mesh = make_mesh(spec)
    rows = []
    for layers, m in CASES:
        sizes = [f"model.layers={layers}", f"pipeline.microbatches={m}"]
        config = load_config(None, [*COMMON, *sizes])
        seconds, hlo_lines, hlo_ops, loops = [], set(), set(), set()
        for _ in range(TRIES):
            trainer = Trainer(Placement(config, mesh))
            seconds.append(round(analyze(trainer).compile_s, 2))
            text = trainer.compile()[0].as_text().splitlines()  # compiled once, by analyze
            hlo_lines.add(len(text))
            hlo_ops.add(sum(line.startswith("  ") and " = " in line for line in text))
            loops.add(sum(" while(" in line for line in text))
        rows.append({
            "layers": layers,
            "M": m,
            "ticks": m + spec.pipeline - 1,
            "compile_s": min(seconds),
            "compile_s_tries": seconds,
            "hlo_lines": sorted(hlo_lines),
            "hlo_instructions": sorted(hlo_ops),
            "while_loops": sorted(loops),
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)

    keys = ("compile_s_tries", "hlo_lines", "hlo_instructions", "while_loops")
    header = ["layers", "M", "ticks", "compile s (min)", "tries", "HLO lines", "instructions",
              "loops"]  # fmt: skip
    write_results("compile_scaling", rows, header, lambda r: [
        r["layers"], r["M"], r["ticks"], r["compile_s"],
        *(" / ".join(f"{x:,}" for x in r[k]) for k in keys),
    ])  # fmt: skip
    return 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
