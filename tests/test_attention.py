"""The attention seam: `model.attention=dot_product` (jax.nn.dot_product_attention) computes what
`xla` (jaxpar's einsums) computes, in training and in KV-cached decoding, on every layout; and
`attend`'s masks and the implementation choice."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpar.analysis.hlo import parse
from jaxpar.config import load_config
from jaxpar.errors import JaxparError
from jaxpar.infer.engine import Generator
from jaxpar.mesh import make_mesh, parse_mesh
from jaxpar.model.attention import attend, resolve
from jaxpar.placement import Placement
from jaxpar.train.step import Trainer

# GQA (8 query heads over 4 kv heads), so grouping is exercised on every layout.
SIZES = [
    "model.layers=2", "model.dim=32", "model.heads=8", "model.kv_heads=4", "model.mlp_dim=64",
    "train.batch_size=8", "train.seq_len=16", "train.dtype=float32",
]  # fmt: skip
LAYOUTS = [  # one device, and every axis at once (tensor-split heads, stages, data replicas)
    ("data=1", ()),
    ("data=2,pipeline=2,tensor=2", ("pipeline.microbatches=2",)),
]


def placement(spec: str, impl: str, *extra: str, serving: bool = False) -> Placement:
    s = parse_mesh(spec)
    config = load_config(None, [*SIZES, f"model.attention={impl}", *extra])
    return Placement(config, make_mesh(s, jax.devices()[: s.size]), serving=serving)


@functools.cache
def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (8, 17)).astype(np.int32)


@functools.cache
def logical_params() -> nnx.State:
    """The initial parameters in layer order, on the host: one initialisation, on one device (an
    initialisation is a compile per layout; that it is the same on every layout is
    test_parallel's to show)."""
    p = placement("data=1", "xla")
    with jax.set_mesh(p.mesh):
        return jax.tree.map(np.asarray, jax.jit(p.to_logical)(Trainer(p).init_state(0).params))


@functools.cache
def initial_params(spec: str, extra: tuple[str, ...] = ()) -> nnx.State:
    """`logical_params` on `spec`, for both implementations (the parameters are the same)."""
    p = placement(spec, "xla", *extra)
    move = jax.jit(p.from_logical, out_shardings=p.param_shardings)
    with jax.set_mesh(p.mesh):
        return move(logical_params())


def loss_and_grads(spec: str, impl: str, extra: tuple[str, ...]) -> tuple[float, dict]:
    p = placement(spec, impl, *extra)
    params = initial_params(spec, extra)
    with jax.set_mesh(p.mesh):
        loss, g = jax.jit(jax.value_and_grad(p.loss))(
            params, jax.device_put(tokens(), p.batch_sharding)
        )
    grads = {".".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(g)}
    return float(loss), grads


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.parametrize("spec,extra", LAYOUTS)
def test_dot_product_equals_xla_in_training(spec, extra):
    assert placement(spec, "dot_product", *extra).attention == "dot_product"  # on CPU: jax's XLA
    loss, grads = loss_and_grads(spec, "dot_product", extra)
    ref_loss, ref_grads = loss_and_grads(spec, "xla", extra)
    assert abs(loss - ref_loss) / abs(ref_loss) < 1e-5
    assert grads.keys() == ref_grads.keys()
    errors = {name: rel_err(grads[name], ref_grads[name]) for name in grads}
    assert max(errors.values()) < 1e-5, errors
    assert min(np.abs(g).max() for g in grads.values()) > 0  # every gradient is exercised


@pytest.mark.parametrize("spec", ["data=1", "data=2,pipeline=2,tensor=2"])
def test_dot_product_equals_xla_in_cached_decoding(spec):
    params = initial_params(spec)
    rows = np.arange(4)
    lengths = np.array([5, 8, 3, 12], np.int32)
    prompts = np.where(np.arange(16)[None] < lengths[:, None], tokens()[:4, :16], 0)
    logits = {}
    for impl in ("xla", "dot_product"):
        gen = Generator(placement(spec, impl, serving=True), params, batch=4, max_len=20)
        cache, first, _ = gen.prefill(gen.empty_cache(), prompts, lengths)
        steps, position = [np.asarray(first)], lengths.copy()
        for _ in range(3):
            cache, step, _ = gen.decode(cache, tokens()[rows, position], position)
            steps.append(np.asarray(step)[:, 0])
            position += 1
        logits[impl] = np.stack(steps)
    assert rel_err(logits["dot_product"], logits["xla"]) < 1e-5


def test_attend_masks_by_position():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(1, 1, 4, 8)), jnp.float32)
    kv = jnp.asarray(rng.normal(size=(1, 6, 2, 8)), jnp.float32)
    for impl in ("xla", "dot_product"):
        # A query at position 2 sees keys 0..2 only: changing keys 3..5 changes nothing.
        at_2 = attend(q, kv, kv, jnp.array([[2]]), None, impl)
        other = kv.at[:, 3:].set(0.0)
        np.testing.assert_array_equal(at_2, attend(q, other, other, jnp.array([[2]]), None, impl))
        assert not np.allclose(at_2, attend(q, kv, kv, jnp.array([[5]]), None, impl))
    causal = attend(kv[:, :, :1].repeat(4, 2), kv, kv)  # positions None: causal
    first = attend(kv[:, :1, :1].repeat(4, 2), kv[:, :1], kv[:, :1])
    np.testing.assert_allclose(causal[:, :1], first, rtol=1e-6)


