"""`jaxpar bench`: the train step's speed on this host, and its MFU where the chip's peak is known.

Runs `warmup` steps (the first includes nothing but the step: compilation is timed apart), then
`steps` more, each timed to the moment its loss is on the host; the median is the step time. MFU is
the model's matmul FLOPs per step (`model_flops`: the forward and backward matmuls, attention
included, none of the overhead a layout adds) over the step time and the devices' dense peak.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from jaxpar.analysis.flops import model_flops
from jaxpar.data import Corpus, global_batch
from jaxpar.train.step import Trainer

# Dense peak FLOP/s per chip by compute dtype, from the vendors' data sheets (SXM parts; without
# 2:4 sparsity). Matched against `device_kind` in this order.
PEAK_FLOPS = {
    "H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
    "H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
    "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12},
}


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """The chip's dense peak for `dtype`, or None for chips (and CPUs) not in the table."""
    for name, peaks in PEAK_FLOPS.items():
        if name in device_kind:
            return peaks.get(dtype)
    return None


@dataclass(frozen=True)
class BenchResult:
    device_kind: str
    devices: int
    mesh: str
    dtype: str
    model_params: int
    tokens_per_step: int
    steps: int
    warmup: int
    compile_s: float
    step_times_s: list[float]
    median_step_s: float
    tokens_per_s: float
    model_flops_per_step: int
    achieved_flops_per_device: float
    peak_flops_per_device: float | None
    mfu: float | None
    first_loss: float
    last_loss: float

    def to_json(self) -> dict:
        return asdict(self)


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
    losses, times = [], []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        state, metrics = trainer.step(state, batch)
        loss = float(metrics["loss"])  # waits for the step
        if i >= warmup:
            times.append(time.perf_counter() - start)
            losses.append(loss)
            if progress is not None:
                progress(i - warmup, times[-1])
    median = statistics.median(times)
    device = mesh.devices.flat[0]
    flops = model_flops(config.model, t.batch_size, t.seq_len)
    n = mesh.devices.size
    peak = peak_flops(device.device_kind, placement.dtype.name)
    achieved = flops / median / n
    return BenchResult(
        device_kind=device.device_kind,
        devices=n,
        mesh=str(config.parallel.mesh),
        dtype=placement.dtype.name,
        model_params=config.model.num_params,
        tokens_per_step=t.batch_size * t.seq_len,
        steps=steps,
        warmup=warmup,
        compile_s=compile_s,
        step_times_s=times,
        median_step_s=median,
        tokens_per_s=t.batch_size * t.seq_len / median,
        model_flops_per_step=flops,
        achieved_flops_per_device=achieved,
        peak_flops_per_device=peak,
        mfu=achieved / peak if peak else None,
        first_loss=losses[0],
        last_loss=losses[-1],
    )
