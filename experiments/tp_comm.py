"""Tensor-parallel all-reduce bytes of one compiled train step against Megatron's minimum.

Usage: python experiments/tp_comm.py
(8 simulated CPU devices; writes results/tp_comm.json and results/tp_comm.md)
"""

from __future__ import annotations

import json
import os
import sys

from common import write_results

from jaxpar.mesh import parse_mesh, prepare

CASES = [
    # (mesh, model overrides)
    ("data=2,tensor=4", ["model.layers=4", "model.dim=256", "model.heads=8", "model.kv_heads=4"]),
    ("tensor=8", ["model.layers=4", "model.dim=512", "model.heads=16", "model.kv_heads=8"]),
    ("data=4,tensor=2", ["model.layers=8", "model.dim=256", "model.heads=8", "model.kv_heads=4"]),
]
COMMON = ["train.batch_size=16", "train.seq_len=128", "train.dtype=float32", "model.mlp_dim=1024"]


def main() -> int:
    prepare(parse_mesh("data=8"))
    from jaxpar.analysis.comm import megatron_check
    from jaxpar.analysis.hlo import collectives
    from jaxpar.config import load_config
    from jaxpar.mesh import AXES, make_mesh
    from jaxpar.train.step import Trainer

    rows = []
    for mesh_spec, overrides in CASES:
        config = load_config(None, [*COMMON, *overrides])
        mesh = make_mesh(parse_mesh(mesh_spec))
        trainer = Trainer(config, mesh)
        compiled, compile_s = trainer.compile()
        found = collectives(compiled.as_text(), tuple(mesh.shape[a] for a in AXES), AXES)
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
            "other_tensor_collectives": len(check.unexpected),
            "scalar_allreduces": check.scalars,
            "compile_s": round(compile_s, 2),
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)

    header = ["mesh", "L", "d", "b/replica", "s", "all-reduces (measured / Megatron)",
              "bytes measured", "bytes Megatron", "other"]  # fmt: skip
    write_results("tp_comm", rows, header, lambda r: [
        r["mesh"], r["layers"], r["dim"], r["batch_per_replica"], r["seq"],
        f"{r['allreduces_measured']} / {r['allreduces_megatron']}", f"{r['bytes_measured']:,}",
        f"{r['bytes_megatron']:,}", r["other_tensor_collectives"],
    ])  # fmt: skip
    return 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
