"""Hugging Face Llama checkpoints: `config.json` + safetensors in, and back out, bit for bit.

Hugging Face stores each linear layer as `[out, in]`; jaxpar stores `[in, out]` with heads split
out (`w_DNH`, `wo_NHD`), and the blocks stacked by pipeline stage (`[P, v * c, ...]`). Every
parameter maps to one Hugging Face tensor per layer through one of four layout kinds:

    copy        same layout                     norms, embed_tokens [V, D] -> embed_VD
    transpose   [O, I] -> [I, O]                gate/up/down_proj, lm_head [V, D] -> head_DV
    split_out   [N * H, D] -> [D, N, H]         q/k/v_proj
    split_in    [D, N * H] -> [N, H, D]         o_proj

jaxpar's RoPE pairs dimension i with i + H/2 (`rotate_half`), as Hugging Face's Llama does, so
q and k need no permutation (Meta's original checkpoints interleave pairs; HF's converter already
permuted them). Loading places each shard straight onto its devices with
`jax.make_array_from_callback`, reading only the slices that shard holds: the whole model is never
assembled in one place.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import ml_dtypes  # noqa: F401  registers numpy's 'bfloat16', which safetensors' numpy path needs
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxpar.errors import JaxparError
from jaxpar.interop.hf_config import CONFIG, INDEX, TOKENIZER, WEIGHTS, hf_config, read_hf_config
from jaxpar.placement import Placement

if TYPE_CHECKING:
    import tokenizers

# Safetensors dtypes read (into jaxpar's float32 parameters; only F64 rounds).
_READABLE = ("F32", "F16", "BF16", "F64")


@dataclass(frozen=True)
class _Tensor:
    """One jaxpar parameter and the Hugging Face tensor it comes from ({i}: the layer)."""

    path: tuple[str, ...]
    hf: str
    kind: str  # copy | transpose | split_out | split_in


_TOP = (
    _Tensor(("embed_VD",), "model.embed_tokens.weight", "copy"),
    _Tensor(("final_norm", "scale"), "model.norm.weight", "copy"),
    _Tensor(("head_DV",), "lm_head.weight", "transpose"),
)
_BLOCK = (
    _Tensor(("attn_norm", "scale"), "model.layers.{i}.input_layernorm.weight", "copy"),
    _Tensor(("attn", "wq_DNH"), "model.layers.{i}.self_attn.q_proj.weight", "split_out"),
    _Tensor(("attn", "wk_DKH"), "model.layers.{i}.self_attn.k_proj.weight", "split_out"),
    _Tensor(("attn", "wv_DKH"), "model.layers.{i}.self_attn.v_proj.weight", "split_out"),
    _Tensor(("attn", "wo_NHD"), "model.layers.{i}.self_attn.o_proj.weight", "split_in"),
    _Tensor(("mlp_norm", "scale"), "model.layers.{i}.post_attention_layernorm.weight", "copy"),
    _Tensor(("mlp", "w_gate_DF"), "model.layers.{i}.mlp.gate_proj.weight", "transpose"),
    _Tensor(("mlp", "w_up_DF"), "model.layers.{i}.mlp.up_proj.weight", "transpose"),
    _Tensor(("mlp", "w_down_FD"), "model.layers.{i}.mlp.down_proj.weight", "transpose"),
)
_BY_PATH = {t.path: t for t in _TOP} | {("blocks", *t.path): t for t in _BLOCK}


def _hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The Hugging Face shape of one layer's jaxpar parameter of `shape`."""
    if kind == "transpose":
        return shape[::-1]
    if kind == "split_out":  # (D, N, H) -> (N * H, D)
        return (shape[1] * shape[2], shape[0])
    if kind == "split_in":  # (N, H, D) -> (D, N * H)
        return (shape[2], shape[0] * shape[1])
    return shape


def _to_hf(kind: str, x: np.ndarray) -> np.ndarray:
    """One layer's jaxpar parameter in Hugging Face's layout (contiguous, for safetensors)."""
    if kind == "transpose":
        x = x.T
    elif kind == "split_out":
        x = x.reshape(x.shape[0], -1).T
    elif kind == "split_in":
        x = x.reshape(-1, x.shape[-1]).T
    return np.ascontiguousarray(x)


