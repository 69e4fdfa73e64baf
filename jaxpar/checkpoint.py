"""Checkpoints: orbax, asynchronous and atomic, in the logical layout, restorable onto any mesh.

A checkpoint holds the train state with the blocks in logical layer order ([L, ...], not stacked
by pipeline stage), so it restores onto any mesh, stage count, repeats and FSDP setting: the target
shardings are computed for the new mesh and the stage layout is rebuilt after reading. Next to the
arrays a JSON item records the config, the mesh, the data position and a checksum per array: the sum
of its float32 bit patterns as uint32, wrapping, which is exact and independent of the sharding and
summation order, so a damaged file that still reads is caught too.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from jaxpar.config import ModelConfig
from jaxpar.errors import JaxparError
from jaxpar.train.step import Trainer, TrainState

CHECKPOINTS = "checkpoints"


def _is_block(path: tuple[Any, ...]) -> bool:
    return any(getattr(k, "key", None) == "blocks" for k in path)


@jax.jit
def _checksums(tree: Any) -> Any:
    """Per array, its float32 bit patterns summed as wrapping uint32: exact in any order."""

    def checksum(x: jax.Array) -> jax.Array:
        bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
        return jnp.sum(bits, dtype=jnp.uint32)

    return jax.tree.map(checksum, tree)


@dataclass
class Checkpointer:
    """Saves and restores one run's train state under `OUT/checkpoints/`.

    Attributes:
        trainer: the model, mesh and shardings of this process's run.
        directory: OUT/checkpoints.
        keep: how many of the newest checkpoints to keep.
    """

    trainer: Trainer
    directory: Path
    keep: int = 3

    def __post_init__(self) -> None:
        self.directory = Path(self.directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=self.keep, create=True, enable_async_checkpointing=True
            ),
        )

    # -- layout ------------------------------------------------------------------------------

    def _logical_shardings(self) -> Any:
        """Shardings of the logical-layout state on this mesh: blocks' leading axis replicated
        (it is `layers`, not `stage`), every other axis as the stage layout has it."""
        mesh = self.trainer.mesh

        def logical(path, sharding):
            if not _is_block(path):
                return sharding
            return NamedSharding(mesh, PartitionSpec(None, *sharding.spec[2:]))

        return jax.tree_util.tree_map_with_path(logical, self.trainer.state_shardings)

    @cached_property
    def _to_logical(self) -> Callable:
        layout = self.trainer.layout

        def convert(path, x):
            return layout.to_logical(x) if _is_block(path) else jnp.copy(x)

        return jax.jit(
            lambda s: jax.tree_util.tree_map_with_path(convert, s),
            out_shardings=self._logical_shardings(),
        )

    @cached_property
    def _from_logical(self) -> Callable:
        layout = self.trainer.layout

        def convert(path, x):
            return layout.to_stages(x) if _is_block(path) else x

        return jax.jit(
            lambda s: jax.tree_util.tree_map_with_path(convert, s),
            out_shardings=self.trainer.state_shardings,
        )

    def to_logical(self, state: TrainState) -> TrainState:
        """A copy of `state` with the blocks in logical layer order (compiled once)."""
        with jax.set_mesh(self.trainer.mesh):
            return self._to_logical(state)

    def from_logical(self, logical: TrainState) -> TrainState:
        with jax.set_mesh(self.trainer.mesh):
            return self._from_logical(logical)

    def _checksums(self, logical: TrainState) -> list[int]:
        return [int(s) for s in jax.device_get(jax.tree.leaves(_checksums(logical)))]

    def _abstract_logical(self) -> Any:
        abstract = self.trainer.init_state_abstract()
        layers = self.trainer.config.model.layers

        def shape(path, x, sharding):
            dims = (layers, *x.shape[2:]) if _is_block(path) else x.shape
            return jax.ShapeDtypeStruct(dims, x.dtype, sharding=sharding)

        return jax.tree_util.tree_map_with_path(shape, abstract, self._logical_shardings())

    # -- save and restore --------------------------------------------------------------------

    def save(self, step: int, state: TrainState, meta: dict[str, Any]) -> None:
        """Starts an asynchronous save of `state` as checkpoint `step`; returns once the arrays
        are copied out of the way of the next (donating) train step."""
        logical = self.to_logical(state)
        meta = {**meta, "step": step, "checksums": self._checksums(logical)}
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

    def restore(self, step: int) -> tuple[TrainState, dict[str, Any]]:
        """Reads checkpoint `step` onto this run's mesh and layout.

        Raises:
            CorruptCheckpoint: it cannot be read, or its arrays don't match their checksums.
        """
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(self._abstract_logical()),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        except Exception as e:  # orbax and tensorstore raise many types for damaged files
            raise CorruptCheckpoint(f"checkpoint {step} cannot be read: {type(e).__name__}") from e
        logical, meta = restored["state"], restored["meta"]
        if self._checksums(logical) != meta.get("checksums"):
            raise CorruptCheckpoint(f"checkpoint {step} does not match its checksums")
        return self.from_logical(logical), meta

    def read_meta(self, step: int) -> dict[str, Any]:
        try:
            return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
                "meta"
            ]
        except Exception as e:
            raise CorruptCheckpoint(f"checkpoint {step} has no readable metadata") from e

    def restore_latest(
        self, model: ModelConfig, warn: Callable[[str], None]
    ) -> tuple[TrainState, dict[str, Any]] | None:
        """The newest checkpoint that reads back intact; damaged ones are skipped with a warning.

        Returns None when there is no checkpoint at all.

        Raises:
            JaxparError: checkpoints exist but none is intact, or they hold another model.
        """
        steps = self.steps()
        for step in reversed(steps):
            try:
                saved = self.read_meta(step)["config"]["model"]
                if saved != dataclasses.asdict(model):
                    raise JaxparError(
                        f"checkpoint {step} in {self.directory} holds another model "
                        f"({_model_diff(saved, dataclasses.asdict(model))}); use its model "
                        "config or a new --out"
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


class CorruptCheckpoint(Exception):
    """A checkpoint that exists but cannot be trusted."""


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
