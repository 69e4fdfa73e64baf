"""Hugging Face Llama configs: `config.json` read as jaxpar's model config (refusing what the
model does not implement) and written back from it. The tensors are `jaxpar.interop.hf`'s."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jaxpar.config import Config, ModelConfig, validate
from jaxpar.errors import JaxparError, typed

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"


def _get(doc: dict[str, Any], key: str, kind: type, default: Any, where: str) -> Any:
    return typed(doc.get(key, default), kind, f"{where}: {key}")


def _check_rope(doc: dict[str, Any], where: str) -> float:
    """rope_theta, from the top level or transformers v5's `rope_parameters`; scaling refused."""
    plain = (None, {"rope_type": "default"}, {"type": "default"})
    if doc.get("rope_scaling") not in plain:
        raise JaxparError(
            f"{where}: rope_scaling={doc['rope_scaling']!r} is not supported; jaxpar implements "
            "plain RoPE only (rope_scaling null)"
        )
    theta = _get(doc, "rope_theta", float, 10000.0, where)
    params = doc.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict) or params.get("rope_type", "default") != "default":
            raise JaxparError(
                f"{where}: rope_parameters={params!r} is not supported; jaxpar implements plain "
                "RoPE only (rope_type 'default')"
            )
        theta = _get(params, "rope_theta", float, theta, where + " rope_parameters")
    for source in (doc, params or {}):
        if source.get("partial_rotary_factor", 1.0) != 1.0:
            raise JaxparError(
                f"{where}: partial_rotary_factor={source['partial_rotary_factor']!r} is not "
                "supported; jaxpar rotates every head dimension (1.0)"
            )
    return theta


def read_hf_config(path: Path) -> tuple[ModelConfig, int]:
    """Reads a Hugging Face Llama directory's `config.json` as jaxpar's model config.

    Absent keys take `LlamaConfig`'s defaults, as transformers does.

    Returns:
        the model config and the context length (`max_position_embeddings`).

    Raises:
        JaxparError: no such directory or config.json, not a Llama model, or a feature jaxpar's
            model does not implement (RoPE scaling, biases, another activation, a head_dim other
            than hidden_size / num_attention_heads).
    """
    path = Path(path)
    if not path.is_dir():
        raise JaxparError(f"Hugging Face model directory {str(path)!r} does not exist")
    file = path / CONFIG
    if not file.is_file():
        raise JaxparError(
            f"{str(path)!r} has no {CONFIG}; expected a Hugging Face model directory "
            f"({CONFIG} and {WEIGHTS} or {INDEX})"
        )
    where = str(file)
    try:
        doc = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise JaxparError(f"{where} is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise JaxparError(f"{where} must hold a JSON object, got {type(doc).__name__}")
    if doc.get("model_type") != "llama":
        raise JaxparError(
            f"{where}: model_type={doc.get('model_type')!r} is not a Llama model; jaxpar reads "
            "model_type 'llama' only"
        )
    for key in ("attention_bias", "mlp_bias"):
        if _get(doc, key, bool, False, where):
            raise JaxparError(
                f"{where}: {key}=true is not supported; jaxpar's linear layers have no biases "
                f"({key} false)"
            )
    if doc.get("hidden_act", "silu") not in ("silu", "swish"):
        raise JaxparError(
            f"{where}: hidden_act={doc['hidden_act']!r} is not supported; jaxpar's MLP is "
            "SwiGLU (hidden_act 'silu')"
        )
    heads = _get(doc, "num_attention_heads", int, 32, where)
    kv = doc.get("num_key_value_heads")
    model = ModelConfig(
        layers=_get(doc, "num_hidden_layers", int, 32, where),
        dim=_get(doc, "hidden_size", int, 4096, where),
        heads=heads,
        kv_heads=heads if kv is None else _get(doc, "num_key_value_heads", int, heads, where),
        mlp_dim=_get(doc, "intermediate_size", int, 11008, where),
        vocab=_get(doc, "vocab_size", int, 32000, where),
        tie_embeddings=_get(doc, "tie_word_embeddings", bool, False, where),
        rope_theta=_check_rope(doc, where),
        norm_eps=_get(doc, "rms_norm_eps", float, 1e-6, where),
    )
    head_dim = doc.get("head_dim")
    if head_dim is not None and head_dim * model.heads != model.dim:
        raise JaxparError(
            f"{where}: head_dim={head_dim!r} is not supported; jaxpar's head_dim is hidden_size / "
            f"num_attention_heads = {model.dim} / {model.heads} (omit head_dim or set it to that)"
        )
    try:
        validate(Config(model=model))
    except JaxparError as e:
        raise JaxparError(f"{where}: {e}") from None
    context = _get(doc, "max_position_embeddings", int, 2048, where)
    if context < 1:
        raise JaxparError(f"{where}: max_position_embeddings={context} must be positive")
    return model, context


def hf_config(model: ModelConfig, context: int) -> dict[str, Any]:
    """The `config.json` of a Hugging Face `LlamaForCausalLM` equal to `model`."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": model.dim,
        "intermediate_size": model.mlp_dim,
        "num_hidden_layers": model.layers,
        "num_attention_heads": model.heads,
        "num_key_value_heads": model.kv_heads,
        "head_dim": model.head_dim,
        "vocab_size": model.vocab,
        "max_position_embeddings": context,
        "rms_norm_eps": model.norm_eps,
        "rope_theta": model.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": model.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": None,
        "torch_dtype": "float32",
    }


def no_tokenizer(path: Path, vocab: int) -> str | None:
    """Why a Hugging Face folder's ids cannot be read as text, in one line (None: they can).
    Without a `tokenizer.json`, ids are bytes; a vocabulary beyond 256 ids is not."""
    if vocab <= 256 or (path / TOKENIZER).is_file():
        return None
    spm = ""
    if (path / "tokenizer.model").is_file():
        spm = (
            " (its tokenizer.model, a SentencePiece model, is not read; transformers' "
            "AutoTokenizer.from_pretrained(folder).save_pretrained(folder) writes one)"
        )
    return (f"--init-from-hf {str(path)!r} has no {TOKENIZER} for its {vocab:,}-token "
            f"vocabulary{spm}, so its ids cannot be read or written as text; give ids with "
            "`generate --prompt-ids`")  # fmt: skip


# -- reading safetensors -------------------------------------------------------------------------
