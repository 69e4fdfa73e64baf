"""`jaxpar plan --calibrate`: measure the devices present and write a hardware profile.

Each measurement is the median of a few timed runs after a warm-up:
- the matmul rate per device and dtype: every device multiplies its own square matrices at once
  (a batched matmul sharded over all devices), so devices that share a host's cores, as simulated
  CPU devices do, are measured as they run in a step;
- a reference train step (4 layers, d=256, data-parallel over every device) with one and with
  four micro-batches: the difference, at equal FLOPs, is the fixed cost of the 24 extra layer
  passes (`layer_overhead_us`);
- the rates a step reaches in the platform's compute dtype (the other dtype's sustained rate is
  scaled by the matmul rates' ratio), fitted to measured steps as the shipped GPU profiles are
  (`jaxpar.plan.measured.fit_rates`): on a CPU the one-micro-batch reference step; on a GPU four
  layers of the 1.1B Llama at 8 x 2,048 tokens per device without recomputation and at 1 x 16,384
  with full recomputation, which tell the sustained rate and cuDNN's attention kernel's apart;
- the bus bandwidth of an all-reduce over all devices (NCCL's convention: 2 (g - 1) / g of the
  array per device over the time);
- the latency of a collective: an all-reduce of one number.
The devices present are taken as one node (both links get the measured figures). The peak is the
datasheet's where `jaxpar.train.bench` knows the chip, else the measured rate.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable

from jaxpar.plan.hardware import DTYPES, Hardware, Link, peak_flops
from jaxpar.plan.measured import MeasuredRun, fit_rates


def _median_s(run: Callable[[], object], repeats: int) -> float:
    import jax

    jax.block_until_ready(run())  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_flops(dtype: str, size: int, repeats: int = 5) -> float:
    """Sustained matmul FLOP/s of one device while every device runs its own [size, size]^2."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("all",))
    sharding = NamedSharding(mesh, PartitionSpec("all"))
    keys = jax.random.split(jax.random.key(0), 2)
    a, b = (
        jax.device_put(jax.random.normal(k, (n, size, size), dtype=jnp.dtype(dtype)), sharding)
        for k in keys
    )
    f = jax.jit(lambda a, b: jnp.einsum("nij,njk->nik", a, b), out_shardings=sharding)
    seconds = _median_s(lambda: f(a, b), repeats)
    return 2 * size**3 / seconds


