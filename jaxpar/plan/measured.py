"""Measured train steps (`measured.yaml`), the planner's prediction of each, and the fit of a
profile's rates to them.

A profile's `sustained_tflops` and `attention_tflops` are the two rates that make the cost model's
step times match measured ones: each run's predicted time is linear in their inverses (the
matmul FLOPs over the one, cuDNN's attention FLOPs over the other, plus what does not depend on
them: per-layer overhead, exposed traffic, redone elementwise bytes), so `fit_rates` solves for
them by least squares on the relative error. The shipped GPU profiles are that fit over the runs
marked `fit`; `jaxpar plan --calibrate` fits its own reference steps the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from jaxpar.config import Config, load_config
from jaxpar.errors import JaxparError
from jaxpar.mesh import MeshSpec, parse_mesh
from jaxpar.plan.cost import (
    Estimate,
    attention_impl,
    compute_dtype_for,
    estimate,
    outer_flops,
    stack_flops,
)
from jaxpar.plan.hardware import Hardware, load_hardware
from jaxpar.plan.space import Candidate

MEASURED = Path(__file__).parent / "measured.yaml"


@dataclass(frozen=True)
class MeasuredRun:
    """One measured train step: where, what, how laid out, and how long it took."""

    hardware: str
    devices: int
    model: str
    overrides: tuple[str, ...]  # the model's keys
    batch: int
    seq: int
    remat: str
    step_s: float
    source: str
    date: str
    fit: bool = False
    mesh: str = ""  # "" : all devices on `data`
    schedule: str = "gpipe"
    microbatches: int = 1
    dtype: str = "bfloat16"  # the compute dtype

    @property
    def name(self) -> str:
        return f"{self.model} {self.batch} x {self.seq:,} remat={self.remat} on {self.devices}"

    def config(self) -> Config:
        return load_config(None, [
            *self.overrides, f"train.batch_size={self.batch}", f"train.seq_len={self.seq}",
            f"train.dtype={self.dtype}", f"model.remat={self.remat}",
        ])  # fmt: skip

    def candidate(self) -> Candidate:
        spec = parse_mesh(self.mesh) if self.mesh else MeshSpec(data=self.devices)
        return Candidate(*spec.sizes, False, self.schedule, self.microbatches, 1, self.remat)


def measured_runs(path: Path = MEASURED) -> list[MeasuredRun]:
    """The runs of `measured.yaml`, each with its model's keys."""
    raw = yaml.safe_load(path.read_text())
    models: dict[str, list[str]] = raw["models"]
    return [MeasuredRun(overrides=tuple(models[r["model"]]), **_fields(r)) for r in raw["runs"]]


def _fields(raw: dict[str, Any]) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(MeasuredRun)}
    return {k: v for k, v in raw.items() if k in known}


def predict(run: MeasuredRun, hw: Hardware | None = None) -> Estimate:
    """The cost model's estimate of `run` on its profile (or `hw`)."""
    return estimate(run.config(), run.candidate(), hw or load_hardware(run.hardware))


def _terms(run: MeasuredRun, hw: Hardware) -> tuple[float, float, float]:
    """(matmul FLOPs at the sustained rate, attention FLOPs at the kernel's rate, the seconds
    that depend on neither) of `run`'s predicted step on `hw`."""
    config, candidate = run.config(), run.candidate()
    dtype = compute_dtype_for(config.train.dtype, hw)
    impl = attention_impl(config, hw)
    stack = stack_flops(config, candidate, impl, 4 if dtype == "float32" else 2)
    kernel = stack.attention if impl == "cudnn" else 0.0
    matmuls = stack.total - kernel + outer_flops(candidate.apply(config), candidate.spec)
    e = estimate(config, candidate, hw)
    rest = e.step_s - matmuls / hw.sustained_flops(dtype) - kernel / hw.attention_flops(dtype)
    return matmuls, kernel, rest


def fit_rates(hw: Hardware, runs: list[MeasuredRun], dtype: str = "bfloat16") -> Hardware:
    """`hw` with the sustained and attention rates in `dtype` that fit `runs` (least squares on
    each run's relative error); one rate for both where no run uses cuDNN's kernel.

    Raises:
        JaxparError: no runs, or a fit that is not a positive rate (the runs contradict the
            model: a longer step with less work).
    """
    if not runs:
        raise JaxparError("no measured runs to fit the profile's rates to")
    terms = np.array([_terms(r, hw) for r in runs])
    measured = np.array([r.step_s for r in runs])
    kernel = bool(terms[:, 1].any())
    columns = terms[:, :2] if kernel else terms[:, :1] + terms[:, 1:2]
    inverse, *_ = np.linalg.lstsq(columns / measured[:, None], 1 - terms[:, 2] / measured,
                                  rcond=None)  # fmt: skip
    if (inverse <= 0).any():
        raise JaxparError(f"the measured runs give no positive rates on {hw.name}: {inverse}")
    sustained, attention = float(1 / inverse[0] / 1e12), float(1 / inverse[-1] / 1e12)
    return dataclasses.replace(
        hw,
        sustained_tflops={**hw.sustained_tflops, dtype: sustained},
        attention_tflops={**hw.attention_tflops, dtype: attention} if kernel else {},
    )
