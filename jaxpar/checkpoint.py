"""Checkpoints: orbax, asynchronous and atomic, in the logical layout, restorable onto any mesh.

A checkpoint holds the train state with the blocks in logical layer order ([L, ...], not stacked
by pipeline stage), so it restores onto any mesh, stage count, repeats and FSDP setting: the target
shardings are computed for the new placement and its stage layout is rebuilt after reading. Next to
the arrays a JSON item records the config, the mesh, the data position, the path of every array and
a checksum per array: the sum of its float32 bit patterns as uint32, wrapping, which is exact and
independent of the sharding and summation order, so a damaged file that still reads is caught too.
A restore may ask for part of the state (serving reads `{"params": ...}` alone, never the optimizer
moments); each part is checked against its own checksums.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jaxpar.config import architecture
from jaxpar.errors import JaxparError
from jaxpar.placement import Placement
from jaxpar.runs import CHECKPOINTS


@jax.jit
def _checksums(tree: Any) -> Any:
    """Per array, its float32 bit patterns summed as wrapping uint32: exact in any order."""

    def checksum(x: jax.Array) -> jax.Array:
        bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
        return jnp.sum(bits, dtype=jnp.uint32)

    return jax.tree.map(checksum, tree)


def _paths(tree: Any) -> list[str]:
    """'params/blocks/attn/wq_DNH', ... for every array of `tree`, in leaf order."""
    return [
        "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
        for path, _ in jax.tree_util.tree_leaves_with_path(tree)
    ]


@dataclass
class Checkpointer:
    """Saves and restores one run's train state under `OUT/checkpoints/`.

    Attributes:
        placement: the model and layout of this process's run.
        directory: OUT/checkpoints.
        target: what a restore reads, as ShapeDtypeStructs with this placement's shardings: the
            whole train state (`Trainer.abstract_state()`), or a dict of some of its fields
            (`{"params": ...}`), which reads only those.
        keep: how many of the newest checkpoints to keep.
    """

    placement: Placement
    directory: Path
    target: Any
    keep: int = 3

    def __post_init__(self) -> None:
        self.directory = Path(self.directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=self.keep, create=True, enable_async_checkpointing=True
            ),
        )
        self.partial = isinstance(self.target, dict)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- layout ------------------------------------------------------------------------------

    @cached_property
    def _logical_target(self) -> Any:
        return self.placement.logical_abstract(self.target)

    @cached_property
    def _to_logical(self) -> Callable:
        shardings = jax.tree.map(lambda x: x.sharding, self._logical_target)
        return jax.jit(
            lambda s: jax.tree.map(jnp.copy, self.placement.to_logical(s)),
            out_shardings=shardings,
        )

    @cached_property
    def _from_logical(self) -> Callable:
        shardings = jax.tree.map(lambda x: x.sharding, self.target)
        return jax.jit(self.placement.from_logical, out_shardings=shardings)

    def moved_to(self, placement: Placement, target: Any) -> None:
        """Saves and restores on `placement` from now on (the same model, its layers moved
        between stages: the logical layout on disk does not change)."""
        self.placement, self.target = placement, target
        for name in ("_logical_target", "_to_logical", "_from_logical"):
            self.__dict__.pop(name, None)

    def to_logical(self, state: Any) -> Any:
        """A copy of `state` (shaped like `target`) with the blocks in logical layer order
        (compiled once)."""
        with jax.set_mesh(self.placement.mesh):
            return self._to_logical(state)

    def from_logical(self, logical: Any) -> Any:
        with jax.set_mesh(self.placement.mesh):
            return self._from_logical(logical)

    def _checksums(self, logical: Any) -> list[int]:
        return [int(s) for s in jax.device_get(jax.tree.leaves(_checksums(logical)))]

    # -- save and restore --------------------------------------------------------------------

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Starts an asynchronous save of `state` (the whole train state) as checkpoint `step`;
        returns once the arrays are copied out of the way of the next (donating) train step."""
        logical = self.to_logical(state)
        meta = {**meta, "step": step, "paths": _paths(logical),
                "checksums": self._checksums(logical)}  # fmt: skip
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(logical), meta=ocp.args.JsonSave(meta)
            ),
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        """Complete checkpoints, oldest first (an unfinished save is never listed)."""
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def restore(self, step: int) -> tuple[Any, dict[str, Any]]:
        """Reads checkpoint `step` (the part `target` names) onto this placement.

        Raises:
            CorruptCheckpoint: it cannot be read, or its arrays don't match their checksums.
        """
        target = self._logical_target
        if self.partial:
            read = ocp.args.PyTreeRestore(
                item=target,
                restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True,
            )
        else:
            read = ocp.args.StandardRestore(target)
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=read, meta=ocp.args.JsonRestore())
            )
        except Exception as e:  # orbax and tensorstore raise many types for damaged files
            raise CorruptCheckpoint(f"checkpoint {step} cannot be read: {type(e).__name__}") from e
        logical, meta = restored["state"], restored["meta"]
        if self._checksums(logical) != self._expected_checksums(logical, meta):
            raise CorruptCheckpoint(f"checkpoint {step} does not match its checksums")
        return self.from_logical(logical), meta

    def _expected_checksums(self, logical: Any, meta: dict[str, Any]) -> list[int | None]:
        """The saved checksums of the arrays in `logical` (all of them, or the restored part)."""
        checksums = meta.get("checksums", [])
        if not self.partial:
            return checksums
        if "paths" not in meta:
            # Written before the paths were recorded: the checksums follow the train state's leaf
            # order, the step, then the parameters, then the optimizer state.
            if set(self.target) != {"params"}:
                return [None]
            return checksums[1 : 1 + len(jax.tree.leaves(logical))]
        saved = dict(zip(meta["paths"], checksums, strict=True))
        return [saved.get(path) for path in _paths(logical)]

    def read_meta(self, step: int) -> dict[str, Any]:
        try:
            return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
                "meta"
            ]
        except Exception as e:
            raise CorruptCheckpoint(f"checkpoint {step} has no readable metadata") from e

    def restore_latest(self, warn: Callable[[str], None]) -> tuple[Any, dict[str, Any]] | None:
        """The newest checkpoint that reads back intact; damaged ones are skipped with a warning.

        Returns None when there is no checkpoint at all.

        Raises:
            JaxparError: checkpoints exist but none is intact, or they hold another model than
                the placement's.
        """
        model = self.placement.config.model.architecture
        steps = self.steps()
        for step in reversed(steps):
            try:
                saved = architecture(self.read_meta(step)["config"]["model"])
                if saved != model:
                    raise JaxparError(
                        f"checkpoint {step} in {self.directory} holds another model "
                        f"({_model_diff(saved, model)}); use its model config or a new --out"
                    )
                return self.restore(step)
            except CorruptCheckpoint as e:
                warn(f"warning: {e}; falling back to an older checkpoint")
        if steps:
            raise JaxparError(
                f"no intact checkpoint in {self.directory} (tried steps {steps}); "
                "move the folder away to start over"
            )
        return None

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _model_diff(saved: dict[str, Any], wanted: dict[str, Any]) -> str:
    return ", ".join(
        f"model.{k}={saved.get(k)!r} there, {v!r} here"
        for k, v in wanted.items()
        if saved.get(k) != v
    )


class CorruptCheckpoint(JaxparError):
    """A checkpoint that exists but cannot be trusted (`restore_latest` falls back past it)."""


@dataclass(frozen=True)
class Listing:
    step: int
    mesh: str
    bytes: int
    complete: bool


def list_checkpoints(out: Path) -> list[Listing]:
    """Every checkpoint folder under OUT/checkpoints, finished or not, oldest first."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        raise JaxparError(f"{str(out)!r} holds no checkpoints (no {CHECKPOINTS}/ folder)")
    rows = []
    for path in sorted(root.iterdir()):
        name = path.name.split(".")[0]
        if not path.is_dir() or not name.isdigit():
            continue
        # A running job renames finished saves and deletes old ones while we look: a folder
        # that vanishes midway is simply not listed.
        try:
            complete = "tmp" not in path.name and (path / "_CHECKPOINT_METADATA").exists()
            mesh = "?"
            meta_file = path / "meta" / "metadata"
            if meta_file.exists():
                try:
                    mesh = json.loads(meta_file.read_text()).get("mesh", "?")
                except ValueError:
                    complete = False
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        except FileNotFoundError:
            continue
        rows.append(Listing(int(name), mesh, size, complete))
    return sorted(rows, key=lambda r: r.step)
