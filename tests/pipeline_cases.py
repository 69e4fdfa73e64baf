"""Shared by the pipeline tests: small configs, cached trainers, the sequential reference.

The reference is the plain sequential model (`Llama.__call__`: one scan over the layers in logical
order) on one device. Every layout computes with the reference's own parameters, moved into its
stage layout (`Placement.from_logical`), so a case compiles its loss and not an initialisation of
its own (that init is the same on every layout is test_parallel's to show). Gradients are compared
per tensor as max|a - b| / max|b| in float32.
"""

import functools

import jax
import numpy as np
from flax import nnx

from jaxpar.config import load_config
from jaxpar.mesh import make_mesh, parse_mesh
from jaxpar.model.llama import cross_entropy
from jaxpar.placement import Placement
from jaxpar.train.step import Trainer

SIZES = [
    "model.dim=32", "model.heads=4", "model.kv_heads=2", "model.mlp_dim=64", "model.vocab=256",
    "train.batch_size=16", "train.seq_len=16", "train.dtype=float32",
]  # fmt: skip
B, T, D = 16, 16, 32


def gpipe(m: int) -> tuple[str, ...]:
    return ("pipeline.schedule=gpipe", f"pipeline.microbatches={m}")


def circular(m: int, v: int = 2) -> tuple[str, ...]:
    return ("pipeline.schedule=circular", f"pipeline.repeats={v}", f"pipeline.microbatches={m}")


@functools.cache
def trainer(mesh_spec: str, layers: int, extra: tuple[str, ...]) -> Trainer:
    spec = parse_mesh(mesh_spec)
    config = load_config(None, [*SIZES, f"model.layers={layers}", *extra])
    return Trainer(Placement(config, make_mesh(spec, jax.devices()[: spec.size])))


@functools.cache
def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(B, T + 1), dtype=np.int32)


def logical(tr: Trainer, tree) -> dict:
    """name -> array of `tree` (parameters, gradients), the blocks' [stage, slot, ...] back in
    layer order [L, ...]."""
    with jax.set_mesh(tr.placement.mesh):
        tree = jax.jit(tr.placement.to_logical)(tree)
    return {".".join(map(str, path)): np.asarray(v.get_value())
            for path, v in nnx.to_flat_state(tree)}  # fmt: skip


DEEPEST = 8  # the cases' greatest depth


@functools.cache
def logical_params(layers: int) -> nnx.State:
    """The model's initial parameters in layer order, on the host: one initialisation, of
    `DEEPEST` layers, whose first `layers` layers a shallower model takes (a case compares a
    layout with the reference on the same parameters, however drawn; an initialisation costs a
    compile per depth)."""
    if layers < DEEPEST:
        return jax.tree_util.tree_map_with_path(
            lambda path, x: x[:layers] if path[0].key == "blocks" else x,
            logical_params(DEEPEST),
        )
    tr = trainer("data=1", layers, ())
    with jax.set_mesh(tr.placement.mesh):
        return jax.tree.map(np.asarray, jax.jit(tr.placement.to_logical)(tr.init_state().params))


def params_for(tr: Trainer) -> nnx.State:
    """`logical_params` in `tr`'s stage layout and shardings."""
    move = jax.jit(tr.placement.from_logical, out_shardings=tr.placement.param_shardings)
    with jax.set_mesh(tr.placement.mesh):
        return move(logical_params(tr.placement.config.model.layers))


@functools.cache
def sequential_reference(layers: int) -> tuple[float, dict]:
    """Loss and gradients of the plain model on one device, no executor."""
    tr = trainer("data=1", layers, ())

    def loss(params, tokens_BT):
        logits = nnx.merge(tr.placement.graphdef, params)(tokens_BT[:, :-1])
        return cross_entropy(logits, tokens_BT[:, 1:])

    value, g = jax.jit(jax.value_and_grad(loss))(params_for(tr), tokens())
    return float(value), logical(tr, g)


def pipelined(mesh_spec: str, layers: int, extra: tuple[str, ...]) -> tuple[float, dict]:
    tr = trainer(mesh_spec, layers, extra)
    with jax.set_mesh(tr.placement.mesh):
        value, g = jax.jit(jax.value_and_grad(tr.placement.loss))(
            params_for(tr), jax.device_put(tokens(), tr.placement.batch_sharding)
        )
    return float(value), logical(tr, g)


def assert_matches_sequential(mesh_spec: str, layers: int, extra: tuple[str, ...]) -> None:
    """Loss within 1e-5 and every gradient within 1e-5 (relative) of the sequential model."""
    ref_loss, ref_grads = sequential_reference(layers)
    loss, g = pipelined(mesh_spec, layers, extra)
    assert abs(loss - ref_loss) / ref_loss < 1e-5
    assert g.keys() == ref_grads.keys()
    for name in g:
        assert g[name].shape == ref_grads[name].shape, name
        err = np.max(np.abs(g[name] - ref_grads[name])) / np.max(np.abs(ref_grads[name]))
        assert err < 1e-5, (name, err)


def one_f(m: int) -> tuple[str, ...]:
    return ("pipeline.schedule=1f1b", f"pipeline.microbatches={m}")


def interleaved(m: int, v: int = 2) -> tuple[str, ...]:
    return ("pipeline.schedule=interleaved_1f1b", f"pipeline.repeats={v}",
            f"pipeline.microbatches={m}")  # fmt: skip


def zb(m: int) -> tuple[str, ...]:
    return ("pipeline.schedule=zb_h1", f"pipeline.microbatches={m}")


def zb_v(m: int) -> tuple[str, ...]:
    return ("pipeline.schedule=zb_v", "pipeline.repeats=2", f"pipeline.microbatches={m}")