def allreduce_seconds(elements: int, repeats: int = 5) -> float:
    """Seconds of one float32 all-reduce of `elements` per device over all devices."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("all",))
    x = jax.device_put(
        jnp.ones((n, elements), jnp.float32), NamedSharding(mesh, PartitionSpec("all"))
    )
    f = jax.jit(
        jax.shard_map(
            lambda x: jax.lax.psum(x, "all"), mesh=mesh, in_specs=PartitionSpec("all"),
            out_specs=PartitionSpec("all"),
        )
    )  # fmt: skip
    return _median_s(lambda: f(x), repeats)


REFERENCE = [
    "model.layers=4", "model.dim=256", "model.heads=8", "model.kv_heads=8", "model.mlp_dim=768",
    "model.vocab=256", "pipeline.schedule=gpipe",
]  # fmt: skip
# On GPUs, four layers of the 1.1B Llama of `measured.yaml` at the two shapes that tell its rates
# apart: a short sequence (the matmuls) and a long one (cuDNN's attention kernel).
GPU_REFERENCE = [
    "model.layers=4", "model.dim=2048", "model.heads=32", "model.kv_heads=4",
    "model.mlp_dim=5632", "model.vocab=32000", "pipeline.schedule=gpipe",
]  # fmt: skip
GPU_SHAPES = [(8, 2048, "none"), (1, 16384, "full")]  # rows per device, sequence, remat


def reference_run(name: str, model: list[str], rows: int, seq: int, remat: str, dtype: str,
                  microbatches: int = 1) -> MeasuredRun:  # fmt: skip
    """A train step of `model` data-parallel over every device (`rows` per device), timed by
    `jaxpar.train.bench`, as a measured run of this host."""
    import jax

    from jaxpar.mesh import MeshSpec, make_mesh
    from jaxpar.placement import Placement
    from jaxpar.train.bench import bench
    from jaxpar.train.step import Trainer

    n = jax.device_count()
    run = MeasuredRun(
        hardware=name, devices=n, model="reference",
        overrides=(*model, f"pipeline.microbatches={microbatches}"), batch=rows * n, seq=seq,
        remat=remat, step_s=0.0, source="jaxpar plan --calibrate", date=time.strftime("%Y-%m-%d"),
        dtype=dtype, microbatches=microbatches,
    )  # fmt: skip
    config = run.config().replace(**{"parallel.mesh": f"data={n}"})
    result = bench(Trainer(Placement(config, make_mesh(MeshSpec(data=n)))), steps=4, warmup=1)
    return dataclasses.replace(run, step_s=result.median_step_s)


def _memory_gib(device) -> float:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return stats["bytes_limit"] / 2**30
    import jax

    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # CPU: the host's share
    return host / jax.local_device_count() / 2**30


def calibrate(name: str, progress: Callable[[str], None] = lambda line: None) -> Hardware:
    """Measures the devices JAX sees and returns their profile."""
    import jax

    device = jax.devices()[0]
    cpu = device.platform == "cpu"
    sizes = {"float32": 512 if cpu else 8192, "bfloat16": 256 if cpu else 8192}
    sustained = {}
    for dtype in DTYPES:
        sustained[dtype] = matmul_flops(dtype, sizes[dtype]) / 1e12
        progress(f"matmul {dtype}: {sustained[dtype]:,.3f} TFLOP/s per device")
    datasheet = {d: peak_flops(device.device_kind, d) for d in DTYPES}
    peak = {d: (datasheet[d] or sustained[d] * 1e12) / 1e12 for d in DTYPES}
    n = jax.device_count()
    if n > 1:
        elements = 2**20 if cpu else 2**26
        seconds = allreduce_seconds(elements)
        latency = allreduce_seconds(1)
        bus = 2 * (n - 1) / n * 4 * elements / max(seconds - latency, 1e-9)
        link = Link(gbytes_per_s=round(bus / 1e9, 3), latency_us=round(latency * 1e6, 1))
        progress(f"all-reduce over {n} devices: {link.gbytes_per_s:,.2f} GB/s bus bandwidth, "
                 f"{link.latency_us:,.1f} us latency")  # fmt: skip
    else:
        link = Link(gbytes_per_s=1e3, latency_us=0.0)  # one device: nothing to measure
        progress("one device: no collectives to measure")
    from jaxpar.placement import compute_dtype

    step_dtype = compute_dtype("auto").name
    one = reference_run(name, REFERENCE, 4, 128, "none", step_dtype)
    four = reference_run(name, REFERENCE, 4, 128, "none", step_dtype, microbatches=4)
    layers = one.config().model.layers
    overhead = max(four.step_s - one.step_s, 0.0) / (2 * layers * (4 - 1))  # F and B, 3 more M
    layer_overhead_us = round(overhead * 1e6, 1)
    progress(f"reference step: {one.step_s * 1e3:,.1f} ms with 1 micro-batch, "
             f"{four.step_s * 1e3:,.1f} ms with 4: {layer_overhead_us:,.1f} us per layer pass")
    runs = [one]
    if device.platform == "gpu":
        runs = []
        for rows, seq, remat in GPU_SHAPES:
            runs.append(reference_run(name, GPU_REFERENCE, rows, seq, remat, step_dtype))
            progress(f"reference step at {rows} x {seq:,} per device, remat={remat}: "
                     f"{runs[-1].step_s * 1e3:,.1f} ms")  # fmt: skip
    measured = Hardware(name, "", 1.0, peak, sustained, n, link, link, 0.0, overhead * 1e6,
                        platform=device.platform)  # fmt: skip
    fitted = fit_rates(measured, runs, step_dtype)
    scale = fitted.sustained_tflops[step_dtype] / sustained[step_dtype]
    sustained = {d: v * scale for d, v in sustained.items()}
    progress(f"sustained in a step: {sustained[step_dtype]:,.4f} TFLOP/s per device in "
             f"{step_dtype}" + "".join(f", attention kernel {v:,.1f}"
                                       for v in fitted.attention_tflops.values()))  # fmt: skip
    return Hardware(
        name=name,
        description=f"{n} x {device.device_kind}, calibrated by jaxpar plan --calibrate",
        memory_gib=round(_memory_gib(device), 2),
        peak_tflops={d: round(v, 6) for d, v in peak.items()},
        sustained_tflops={d: round(v, 6) for d, v in sustained.items()},
        devices_per_node=n,
        node_link=link,
        network_link=link,
        overlap=0.0 if cpu else 0.8,
        layer_overhead_us=layer_overhead_us,
        peak_source="datasheet" if all(datasheet.values()) else "measured",
        platform=device.platform,
        attention_tflops={d: round(v, 1) for d, v in fitted.attention_tflops.items()},
    )
