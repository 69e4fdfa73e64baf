"""Tensor-parallel all-reduce bytes of one compiled train step against Megatron's minimum.

Usage: python experiments/tp_comm.py
(8 simulated CPU devices, five model sizes on the three meshes with a tensor axis and no pipeline.
Each step is compiled by `jaxpar.analysis.report.analyze`; its collectives give the tensor-axis
all-reduce totals, and `jaxpar.analysis.comm.megatron_check` classifies the same HLO's all-reduces
against Megatron's count. Writes results/tp_comm.json and results/tp_comm.md.)
"""

from __future__ import annotations

import json
import os
import sys

from common import write_results

from jaxpar.mesh import parse_mesh, prepare


def model(layers: int, dim: int, heads: int, kv_heads: int) -> list[str]:
    return [f"model.layers={layers}", f"model.dim={dim}", f"model.heads={heads}",
            f"model.kv_heads={kv_heads}"]  # fmt: skip


CASES = [
    # (mesh, overrides)
    ("data=2,tensor=4", model(4, 256, 8, 4)),
    ("tensor=8", model(4, 512, 16, 8)),
    ("data=4,tensor=2", model(8, 256, 8, 4)),
    ("data=2,tensor=4", model(2, 768, 12, 4)),
    ("tensor=8", [*model(6, 256, 8, 8), "train.batch_size=8", "train.seq_len=256"]),
]
COMMON = ["train.batch_size=16", "train.seq_len=128", "train.dtype=float32", "model.mlp_dim=1024"]


def main() -> int:
    prepare(parse_mesh("data=8"), tune_runtime=True)
    from jaxpar.analysis.comm import megatron_check
    from jaxpar.analysis.hlo import collectives
    from jaxpar.analysis.report import analyze
    from jaxpar.config import load_config
    from jaxpar.mesh import AXES, make_mesh
    from jaxpar.placement import Placement
    from jaxpar.train.step import Trainer

    rows = []
    for mesh_spec, overrides in CASES:
        config = load_config(None, [*COMMON, *overrides])
        mesh = make_mesh(parse_mesh(mesh_spec))
        trainer = Trainer(Placement(config, mesh))
        a = analyze(trainer).to_json()
        tensor = [
            c for c in a["collectives"] if c["kind"] == "all-reduce" and c["axis"] == "tensor"
        ]
        hlo = trainer.compile()[0].as_text()  # compiled once, by analyze
        found = collectives(hlo, tuple(mesh.shape[x] for x in AXES), AXES)
        b_local = config.train.batch_size // mesh.shape["data"]
        check = megatron_check(found, config.model, b_local, config.train.seq_len, 4)
        rows.append({
            "mesh": mesh_spec,
            "layers": config.model.layers,
            "dim": config.model.dim,
            "batch_per_replica": b_local,
            "seq": config.train.seq_len,
            "allreduces_measured": check.measured_activation + check.measured_ce,
            "allreduces_megatron": check.expected_activation + check.expected_ce,
            "bytes_measured": check.measured_bytes,
            "bytes_megatron": check.expected_bytes,
            "tensor_allreduces": sum(c["count"] for c in tensor),
            "tensor_allreduce_bytes": sum(c["bytes"] for c in tensor),
            "other_tensor_collectives": len(check.unexpected),
            "scalar_allreduces": check.scalars,
            "compile_s": round(a["compile_s"], 2),
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)

    header = ["mesh", "L", "d", "b/replica", "s", "all-reduces (measured / Megatron)",
              "bytes measured", "bytes Megatron", "analyze: tensor all-reduces", "bytes",
              "other"]  # fmt: skip
    write_results("tp_comm", rows, header, lambda r: [
        r["mesh"], r["layers"], r["dim"], r["batch_per_replica"], r["seq"],
        f"{r['allreduces_measured']} / {r['allreduces_megatron']}", f"{r['bytes_measured']:,}",
        f"{r['bytes_megatron']:,}", r["tensor_allreduces"], f"{r['tensor_allreduce_bytes']:,}",
        r["other_tensor_collectives"],
    ])  # fmt: skip
    return 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