def test_implementation_choice_on_this_host():
    assert jax.default_backend() == "cpu"
    assert resolve("auto", 4, 2, 8, jnp.float32) == "xla"  # no fused kernel on CPU
    assert resolve("xla", 4, 2, 8, jnp.float32) == "xla"
    assert resolve("dot_product", 4, 2, 8, jnp.float32) == "dot_product"
    with pytest.raises(JaxparError, match="model.attention='flash' is not one of auto, xla"):
        load_config(None, ["model.attention=flash"])


def _qkv_concats(hlo_text: str, layer_shape: tuple[int, ...]) -> list[int]:
    """How often each concatenate that builds fused Q/K/V weights (one layer's, `layer_shape`, or
    a stack of them) runs per program."""
    dims = re.compile(r"[\[,]" + ",".join(map(str, layer_shape)) + r"\]")
    module = parse(hlo_text)
    return [
        trips
        for ins, trips in module.instructions()
        if ins.op == "concatenate" and dims.search(ins.type_text)
    ]


@pytest.mark.parametrize(
    "spec,extra",
    [
        ("pipeline=2", ("pipeline.microbatches=4",)),
        ("data=2,tensor=4", ("pipeline.microbatches=2",)),
    ],
)
def test_fused_weights_are_derived_once_per_step(spec, extra):
    p = placement(spec, "xla", *extra)
    m = p.config.model
    k_local = m.kv_heads // p.spec.tensor
    fused = (m.dim, k_local, m.heads // m.kv_heads + 2, m.head_dim)
    compiled, _ = Trainer(p).compile()
    assert p.schedule.ticks > 1  # several ticks (and layers) use the weights
    assert _qkv_concats(compiled.as_text(), fused) == [1]


def test_decode_steps_read_prepared_weights():
    # bfloat16 serving of float32 parameters: the casts and the fusion happen once, when the
    # generator is built. The decode step's program (its jaxpr: XLA's CPU backend adds casts of
    # its own, as it computes bfloat16 matmuls in float32) neither concatenates nor casts a weight.
    p = placement("data=2,tensor=4", "xla", "train.dtype=bfloat16", serving=True)
    params = initial_params("data=2,tensor=4")
    gen = Generator(p, params, batch=2, max_len=8)
    m = p.config.model
    fused = (m.dim, m.kv_heads, m.heads // m.kv_heads + 2, m.head_dim)  # one layer's, global
    assert gen.weights.w_qkv_DKCH.shape == (1, m.layers, *fused)
    assert gen.weights.w_qkv_DKCH.dtype == gen.top["head_DV"].get_value().dtype == p.dtype
    jaxpr = str(gen.decode_jaxpr())
    weight_dims = [fused, (m.dim, m.vocab), (m.vocab, m.dim)]  # a layer's QKV, head, embedding
    shapes = "|".join(",".join(map(str, w)) for w in weight_dims)
    derived = re.compile(r"\[(\d+,)*(" + shapes + r")\].* = (convert_element_type|concatenate)")
    assert "convert_element_type" in jaxpr and "concatenate" in jaxpr  # (of activations)
    assert [line for line in jaxpr.splitlines() if derived.search(line)] == []


def test_a_gpu_without_working_cudnn_falls_back_or_refuses(monkeypatch):
    import jaxpar.model.attention as attention

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(attention, "_cudnn_failure", lambda *shape: "RuntimeError: no kernel")
    notices = []
    assert resolve("auto", 4, 2, 8, jnp.bfloat16, notices.append) == "xla"
    assert notices == [
        "cuDNN attention is not available here (RuntimeError: no kernel); using model.attention=xla"
    ]
    with pytest.raises(JaxparError, match="model.attention=dot_product: cuDNN attention fails"):
        resolve("dot_product", 4, 2, 8, jnp.bfloat16)
    # float32: cuDNN has no flash kernel for it, so nothing is tried and nothing is said.
    assert resolve("auto", 4, 2, 8, jnp.float32, notices.append) == "xla"
    assert resolve("dot_product", 4, 2, 8, jnp.float32) == "dot_product"
    monkeypatch.setattr(attention, "_cudnn_failure", lambda *shape: None)
    assert resolve("auto", 4, 2, 8, jnp.bfloat16) == "cudnn"
    assert len(notices) == 1
