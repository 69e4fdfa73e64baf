"""Loading a trained model onto a mesh for inference: a jaxpar run folder's newest checkpoint, or a
local Hugging Face Llama folder (its weights, tokenizer, stop tokens and chat template).

jaxpar runs use byte tokens (ids 0-255) and their training sequence length as the context;
Hugging Face models their `tokenizer.json` and `max_position_embeddings`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import jax
from flax import nnx

from jaxpar.checkpoint import Checkpointer
from jaxpar.config import Config, load_config
from jaxpar.errors import JaxparError
from jaxpar.infer.loaded import LoadedModel
from jaxpar.infer.speculate import ModelDrafter, NgramDrafter, Speculation
from jaxpar.placement import Placement, compute_dtype
from jaxpar.runs import CHECKPOINTS, CONFIG

Warn = Callable[[str], None]


def warn_on_stderr(message: str) -> None:
    """The default `Warn`: a line on stderr."""
    print(message, file=sys.stderr)


def _serving_placement(config: Config, mesh: jax.sharding.Mesh, dtype: str) -> Placement:
    config = config.replace(**{"train.dtype": compute_dtype(dtype).name})
    return Placement(config, mesh, serving=True)


def restore_run(
    run: Path, mesh: jax.sharding.Mesh, dtype: str = "auto", warn: Warn = warn_on_stderr
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


def load_run(
    run: Path, mesh: jax.sharding.Mesh, dtype: str = "auto", warn: Warn = warn_on_stderr
) -> LoadedModel:
    """The newest checkpoint of a jaxpar run folder, restored onto `mesh`.

    Raises:
        JaxparError: `run` is not a run folder or holds no checkpoint.
    """
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
    from jaxpar.interop.hf import load_hf_params, load_tokenizer
    from jaxpar.interop.hf_config import no_tokenizer, read_hf_config

    model, context = read_hf_config(path)
    config = Config(model=model).replace(**{"train.seq_len": context})
    placement = _serving_placement(config, mesh, dtype)
    stop_ids: tuple[int, ...] = ()
    generation = _read_json(path / "generation_config.json") or _read_json(path / "config.json")
    eos = generation.get("eos_token_id")
    if eos is not None:
        stop_ids = tuple(eos) if isinstance(eos, list) else (eos,)
    template, special = read_chat_template(_read_json(path / "tokenizer_config.json"))
    tokenizer = load_tokenizer(path)
    return LoadedModel(
        placement=placement,
        params=load_hf_params(path, placement),
        context=context,
        tokenizer=tokenizer,
        stop_ids=stop_ids,
        source=str(path),
        chat_template=template,
        special_tokens=special,
        unreadable=None if tokenizer else no_tokenizer(path, model.vocab),
    )


def read_chat_template(config: dict) -> tuple[str | None, dict[str, str]]:
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


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def load_draft(path: str, mesh: jax.sharding.Mesh, dtype: str, vocab: int):
    """The draft model at `path` (a jaxpar run folder or a Hugging Face folder) on `mesh`, once
    its configuration shows it has the target's `vocab` tokens.

    Raises:
        JaxparError: `path` is neither kind of folder, or the vocabularies differ.
    """
    from jaxpar.interop.hf_config import read_hf_config

    folder = Path(path)
    if (folder / CONFIG).is_file():
        load, model = load_run, load_config(folder / CONFIG).model
    elif (folder / "config.json").is_file():
        load, model = load_hf, read_hf_config(folder)[0]
    else:
        raise JaxparError(
            f"the draft model {path!r} is neither a jaxpar run folder ({CONFIG}) nor a Hugging "
            "Face folder (config.json)"
        )
    if model.vocab != vocab:
        raise JaxparError(
            f"the draft model {path!r} has a vocabulary of {model.vocab:,} tokens and the target "
            f"{vocab:,}: a draft model must share the target's tokenizer"
        )
    return load(folder, mesh, dtype)


def make_drafter(speculation: Speculation | None, target, rows: int, max_len: int,
                 dtype: str = "auto", blocks: int = 0, block: int = 16):  # fmt: skip
    """The drafter `speculation` names for `target`'s generator of `rows` rows up to `max_len`
    (paged: `blocks` blocks of `block` positions; None: none); a draft model is loaded onto the
    target's mesh.

    Raises:
        JaxparError: the draft model cannot be read, or does not fit the target.
    """
    if speculation is None:
        return None
    if target.placement.spec.context > 1:
        raise JaxparError("speculative decoding needs context=1: a verify pass's tokens would be "
                          "split over the context axis")  # fmt: skip
    if speculation.kind == "ngram":
        return NgramDrafter(speculation.k)
    draft = load_draft(speculation.path, target.placement.mesh, dtype, target.config.model.vocab)
    return ModelDrafter(draft, speculation.k, rows, max_len, blocks, block)
