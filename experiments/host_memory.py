"""Page faults of this host's CPU runtime with and without `jaxpar.runtime`'s settings.

Usage (from the repository root): python experiments/host_memory.py

Two measurements, moved here from the unit suite (page-fault counts are the host's, not jaxpar's
to assert):
- a train step whose temporaries exceed 64 MiB, per step after the first rounds, with XLA's
  temporaries in one block (`--xla_multiheap_size_constraint_per_heap=-1`) and split into blocks
  of at most 32 MiB (`runtime.CPU_FLAGS`, which every command sets);
- a 64 MiB block freed and allocated again, under glibc's defaults and after
  `runtime.tune_host_allocator`.
Writes results/host_memory.json and .md.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from common import write_results

ROOT = Path(__file__).resolve().parent.parent

STEP_FAULTS = textwrap.dedent("""
    import resource
    import jax
    from jaxpar.config import load_config
    from jaxpar.mesh import make_mesh, parse_mesh, prepare
    from jaxpar.placement import Placement
    from jaxpar.train.step import Trainer

    spec = prepare(parse_mesh("data=1"), tune_runtime=True)  # what every command does first
    config = load_config(None, ["model.layers=2", "model.dim=256", "model.mlp_dim=512",
                                "train.batch_size=16", "train.seq_len=128"])
    tr = Trainer(Placement(config, make_mesh(spec)))
    assert tr.compile()[0].memory_analysis().temp_size_in_bytes > 64 << 20
    state = tr.init_state()
    batch = jax.device_put(jax.numpy.ones(tr.batch_shape(), "int32"), tr.placement.batch_sharding)
    faults = []
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(2):  # one step queued behind another, as the training loop runs
            state, m = tr.step(state, batch)
        jax.block_until_ready(m)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(sorted(faults[2:])[3] // 2)  # per step, the median round after the first ones
""")

BLOCK_FAULTS = textwrap.dedent("""
    import ctypes, resource, sys
    from jaxpar import runtime
    if sys.argv[1] == "tuned":
        assert runtime.tune_host_allocator()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    def faults_of_a_fresh_block():  # as XLA allocates a step's temporaries
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(64 << 20)
        ctypes.memset(block, 1, 64 << 20)
        libc.free(block)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    faults_of_a_fresh_block()
    print(faults_of_a_fresh_block())
""")


def _faults(script: str, args: list[str], xla_flags: str | None = None) -> int:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                         env=env, check=True)  # fmt: skip
    return int(out.stdout)


def main() -> None:
    rows = [
        {"what": "train step, temporaries in one block", "faults": _faults(
            STEP_FAULTS, [], "--xla_multiheap_size_constraint_per_heap=-1")},
        {"what": "train step, runtime.CPU_FLAGS (32 MiB blocks)",
         "faults": _faults(STEP_FAULTS, [], "")},
        {"what": "64 MiB block again, glibc defaults",
         "faults": _faults(BLOCK_FAULTS, ["default"])},
        {"what": "64 MiB block again, tune_host_allocator",
         "faults": _faults(BLOCK_FAULTS, ["tuned"])},
    ]  # fmt: skip
    write_results("host_memory", rows, ["what", "minor page faults"],
                  lambda r: [r["what"], r["faults"]])  # fmt: skip


if __name__ == "__main__":
    main()
