"""Eight simulated CPU devices, set before JAX is imported anywhere in the test session."""

import os
import tempfile

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
from jaxpar import runtime  # noqa: E402

runtime.xla_flags()  # as `jaxpar.mesh.prepare` does for every command (the same compiled programs)
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
