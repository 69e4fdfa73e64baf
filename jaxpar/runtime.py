"""Process-wide settings of the runtime under JAX that jaxpar applies as JAX starts.

`jaxpar.mesh.prepare` calls both, so every command and experiment gets them:

- `gpu_flags`, before JAX starts on a GPU host: XLA's flags for training throughput, the set
  NVIDIA's JAX-Toolbox and MaxText run LLMs with (`GPU_FLAGS` says what each does). A flag already
  in the user's `XLA_FLAGS` is left as the user set it. Nothing is added where no GPU plugin is
  installed, so a CPU process's compilation cache keys stay as they were.
- `tune_host_allocator`, once JAX runs on CPU devices: on a CPU backend XLA allocates each
  execution's temporaries as one block per device, and glibc serves a block above 32 MiB (its
  largest mmap threshold) with a fresh `mmap`, which the kernel zero-fills page by page on first
  touch and takes back at `free`. A train step whose activations need 44 MiB per device then
  page-faults about 350 MiB per step on 8 simulated devices: 0.2 s of kernel time per step, as
  much as the step's own work. With mmap off and the heaps kept, each step reuses the memory the
  last one freed. Only where the memory lives changes, never a value computed.
"""

from __future__ import annotations

import ctypes
import os
import pkgutil
import platform
import re

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

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4


def _gpu_plugin_installed() -> bool:
    """A CUDA or ROCm PJRT plugin is installed and JAX_PLATFORMS does not rule GPUs out."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms and not re.search(r"cuda|rocm|gpu", platforms):
        return False
    try:
        import jax_plugins
    except ImportError:
        return False
    names = (m.name for m in pkgutil.iter_modules(jax_plugins.__path__))
    return any(n.startswith(("xla_cuda", "xla_rocm")) for n in names)


def gpu_flags(environ: dict[str, str] | os._Environ = os.environ) -> list[str]:
    """Appends `GPU_FLAGS` to `XLA_FLAGS` (those it does not set already) on a host with a GPU
    plugin; call before JAX starts. Returns the flags added."""
    if not _gpu_plugin_installed():
        return []
    current = environ.get("XLA_FLAGS", "")
    added = [f"--{k}={v}" for k, v in GPU_FLAGS.items() if f"--{k}=" not in current]
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