def _read(kind: str, tensor: Any, shape: tuple[int, ...], index: list[slice]) -> np.ndarray:
    """`index` (contiguous slices of jaxpar's per-layer `shape`) of one layer's parameter, read
    from the safetensors slice `tensor` in Hugging Face's layout: only those rows and columns
    (whole heads for the split kinds, which head_dim is never sharded across anyway)."""
    if kind == "copy":
        return tensor[tuple(index)]
    if kind == "transpose":
        return tensor[index[1], index[0]].T
    if kind == "split_out":  # W[n * H + h, d] = w_DNH[d, n, h]
        d, n, h = index
        x = tensor[n.start * shape[2] : n.stop * shape[2], d].T
        return x.reshape(x.shape[0], -1, shape[2])[:, :, h]
    n, h, d = index  # split_in: W[d, n * H + h] = wo_NHD[n, h, d]
    x = tensor[d, n.start * shape[1] : n.stop * shape[1]].T
    return x.reshape(-1, shape[1], x.shape[-1])[:, h, :]


# -- config.json ---------------------------------------------------------------------------------


class _Weights:
    """A Hugging Face directory's tensors, single-file or sharded, opened lazily; a context
    manager that closes what it opened."""

    def __init__(self, path: Path):
        self.path = path
        if (path / WEIGHTS).is_file():
            # transformers also prefers the single file when both are present.
            with safe_open(str(path / WEIGHTS), framework="numpy") as f:
                self.files = dict.fromkeys(f.keys(), WEIGHTS)
        elif (path / INDEX).is_file():
            try:
                weight_map = json.loads((path / INDEX).read_text())["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise JaxparError(f"{str(path / INDEX)!r} has no readable weight_map") from None
            for file in sorted(set(weight_map.values())):
                if not (path / file).is_file():
                    raise JaxparError(
                        f"{str(path / INDEX)!r} lists shard {file!r}, which is not in {str(path)!r}"
                    )
            self.files = dict(weight_map)
        else:
            raise JaxparError(f"{str(path)!r} has neither {WEIGHTS} nor {INDEX}")
        self._open: dict[str, Any] = {}
        self._stack = ExitStack()

    def __enter__(self) -> _Weights:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def tensor(self, name: str) -> Any:
        """The safetensors slice of `name` (shape and dtype without reading data)."""
        file = self.files[name]
        if file not in self._open:
            handle = safe_open(str(self.path / file), framework="numpy")
            self._open[file] = self._stack.enter_context(handle)
        return self._open[file].get_slice(name)

    def check(self, name: str, expected: tuple[int, ...]) -> None:
        if name not in self.files:
            raise JaxparError(
                f"tensor {name!r} is missing from {str(self.path)!r}; the config needs it with "
                f"shape {expected}"
            )
        tensor = self.tensor(name)
        found = tuple(tensor.get_shape())
        if found != expected:
            raise JaxparError(
                f"tensor {name!r} in {str(self.path / self.files[name])!r} has shape {found}, "
                f"expected {expected} from the config"
            )
        if tensor.get_dtype() not in _READABLE:
            raise JaxparError(
                f"tensor {name!r} in {str(self.path / self.files[name])!r} has dtype "
                f"{tensor.get_dtype()}; jaxpar reads {', '.join(_READABLE)}"
            )


def _leaf_key(path: tuple[Any, ...]) -> tuple[str, ...]:
    """('blocks', 'attn', 'wq_DNH') from a tree path, with or without nnx Variables."""
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _param_shapes(placement: Placement) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Each parameter's key (e.g. ('blocks', 'attn', 'wq_DNH')) and global shape, in tree order."""
    leaves = jax.tree_util.tree_leaves_with_path(placement.abstract_params, is_leaf=_is_variable)
    return {_leaf_key(p): tuple(v.get_value().shape) for p, v in leaves}


def _tensor(key: tuple[str, ...]) -> _Tensor:
    if key not in _BY_PATH:
        raise AssertionError(f"jaxpar parameter {'/'.join(key)} has no Hugging Face mapping")
    return _BY_PATH[key]


def _block_loader(
    weights: _Weights, t: _Tensor, slot_layer: np.ndarray, layer_shape: tuple[int, ...]
) -> Callable[[tuple[slice, ...]], np.ndarray]:
    def load(index: tuple[slice, ...]) -> np.ndarray:
        full = (*slot_layer.shape, *layer_shape)
        ranges = [range(*s.indices(n)) for s, n in zip(index, full, strict=True)]
        rest = [slice(r.start, r.stop) for r in ranges[2:]]
        out = np.zeros([len(r) for r in ranges], np.float32)
        for i, p in enumerate(ranges[0]):
            for j, s in enumerate(ranges[1]):
                layer = int(slot_layer[p, s])
                if layer >= 0:  # padded slots stay zero
                    tensor = weights.tensor(t.hf.format(i=layer))
                    out[i, j] = _read(t.kind, tensor, layer_shape, rest)
        return out

    return load


def _top_loader(
    weights: _Weights, t: _Tensor, shape: tuple[int, ...]
) -> Callable[[tuple[slice, ...]], np.ndarray]:
    def load(index: tuple[slice, ...]) -> np.ndarray:
        rest = [slice(*s.indices(n)[:2]) for s, n in zip(index, shape, strict=True)]
        return np.asarray(_read(t.kind, weights.tensor(t.hf), shape, rest), np.float32)

    return load


def load_hf_params(path: Path, placement: Placement) -> nnx.State:
    """Reads a Hugging Face Llama checkpoint into parameters on `placement`'s mesh.

    Args:
        path: a directory with `config.json` and `model.safetensors` (or sharded files listed
            by `model.safetensors.index.json`), in float32, float16 or bfloat16.
        placement: its model must be the directory's (`read_hf_config`).

    Returns:
        float32 parameters shaped and sharded like `placement.abstract_params` /
        `placement.param_shardings`: blocks as [P, v * c, ...] in the stage layout, zeros in
        padded slots.

    Raises:
        JaxparError: a model that differs from the placement's, a missing tensor, or a tensor whose
            shape or dtype does not fit (named with the shape found and expected).
    """
    path = Path(path)
    model, _ = read_hf_config(path)
    want = placement.config.model
    if model.architecture != want.architecture:
        diff = ", ".join(
            f"model.{k}={v!r} there, {getattr(want, k)!r} here"
            for k, v in model.architecture.items()
            if getattr(want, k) != v
        )
        raise JaxparError(f"{str(path / CONFIG)!r} describes another model than jaxpar's: {diff}")
    slot_layer = placement.layout.slot_layer
    with _Weights(path) as weights:
        loaders = {}
        for key, shape in _param_shapes(placement).items():
            t = _tensor(key)
            if key[0] == "blocks":
                layer_shape = shape[2:]
                for layer in range(want.layers):
                    weights.check(t.hf.format(i=layer), _hf_shape(t.kind, layer_shape))
                loaders[key] = _block_loader(weights, t, slot_layer, layer_shape)
            else:
                weights.check(t.hf, _hf_shape(t.kind, shape))
                loaders[key] = _top_loader(weights, t, shape)

        def place(path_: tuple[Any, ...], var: nnx.Variable, sharding: nnx.Variable) -> Any:
            value = var.get_value()
            loader = loaders[_leaf_key(path_)]
            array = jax.make_array_from_callback(value.shape, sharding.get_value(), loader)
            return var.replace(array)

        return jax.tree_util.tree_map_with_path(
            place, placement.abstract_params, placement.param_shardings, is_leaf=_is_variable
        )


# -- writing -------------------------------------------------------------------------------------


def _hf_tensors(placement: Placement, params: nnx.State) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 array) in Hugging Face's layout, one jaxpar parameter on the host at a time,
    in `_planned_sizes`' order."""
    arrays = {_leaf_key(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
    slot_layer = placement.layout.slot_layer
    for key in _param_shapes(placement):
        t = _tensor(key)
        host = np.asarray(jax.device_get(arrays[key]), np.float32)
        if key[0] != "blocks":
            yield t.hf, _to_hf(t.kind, host)
            continue
        for layer in range(placement.config.model.layers):
            (p, s), *_ = np.argwhere(slot_layer == layer)
            yield t.hf.format(i=layer), _to_hf(t.kind, host[p, s])


def _planned_sizes(placement: Placement) -> list[tuple[str, int]]:
    """(name, bytes) in `_hf_tensors`' order, from shapes alone."""
    sizes = []
    for key, shape in _param_shapes(placement).items():
        t = _tensor(key)
        if key[0] != "blocks":
            sizes.append((t.hf, 4 * math.prod(shape)))
        else:
            layer_bytes = 4 * math.prod(shape[2:])
            sizes += [(t.hf.format(i=i), layer_bytes) for i in range(placement.config.model.layers)]
    return sizes


def _shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> dict[str, int]:
    """Tensor name -> shard index, filling shards in order; a tensor over the limit goes alone."""
    shard, used, out = 0, 0, {}
    for name, size in sizes:
        if used and used + size > max_shard_bytes:
            shard, used = shard + 1, 0
        out[name] = shard
        used += size
    return out


def _check_params(placement: Placement, params: nnx.State) -> None:
    want = _param_shapes(placement)
    have = {_leaf_key(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    if have != want:
        bad = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
        raise JaxparError(
            f"params do not fit the placement's model: {'/'.join(bad[0])} has shape "
            f"{have.get(bad[0])}, expected {want.get(bad[0])}"
        )


def export_hf(
    placement: Placement, params: nnx.State, dest: Path, context: int, max_shard_bytes: int = 2**31
) -> None:
    """Writes `params` as a Hugging Face `LlamaForCausalLM` directory, in float32.

    Writes `config.json` and `model.safetensors`, or, when the tensors exceed `max_shard_bytes`,
    `model-0000i-of-0000N.safetensors` and `model.safetensors.index.json`. Everything goes to a
    temporary sibling directory first, renamed to `dest` at the end: a failure leaves nothing.

    Args:
        placement: the model (config, stage layout) the params belong to.
        params: parameters like `placement.abstract_params`, on any mesh.
        dest: a directory that does not exist yet, or is empty.
        context: `max_position_embeddings` to record.
        max_shard_bytes: the largest shard file, before a new one starts.

    Raises:
        JaxparError: `dest` is a file or a non-empty directory, or params of another model.
    """
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise JaxparError(
            f"export destination {str(dest)!r} already exists and is not an empty directory; "
            "choose a new path"
        )
    if context < 1:
        raise JaxparError(f"context={context} must be a positive number of positions")
    _check_params(placement, params)
    sizes = _planned_sizes(placement)
    shard_of = _shards(sizes, max_shard_bytes)
    count = max(shard_of.values()) + 1
    files = [
        WEIGHTS if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        for i in range(count)
    ]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        config = hf_config(placement.config.model, context)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        shard: dict[str, np.ndarray] = {}
        current = 0
        # "format": "pt" is what transformers' safetensors loader expects in the metadata.
        for name, array in _hf_tensors(placement, params):
            if shard_of[name] != current:
                save_file(shard, str(tmp / files[current]), metadata={"format": "pt"})
                shard, current = {}, shard_of[name]
            shard[name] = array
        save_file(shard, str(tmp / files[current]), metadata={"format": "pt"})
        if count > 1:
            index = {
                "metadata": {"total_size": sum(size for _, size in sizes)},
                "weight_map": {name: files[shard_of[name]] for name in sorted(shard_of)},
            }
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        if dest.exists():
            dest.rmdir()
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_tokenizer(path: Path) -> tokenizers.Tokenizer | None:
    """The directory's `tokenizer.json` as a `tokenizers.Tokenizer`, or None if it has none."""
    file = Path(path) / TOKENIZER
    if not file.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(file))
