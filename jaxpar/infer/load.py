"""A trained model on a mesh for inference: loading (jaxpar run or Hugging Face directory),
tokenisation, context checks, perplexity evaluation, export of a run, and text sampling.

jaxpar runs use byte tokens (ids 0-255) and their training sequence length as the context;
Hugging Face models their `tokenizer.json` and `max_position_embeddings`.
"""

from __future__ import annotations

import codecs
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpar.checkpoint import Checkpointer
from jaxpar.config import Config, load_config
from jaxpar.errors import JaxparError
from jaxpar.infer.engine import Generator, Sampling, check_context
from jaxpar.mesh import make_mesh, parse_mesh
from jaxpar.model.llama import token_nll
from jaxpar.placement import Placement, compute_dtype
from jaxpar.runs import CHECKPOINTS, CONFIG, check_run_dir

Warn = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


@dataclass
class LoadedModel:
    """Parameters on a mesh, laid out for serving, with their tokenizer and context length.

    Attributes:
        placement: the serving placement the parameters are laid out by.
        tokenizer: a `tokenizers.Tokenizer`, or None for byte tokens.
        stop_ids: ids that end a generated sequence (the tokenizer's end-of-sequence token).
    """

    placement: Placement
    params: nnx.State
    context: int
    tokenizer: Any
    stop_ids: tuple[int, ...]
    source: str
    # The folder's chat template (`tokenizer_config.json`) and the special tokens it may name;
    # None: `jaxpar.infer.chat.PLAIN_TEMPLATE`.
    chat_template: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)

    @property
    def config(self) -> Config:
        return self.placement.config

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            return list(text.encode())
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
        return self.tokenizer.decode(ids)

    def stream_decoder(self) -> Callable[..., str]:
        """A function that takes the next ids of one sequence and returns the new text they
        complete: bytes that end inside a UTF-8 character wait for the rest, until a call with
        `final=True` flushes them (as `decode` of the whole sequence would show them)."""
        if self.tokenizer is None:
            pending = codecs.getincrementaldecoder("utf-8")(errors="replace")
            return lambda ids, final=False: pending.decode(
                bytes(i for i in ids if 0 <= i < 256), final
            )
        seen: list[int] = []

        def push(ids: list[int], final: bool = False) -> str:
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

    def check_fits(self, prompt_len: int, new_tokens: int) -> None:
        """Refuses a prompt and a number of new tokens that together exceed the context."""
        check_context(prompt_len, new_tokens, self.context, "--max-new-tokens")

    def generator(self, batch: int, max_len: int) -> Generator:
        return Generator(self.placement, self.params, batch=batch, max_len=max_len)

    @cached_property
    def _nll(self) -> Any:
        placement = self.placement

        def nll(params, tokens_BT, mask_BT):
            n_BT = token_nll(placement.logits(params, tokens_BT[:, :-1]), tokens_BT[:, 1:])
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
        spec = self.placement.spec
        unit = spec.data * spec.pipeline  # the pipeline splits the batch over both
        b = -(-min(batch, len(rows)) // unit) * unit
        width = longest
        total, count = 0.0, 0
        sharding = self.placement.batch_sharding
        with jax.set_mesh(self.placement.mesh):
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


def read_token_rows(path: Path, model: LoadedModel) -> list[np.ndarray]:
    """The rows of an int .npy array [batch, length] of token ids, checked against the model."""
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise JaxparError(f"--tokens {str(path)!r} is not a .npy array: {e}") from None
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise JaxparError(
            f"--tokens {str(path)!r} holds a {array.dtype} array of shape {array.shape}; "
            "expected integers [batch, length]"
        )
    model.check_ids(array.ravel().tolist(), f"--tokens {str(path)!r}")
    return [row.astype(np.int32) for row in array]


def sample_text(
    placement: Placement, params: nnx.State, prompt: str, tokens: int, seed: int
) -> tuple[str, int]:
    """`prompt` and what a trained byte-token model writes after it (default temperature), with the
    KV-cached engine on the training mesh: the end-of-training sample.

    `params` are laid out by the training `placement`; they are moved into the serving layout of
    the same mesh first. At most the context (`train.seq_len`) is filled.

    Returns:
        the text, and how many tokens were generated.
    """
    serving = Placement(placement.config, placement.mesh, serving=True)
    ids = list(prompt.encode())
    room = placement.config.train.seq_len - len(ids)
    if not ids or room < 1:
        return prompt, 0
    tokens = min(tokens, room)
    params = serving.relayout(params, placement)
    gen = Generator(serving, params, batch=1, max_len=len(ids) + tokens)
    out = gen.generate([ids], tokens, Sampling(), seed=seed)
    text = bytes(i for i in out.new_ids[0] if 0 <= i < 256).decode("utf-8", errors="replace")
    return prompt + text, len(out.new_ids[0])


# -- loading -------------------------------------------------------------------------------------


def _serving_placement(config: Config, mesh: jax.sharding.Mesh, dtype: str) -> Placement:
    config = config.replace(**{"train.dtype": compute_dtype(dtype).name})
    return Placement(config, mesh, serving=True)


def restore_run(
    run: Path, mesh: jax.sharding.Mesh, dtype: str = "auto", warn: Warn = _stderr
) -> tuple[Placement, nnx.State, dict] | None:
    """The parameters of a run folder's newest intact checkpoint (not its optimizer state),
    restored onto `mesh` in the serving layout, with their placement and the checkpoint's
    metadata; None when the run has no checkpoint."""
    placement = _serving_placement(load_config(run / CONFIG), mesh, dtype)
    abstract = placement.abstract(placement.abstract_params, placement.param_shardings)
    target = {"params": abstract}
    with Checkpointer(placement, run / CHECKPOINTS, target, keep=1 << 30) as checkpoints:
        restored = checkpoints.restore_latest(warn=warn)
    if restored is None:
        return None
    state, meta = restored
    return placement, state["params"], meta


def load_run(run: Path, mesh: jax.sharding.Mesh, dtype: str = "auto", warn: Warn = _stderr):
    """The newest checkpoint of a jaxpar run folder, restored onto `mesh`."""
    if not (run / CONFIG).is_file():
        raise JaxparError(f"--run {str(run)!r} is not a jaxpar run folder (no {CONFIG})")
    restored = restore_run(run, mesh, dtype, warn)
    if restored is None:
        raise JaxparError(f"--run {str(run)!r} has no checkpoint to load")
    placement, params, meta = restored
    return LoadedModel(
        placement=placement,
        params=params,
        context=placement.config.train.seq_len,
        tokenizer=None,
        stop_ids=(),
        source=f"{run} (checkpoint {meta['step']})",
    )


def load_hf(path: Path, mesh: jax.sharding.Mesh, dtype: str = "auto") -> LoadedModel:
    """A local Hugging Face Llama directory, read straight onto `mesh`."""
    from jaxpar.interop.hf import load_hf_params, load_tokenizer, read_hf_config

    model, context = read_hf_config(path)
    config = Config(model=model).replace(**{"train.seq_len": context})
    placement = _serving_placement(config, mesh, dtype)
    stop_ids: tuple[int, ...] = ()
    generation = _read_json(path / "generation_config.json") or _read_json(path / "config.json")
    eos = generation.get("eos_token_id")
    if eos is not None:
        stop_ids = tuple(eos) if isinstance(eos, list) else (eos,)
    template, special = _chat_template(_read_json(path / "tokenizer_config.json"))
    return LoadedModel(
        placement=placement,
        params=load_hf_params(path, placement),
        context=context,
        tokenizer=load_tokenizer(path),
        stop_ids=stop_ids,
        source=str(path),
        chat_template=template,
        special_tokens=special,
    )


def _chat_template(config: dict) -> tuple[str | None, dict[str, str]]:
    """A `tokenizer_config.json`'s chat template (its default one, when it names several) and
    its special tokens' texts (`bos_token`, `eos_token`, ...)."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    special = {}
    for key, value in config.items():
        if key.endswith("_token"):
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                special[key] = value
    return template if isinstance(template, str) else None, special


def export_run(run: Path, dest: Path, warn: Warn = _stderr) -> Path:
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


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
