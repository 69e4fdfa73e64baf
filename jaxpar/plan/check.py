"""The compile check: a candidate's train step compiled ahead of time (nothing runs), and its
estimate redone with what XLA assigned and the collectives it emitted.

The step is compiled for the devices present (on a CPU host, simulated ones) in the profile's
compute dtype. For an accelerator's profile checked on CPU that is the same program but XLA:CPU's
buffer assignment, and XLA:CPU moves bfloat16 all-reduces as float32; the compiled memory and
traffic are what this compiler allocates and emits, and its attention is XLA's path where the
profile's devices would run cuDNN's kernel (a note says so).
"""

from __future__ import annotations

import dataclasses

from jaxpar.config import Config
from jaxpar.plan.cost import Estimate, attention_impl, comm_terms, compute_dtype_for, step_time
from jaxpar.plan.hardware import Hardware


def compile_check(config: Config, estimate: Estimate, hw: Hardware) -> Estimate:
    """`estimate` with the compiled peak memory and the compiled collectives in place of the
    model's; `fits` against the profile's memory, with a note when it no longer does."""
    from jaxpar.analysis.report import compiled_figures
    from jaxpar.mesh import make_mesh
    from jaxpar.placement import Placement
    from jaxpar.train.step import Trainer

    c = estimate.candidate
    dtype = compute_dtype_for(config.train.dtype, hw)  # the profile's, whatever runs the compile
    placement = Placement(c.apply(config).replace(**{"train.dtype": dtype}), make_mesh(c.spec))
    figures = compiled_figures(Trainer(placement))
    memory = figures.memory
    comm = comm_terms(figures.collectives, c.spec, hw)
    hidden_s, step_s = step_time(estimate.compute_s, estimate.overhead_s, comm, hw,
                                 estimate.attention_s, c.context)  # fmt: skip
    fits = memory.peak_bytes <= hw.memory_bytes
    notes = list(estimate.notes)
    runs = attention_impl(config, hw)
    if placement.attention != runs:
        notes.append(
            f"compiled with attention={placement.attention} on this host; the profile's devices "
            f"run {runs}, whose memory the estimate counts"
        )
    if not fits:
        notes.append(
            f"dropped: compiled peak {memory.peak_bytes / 2**30:,.2f} GiB exceeds the profile's "
            f"{hw.memory_gib:g} GiB (estimate {estimate.memory_bytes / 2**30:,.2f} GiB)"
        )
    tokens = estimate.tokens_per_s * estimate.step_s
    return dataclasses.replace(
        estimate,
        memory={**estimate.memory, "compiled_peak_bytes": memory.peak_bytes},
        memory_bytes=memory.peak_bytes,
        comm=comm,
        hidden_s=hidden_s,
        step_s=step_s,
        tokens_per_s=tokens / step_s,
        mfu=estimate.mfu * estimate.step_s / step_s,
        fits=fits,
        compiled=True,
        notes=notes,
    )
