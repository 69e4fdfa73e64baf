"""`jaxpar bench`: the train step's speed on this host, and its MFU and HFU where the chip's peak
is known.

Runs `warmup` steps (compilation is timed apart), then `steps` more, queued as the training loop
queues them: step i + 1 is dispatched before step i's loss is read, so the host never idles the
devices. A step's time is the time between the moments two consecutive losses reach the host (in
the steady state, the devices' time per step, what MaxText's step time measures too); the median
is the step time.

- MFU: the model's matmul FLOPs per step, with attention's causal half (`model_flops(causal=True)`,
  MaxText's convention), over the step time and the devices' dense datasheet peak (from the
  hardware profiles, `jaxpar.plan.hardware.peak_flops`). Nothing a layout adds
  (bubbles, padding, recomputation) counts.
- HFU: the matmul FLOPs the program runs: the model's as its attention computes them (every key
  position on the XLA path, the causal half in cuDNN's kernel) plus what `model.remat` recomputes
  (`recompute_flops`). Pipeline bubbles do not count (GPipe's idle ticks compute and drop a job).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import jax

from jaxpar.analysis.flops import model_flops, recompute_flops
from jaxpar.data import Corpus, global_batch
from jaxpar.plan.hardware import peak_flops
from jaxpar.train.step import Trainer


@dataclass(frozen=True)
class BenchResult:
    device_kind: str
    devices: int
    mesh: str
    dtype: str
    attention: str
    remat: str
    model_params: int
    tokens_per_step: int
    steps: int
    warmup: int
    compile_s: float
    step_times_s: list[float]
    median_step_s: float
    tokens_per_s: float
    model_flops_per_step: int
    hardware_flops_per_step: int
    achieved_flops_per_device: float
    peak_flops_per_device: float | None
    mfu: float | None
    hfu: float | None
    first_loss: float
    last_loss: float

    def to_json(self) -> dict:
        return asdict(self)


def step_flops(trainer: Trainer) -> tuple[int, int]:
    """(model, hardware) matmul FLOPs of one train step, as the module docstring defines them."""
    placement = trainer.placement
    m, t = placement.config.model, placement.config.train
    impl = placement.attention
    model = model_flops(m, t.batch_size, t.seq_len, causal=True)
    hardware = model_flops(m, t.batch_size, t.seq_len, causal=impl == "cudnn")
    hardware += recompute_flops(m, t.batch_size, t.seq_len, m.remat, impl)
    return model, hardware


def bench(
    trainer: Trainer,
    steps: int,
    warmup: int = 2,
    progress: Callable[[int, float], None] | None = None,
) -> BenchResult:
    """Times `steps` train steps after `warmup` untimed ones, on the config's data.

    `progress(i, seconds)` is called after each timed step."""
    placement = trainer.placement
    config, mesh = placement.config, placement.mesh
    t = config.train
    corpus = Corpus.from_glob(config.data.path)
    corpus.check_fits(t.seq_len)
    shape = trainer.batch_shape()
    sharding = placement.batch_sharding
    batches = [global_batch(corpus, t.seed, i, shape, sharding) for i in range(warmup + steps)]
    _, compile_s = trainer.compile()
    state = trainer.init_state()
    jax.block_until_ready(state)
    losses, times, queued = [], [], []
    last = time.perf_counter()

    def read(i: int) -> None:
        """Waits for step i's loss; times it from the step before."""
        nonlocal last
        loss = float(queued[i])
        now, start = time.perf_counter(), last
        last = now
        if i >= warmup:
            times.append(now - start)
            losses.append(loss)
            if progress is not None:
                progress(i - warmup, times[-1])

    for i, batch in enumerate(batches):
        state, metrics = trainer.step(state, batch)
        queued.append(metrics["loss"])
        if i:
            read(i - 1)  # while step i runs
    read(len(batches) - 1)
    median = statistics.median(times)
    device = mesh.devices.flat[0]
    n = mesh.devices.size
    flops, hardware = step_flops(trainer)
    peak = peak_flops(device.device_kind, placement.dtype.name)
    achieved = flops / median / n
    return BenchResult(
        device_kind=device.device_kind,
        devices=n,
        mesh=str(config.parallel.mesh),
        dtype=placement.dtype.name,
        attention=placement.attention,
        remat=config.model.remat,
        model_params=config.model.num_params,
        tokens_per_step=t.batch_size * t.seq_len,
        steps=steps,
        warmup=warmup,
        compile_s=compile_s,
        step_times_s=times,
        median_step_s=median,
        tokens_per_s=t.batch_size * t.seq_len / median,
        model_flops_per_step=flops,
        hardware_flops_per_step=hardware,
        achieved_flops_per_device=achieved,
        peak_flops_per_device=peak,
        mfu=achieved / peak if peak else None,
        hfu=hardware / median / n / peak if peak else None,
        first_loss=losses[0],
        last_loss=losses[-1],
    )
