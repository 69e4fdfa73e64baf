"""A trained model on a mesh for inference: loading (jaxpar run or Hugging Face directory),
tokenisation, and perplexity evaluation.

jaxpar runs use byte tokens (ids 0-255) and their training sequence length as the context;
Hugging Face models their `tokenizer.json` and `max_position_embeddings`.
"""

from __future__ import annotations

import codecs
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpar.config import Config, load_config, validate_model_for_mesh
from jaxpar.errors import JaxparError
from jaxpar.infer.engine import Generator, serving_config
from jaxpar.mesh import mesh_spec_of
from jaxpar.model.llama import token_nll
from jaxpar.train.step import Trainer, TrainState, compute_dtype


@dataclass
class LoadedModel:
    """Parameters on a mesh, laid out for serving, with their tokenizer and context length.

    Attributes:
        tokenizer: a `tokenizers.Tokenizer`, or None for byte tokens.
        stop_ids: ids that end a generated sequence (the tokenizer's end-of-sequence token).
    """

    config: Config
    trainer: Trainer
    params: nnx.State
    context: int
    tokenizer: Any
    stop_ids: tuple[int, ...]
    source: str

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            return list(text.encode())
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
        return self.tokenizer.decode(ids)

    def stream_decoder(self) -> Callable[[list[int]], str]:
        """A function that takes the next ids of one sequence and returns the new text they
        complete (bytes that end inside a UTF-8 character wait for the rest)."""
        if self.tokenizer is None:
            pending = codecs.getincrementaldecoder("utf-8")(errors="replace")
            return lambda ids: pending.decode(bytes(i for i in ids if 0 <= i < 256))
        seen: list[int] = []

        def push(ids: list[int]) -> str:
            before = self.decode(seen)
            seen.extend(ids)
            return self.decode(seen)[len(before) :]

        return push

    def check_ids(self, ids: list[int], what: str) -> None:
        """Refuses ids outside the vocabulary (one clear line)."""
        vocab = self.config.model.vocab
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise JaxparError(f"{what} holds id {bad[0]}, outside the vocabulary [0, {vocab})")

    def generator(self, batch: int, max_len: int) -> Generator:
        return Generator(
            self.config, self.trainer.mesh, self.params, batch=batch, max_len=max_len,
            dtype=self.trainer.dtype,
        )  # fmt: skip

    @cached_property
    def _nll(self) -> Any:
        trainer = self.trainer

        def nll(params, tokens_BT, mask_BT):
            n_BT = token_nll(trainer.logits(params, tokens_BT[:, :-1]), tokens_BT[:, 1:])
            return jnp.sum(n_BT * mask_BT), jnp.sum(mask_BT)

        return jax.jit(nll)

    def evaluate(self, rows: list[np.ndarray], batch: int = 8) -> dict[str, float | int]:
        """Mean negative log-likelihood per predicted token, and perplexity, of token rows (each
        row predicts its tokens 1.. from the ones before; at most `context` + 1 tokens a row)."""
        rows = [r for r in rows if len(r) >= 2]
        if not rows:
            raise JaxparError("nothing to evaluate: every sequence needs at least 2 tokens")
        longest = max(len(r) for r in rows)
        if longest > self.context + 1:
            raise JaxparError(
                f"a sequence of {longest} tokens exceeds the model's context of {self.context} "
                f"(+1 for the last target)"
            )
        spec = mesh_spec_of(self.trainer.mesh)
        unit = spec.data * spec.pipeline  # the batch is split over both
        b = -(-min(batch, len(rows)) // unit) * unit
        width = longest
        total, count = 0.0, 0
        sharding = self.trainer.batch_sharding
        with jax.set_mesh(self.trainer.mesh):
            for start in range(0, len(rows), b):
                chunk = rows[start : start + b]
                tokens = np.zeros((b, width), np.int32)
                mask = np.zeros((b, width - 1), np.float32)
                for i, r in enumerate(chunk):
                    tokens[i, : len(r)] = r
                    mask[i, : len(r) - 1] = 1
                s, n = self._nll(
                    self.params, jax.device_put(tokens, sharding), jax.device_put(mask, sharding)
                )
                total += float(s)
                count += int(n)
        nll = total / count
        return {"nll": nll, "perplexity": math.exp(nll), "tokens": count}


def text_rows(ids: list[int], context: int) -> list[np.ndarray]:
    """Cuts one long token sequence into windows of `context` + 1 tokens that overlap by one, so
    every token but the first is predicted exactly once."""
    ids_array = np.asarray(ids, np.int32)
    return [ids_array[i : i + context + 1] for i in range(0, max(len(ids) - 1, 1), context)]


def _serving_trainer(config: Config, mesh: jax.sharding.Mesh, dtype: str) -> Trainer:
    spec = mesh_spec_of(mesh)
    validate_model_for_mesh(config.model, spec.pipeline, spec.tensor)
    config = serving_config(config)
    config = dataclasses.replace(
        config,
        parallel=dataclasses.replace(config.parallel, mesh=str(spec)),
        train=dataclasses.replace(config.train, dtype=compute_dtype(dtype).name),
    )
    return Trainer(config, mesh)


def restore_run(
    run: Path, mesh: jax.sharding.Mesh, dtype: str = "auto", warn=print
) -> tuple[Trainer, TrainState, dict] | None:
    """The newest intact checkpoint of a run folder (which has a config.yaml), restored onto
    `mesh` in the serving layout, with its serving trainer and metadata; None without one."""
    from jaxpar.checkpoint import CHECKPOINTS, Checkpointer

    trainer = _serving_trainer(load_config(run / "config.yaml"), mesh, dtype)
    checkpoints = Checkpointer(trainer, run / CHECKPOINTS, keep=1 << 30)
    try:
        restored = checkpoints.restore_latest(model=trainer.config.model, warn=warn)
    finally:
        checkpoints.close()
    return None if restored is None else (trainer, *restored)


def load_run(run: Path, mesh: jax.sharding.Mesh, dtype: str = "auto", warn=print) -> LoadedModel:
    """The newest checkpoint of a jaxpar run folder, restored onto `mesh`."""
    if not (run / "config.yaml").is_file():
        raise JaxparError(f"--run {str(run)!r} is not a jaxpar run folder (no config.yaml)")
    restored = restore_run(run, mesh, dtype, warn)
    if restored is None:
        raise JaxparError(f"--run {str(run)!r} has no checkpoint to load")
    trainer, state, meta = restored
    return LoadedModel(
        config=trainer.config,
        trainer=trainer,
        params=state.params,
        context=trainer.config.train.seq_len,
        tokenizer=None,
        stop_ids=(),
        source=f"{run} (checkpoint {meta['step']})",
    )


def load_hf(path: Path, mesh: jax.sharding.Mesh, dtype: str = "auto") -> LoadedModel:
    """A local Hugging Face Llama directory, read straight onto `mesh`."""
    from jaxpar.interop.hf import load_hf_params, load_tokenizer, read_hf_config

    model, context = read_hf_config(path)
    base = load_config(None)
    config = dataclasses.replace(
        base, model=model, train=dataclasses.replace(base.train, seq_len=context)
    )
    trainer = _serving_trainer(config, mesh, dtype)
    tokenizer = load_tokenizer(path)
    stop_ids: tuple[int, ...] = ()
    generation = _read_json(path / "generation_config.json") or _read_json(path / "config.json")
    eos = generation.get("eos_token_id")
    if eos is not None:
        stop_ids = tuple(eos) if isinstance(eos, list) else (eos,)
    return LoadedModel(
        config=trainer.config,
        trainer=trainer,
        params=load_hf_params(path, trainer),
        context=context,
        tokenizer=tokenizer,
        stop_ids=stop_ids,
        source=str(path),
    )


def _read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text()) if path.is_file() else {}
