"""`jaxpar export-hf`: a run folder's newest checkpoint written as a Hugging Face Llama folder."""

from __future__ import annotations

from pathlib import Path

import jax

from jaxpar.errors import JaxparError
from jaxpar.infer.load import Warn, restore_run, warn_on_stderr
from jaxpar.mesh import make_mesh, parse_mesh
from jaxpar.runs import CHECKPOINTS, check_run_dir


def export_run(run: Path, dest: Path, warn: Warn = warn_on_stderr) -> Path:
    """Exports the newest intact checkpoint of a `jaxpar train --out RUN` directory as a Hugging
    Face Llama folder.

    The parameters are restored onto one device (the run's mesh and pipeline settings are
    dropped: checkpoints hold the logical layout) and written with context = train.seq_len.

    Returns:
        `dest`.

    Raises:
        JaxparError: no run directory, no config.yaml, no checkpoints, or a `dest` that is taken.
    """
    from jaxpar.interop.hf import export_hf

    run, dest = Path(run), Path(dest)
    check_run_dir(run)
    mesh = make_mesh(parse_mesh("data=1"), devices=jax.devices()[:1])
    restored = restore_run(run, mesh, "float32", warn)
    if restored is None:
        raise JaxparError(f"{str(run / CHECKPOINTS)!r} holds no checkpoint to export")
    placement, params, _ = restored
    export_hf(placement, params, dest, context=placement.config.train.seq_len)
    return dest
