"""What one train step executes, op by op, per device: XLA:CPU runs one thunk per executed
operation (a fusion is one), and on this host a small step costs about its count.

Usage: python experiments/tick_thunks.py
(8 simulated CPU devices. Compiles, running nothing, speed.py's model on its mesh b,
`data=2,pipeline=2,tensor=2` with 4 micro-batches, for each schedule and remat policy, and counts
the operations of one step (`jaxpar.analysis.hlo.executed_ops`: while bodies times their trip
counts, conditional branches as if each ran) and those of its loops per tick, by kind. Writes
results/tick_thunks.json and .md.)
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter

from common import write_results
from speed import MESHES, MODEL

from jaxpar.mesh import parse_mesh, prepare

LAYOUTS = [
    ("gpipe", "none", []), ("gpipe", "full", []),
    ("1f1b", "none", ["pipeline.tick=fused"]), ("1f1b", "none", ["pipeline.tick=single"]),
    ("zb_h1", "none", ["pipeline.tick=single"]),
    ("zb_v", "none", ["pipeline.repeats=2"]),
]  # fmt: skip
KINDS = ("fusion", "dynamic-update-slice", "copy", "dynamic-slice", "conditional", "dot")


def count(trainer) -> dict:
    """Operations of one step, and of one tick: everything the step runs inside loops (the tick
    loops and the layer loops in them; forward and backward for gpipe) over the ticks."""
    from jaxpar.analysis.hlo import executed_ops, parse

    module = parse(trainer.compile()[0].as_text())
    ops = executed_ops(module)
    step, looped = Counter(), Counter()
    for computation, per_op in ops.items():
        step.update(per_op)
        if computation != module.entry:
            looped.update(per_op)
    ticks = trainer.placement.schedule.ticks
    return {"ticks": ticks, "step": dict(step), "tick": {k: n / ticks for k, n in looped.items()}}


def main() -> int:
    mesh_spec, extra = MESHES["b"]
    spec = prepare(parse_mesh(mesh_spec), tune_runtime=True)
    from jaxpar.config import load_config
    from jaxpar.mesh import make_mesh
    from jaxpar.placement import Placement
    from jaxpar.train.step import Trainer

    mesh = make_mesh(spec)
    rows = []
    for schedule, remat, more in LAYOUTS:
        overrides = [*MODEL, *extra, f"pipeline.schedule={schedule}", f"model.remat={remat}", *more]
        trainer = Trainer(Placement(load_config(None, overrides), mesh))
        c = count(trainer)
        rows.append({
            "schedule": schedule, "remat": remat, "tick": trainer.placement.schedule.granularity,
            "ticks": c["ticks"], "step_ops": sum(c["step"].values()),
            "tick_ops": sum(c["tick"].values()), "step": c["step"], "per_tick": c["tick"],
        })  # fmt: skip
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("step", "per_tick")}))
    header = ["schedule", "remat", "tick", "ticks", "ops per step", "ops per tick",
              *(f"{k} per tick" for k in KINDS)]  # fmt: skip
    write_results("tick_thunks", rows, header, lambda r: [
        r["schedule"], r["remat"], r["tick"], r["ticks"], f"{r['step_ops']:,}",
        f"{r['tick_ops']:,.0f}", *(f"{r['per_tick'].get(k, 0):.0f}" for k in KINDS),
    ])  # fmt: skip
    return 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
