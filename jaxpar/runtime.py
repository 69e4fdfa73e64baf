"""Process-wide settings of the runtime under JAX that jaxpar's commands apply as JAX starts.

`jaxpar.mesh.prepare(spec, devices, tune_runtime=True)` calls both: every `jaxpar` command and
experiment does. A program that imports jaxpar as a library gets neither unless it passes
`tune_runtime=True` (or calls the two functions itself, as the tests' conftest does), since both
change the whole process: its `XLA_FLAGS` and its C allocator.

- `xla_flags`, before JAX starts: XLA flags for the platform it will run on (a flag already in the
  user's `XLA_FLAGS` is left as the user set it).
  - On a GPU host (a CUDA or ROCm plugin installed): `GPU_FLAGS`, the set NVIDIA's JAX-Toolbox
    and MaxText train LLMs with (each commented below).
  - Where no accelerator plugin is installed (CPU): `CPU_FLAGS`, below.
- `tune_host_allocator`, once JAX runs on CPU devices.

Why the CPU settings: XLA's CPU runtime allocates each execution's temporaries (activations kept
for the backward pass, mostly) as one block per device, and glibc serves a block above 32 MiB with
a fresh `mmap`, which the kernel zero-fills page by page on first touch and takes back at `free`.
A train step whose temporaries take 44 MiB per device then page-faults about 350 MiB per step on 8
simulated devices: 0.2 s of kernel time per step, as much as the step's own work. So XLA splits the
temporaries into blocks of at most 32 MiB, and glibc keeps freed blocks in its heaps (no mmap, no
trimming; a thread's heap holds blocks up to 64 MiB), so that each step reuses the memory the last
one freed. Only where buffers live changes, never a value computed. What it costs: freed memory
stays with the process, and each allocating thread's heap grows to what the steps it ran needed
(seen: 1.1 GiB resident instead of 0.8 for a step with 200 MiB of temporaries).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import pkgutil
import platform

# XLA's GPU flags jaxpar sets, and why (defaults of XLA at jax 0.10-0.12 otherwise).
GPU_FLAGS = {
    # Schedules each collective as early, and its use as late, as the data allow, so that
    # gradient reductions and FSDP gathers overlap the matmuls around them.
    "xla_gpu_enable_latency_hiding_scheduler": "true",
    # Collectives on their own high-priority stream, so compute kernels do not starve them.
    "xla_gpu_enable_highest_priority_async_stream": "true",
    # FSDP inside a scan over layers: the next layer's all-gather and the last one's
    # reduce-scatter move out of the loop body's critical path, double-buffered.
    "xla_gpu_enable_pipelined_all_gather": "true",
    "xla_gpu_enable_pipelined_reduce_scatter": "true",
    "xla_gpu_enable_pipelined_all_reduce": "true",
    "xla_gpu_enable_while_loop_double_buffering": "true",
    # Many small gradient reductions become a few large ones (bandwidth, not latency, bound).
    "xla_gpu_all_reduce_combine_threshold_bytes": str(256 << 20),
    "xla_gpu_all_gather_combine_threshold_bytes": str(64 << 20),
    "xla_gpu_reduce_scatter_combine_threshold_bytes": str(64 << 20),
}

CPU_FLAGS = {
    # Temporaries in blocks glibc's per-thread heaps can keep (see the module docstring).
    "xla_multiheap_size_constraint_per_heap": str(32 << 20),
}

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4


def _plugins(platforms: tuple[str, ...]) -> bool:
    """A PJRT plugin for one of `platforms` is installed and JAX_PLATFORMS does not rule it out."""
    allowed = os.environ.get("JAX_PLATFORMS", "")
    if allowed and not any(p in allowed for p in (*platforms, "gpu")):
        return False
    try:
        import jax_plugins
    except ImportError:
        names: list[str] = []
    else:
        names = [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
    if "tpu" in platforms and importlib.util.find_spec("libtpu") is not None:
        return True
    return any(n.startswith(tuple(f"xla_{p}" for p in platforms)) for n in names)


def gpu_plugin_installed() -> bool:
    """A CUDA or ROCm plugin is installed and `JAX_PLATFORMS` lets JAX use it."""
    return _plugins(("cuda", "rocm"))


def accelerator_plugin_installed() -> bool:
    """A GPU or TPU plugin is installed and `JAX_PLATFORMS` lets JAX use it."""
    return _plugins(("cuda", "rocm", "tpu"))


def xla_flags(environ: dict[str, str] | os._Environ = os.environ) -> list[str]:
    """Appends `GPU_FLAGS` on a host with a GPU plugin, `CPU_FLAGS` on one with no accelerator
    plugin, to `XLA_FLAGS` (those it does not set already); call before JAX starts. Returns the
    flags added."""
    if gpu_plugin_installed():
        flags = GPU_FLAGS
    elif not accelerator_plugin_installed():
        flags = CPU_FLAGS
    else:
        return []
    current = environ.get("XLA_FLAGS", "")
    added = [f"--{k}={v}" for k, v in flags.items() if f"--{k}=" not in current]
    if added:
        environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added


def tune_host_allocator() -> bool:
    """Keeps freed memory in glibc's heaps instead of returning it to the kernel (see the module
    docstring). Returns whether the settings took (False off glibc, e.g. on macOS)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)
