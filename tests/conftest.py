"""Eight simulated CPU devices, set before JAX is imported anywhere in the test session."""

import os
import re
import tempfile

# The device count replaces any the environment holds (never a second one next to it), so that the
# xdist workers and the jaxpar subprocesses the tests start (they inherit this environment) see the
# same flags, and so the same keys in the compilation cache below.
# No multiheap split of XLA:CPU's temporaries (`runtime.CPU_FLAGS`, which every command sets):
# jax cannot serialize an executable whose temporaries are split into several buffers ("Multiple
# temp buffer allocations found"), so a step with over 32 MiB of temporaries per device would
# never reach the cache (few of the tests' tiny models get there). The split only changes
# where XLA places temporaries, never a value: losses and gradient norms of `jaxpar train` on
# data=2,pipeline=2,tensor=2 are bit-identical with and without it. Its own effect (fewer page
# faults) is `runtime`'s to show, in experiments/.
_FLAGS = {
    "xla_force_host_platform_device_count": "8",
    "xla_multiheap_size_constraint_per_heap": "-1",
}
_kept = re.sub(rf"--({'|'.join(_FLAGS)})=\S*", "", os.environ.get("XLA_FLAGS", "")).split()
os.environ["XLA_FLAGS"] = " ".join([*_kept, *(f"--{k}={v}" for k, v in _FLAGS.items())])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
from jaxpar import runtime  # noqa: E402

runtime.xla_flags()  # as `jaxpar.mesh.prepare` does for every command (adds none of _FLAGS)
# One persistent compilation cache for the whole session, shared by the xdist workers and the
# jaxpar subprocesses the tests start (they inherit the environment): many tests compile the same
# step, and the suite's time is mostly XLA compiling. Cached executables are keyed by the program,
# the devices and the flags, so a hit runs exactly what a compile would have produced.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxpar-tests-xla-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

assert jax.device_count() == 8, "tests need 8 simulated CPU devices"
runtime.tune_host_allocator()  # as `jaxpar.mesh.prepare` does for every command

# Test files by their measured time, slowest first (`pytest --durations=0` summed per file, on this
# 2-core host, 2026-12-05: test_pipeline 174 s, test_serve 136, test_analyze 134, ...).
# `--dist loadfile --no-loadscope-reorder` hands the files to the workers in this order, so the
# long ones start first and the short ones fill the gaps at the end. The order also lets the
# compilation cache serve later files: test_comm and test_plan_traffic compile test_analyze's
# steps again (`sizes.TRAFFIC`), test_schedules test_pipeline's sequential reference. A file not
# listed runs after these: list every file that takes more than a few seconds (a 38-second file
# left to the end kept one worker busy 30 s after the other had finished).
SLOWEST_FIRST = (
    "test_pipeline.py",
    "test_serve.py",
    "test_parallel.py",
    "test_analyze.py",
    "test_checkpoint.py",
    "test_schedule_memory.py",
    "test_schedules.py",
    "test_distributed.py",
    "test_attention.py",
    "test_context.py",
    "test_faults.py",
    "test_plan_traffic.py",
    "test_infer.py",
    "test_balance.py",
    "test_speed.py",
    "test_plan.py",
    "test_comm.py",
    "test_cli.py",
    "test_mesh.py",
    "test_hf.py",
    "test_imports.py",
    "test_sharding.py",
    "test_data.py",
    "test_config.py",
)


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order
