"""What the speed work relies on: the FLOPs behind MFU and HFU, remat policies, Adam's moments in
bfloat16, and the runtime settings jaxpar applies as JAX starts."""

import contextlib
import io
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals
from pipeline_cases import B, T, tokens, trainer

from jaxpar import runtime
from jaxpar.analysis.flops import model_flops, recompute_flops
from jaxpar.analysis.hlo import dot_flops
from jaxpar.config import REMAT, load_config
from jaxpar.model.llama import swiglu
from jaxpar.train.bench import step_flops
from jaxpar.train.step import make_optimizer, state_stored_in


@pytest.mark.parametrize("remat", REMAT)
def test_hardware_flops_are_the_model_flops_plus_what_remat_recomputes(remat):
    """One device runs exactly the model's matmuls plus the policy's recomputation."""
    tr = trainer("data=1", 2, (f"model.remat={remat}",))
    m = tr.placement.config.model
    ran = dot_flops(tr.compile()[0].as_text())
    assert ran == model_flops(m, B, T) + recompute_flops(m, B, T, remat)
    model, hardware = step_flops(tr)  # B x T is the config's batch
    assert model == model_flops(m, B, T, causal=True) < model_flops(m, B, T)
    assert hardware == ran  # the XLA path computes every key position


def test_swiglu_backward_keeps_its_inputs_and_equals_autodiff():
    gate, up, g = jax.random.normal(jax.random.key(0), (3, 4, 8, 16), jnp.float32)
    mine = jax.vjp(swiglu, gate, up)[1](g)
    plain = jax.vjp(lambda a, b: jax.nn.silu(a) * b, gate, up)[1](g)
    for a, b in zip(mine, plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(swiglu, gate, up)
    kept = out.getvalue().splitlines()  # gate and up, nothing derived from them
    assert kept == ["f32[4,8,16] from the argument gate", "f32[4,8,16] from the argument up"]


def test_causal_half_is_half_of_attention():
    m = load_config(None, ["model.layers=2", "model.dim=64", "model.heads=4"]).model
    full, causal = model_flops(m, 4, 256), model_flops(m, 4, 256, causal=True)
    attention = 3 * 4 * 256 * m.layers * 2 * 2 * 256 * m.heads * m.head_dim
    assert full - causal == attention // 2


def test_the_tick_loop_keeps_no_copy_of_the_weights():
    """GPipe's backward is the transposed tick scan: what a tick keeps for it is the chunk's
    activations, never a per-tick copy of the stage's weights."""
    tr = trainer("pipeline=2", 4, ("pipeline.microbatches=2",))
    p = tr.placement
    params = tr.abstract_state().params
    weights = jax.eval_shape(
        lambda params: nnx.merge(p.graphdef, params).blocks.weights(jnp.float32), params
    )
    per_stage = {tuple(w.shape[1:]) for w in jax.tree.leaves(weights)}  # [v * c, ...]
    tokens = jax.ShapeDtypeStruct((B, T + 1), jnp.int32, sharding=p.batch_sharding)
    printed = io.StringIO()  # jax's public view of them is this printout
    with jax.set_mesh(p.mesh), contextlib.redirect_stdout(printed):
        print_saved_residuals(p.loss, params, tokens)
    kept = [tuple(int(n) for n in dims.split(",") if n)
            for dims in re.findall(r"^\w+\[([\d,]*)\]", printed.getvalue(), re.M)]  # fmt: skip
    assert any(len(s) > 1 and s[0] % p.schedule.ticks == 0 for s in kept)  # per-tick ones
    assert not [s for s in kept if tuple(s[1:]) in per_stage]


def test_float32_moments_are_the_optimizer_itself():
    cfg = load_config(None, ["train.opt_dtype=float32"]).train
    params = {"w": jnp.linspace(-1.0, 1.0, 12, dtype=jnp.float32).reshape(3, 4)}
    grads = {"w": jnp.cos(params["w"] * 7)}
    plain = optax.adamw(0.1, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
    wrapped = state_stored_in(plain, jnp.float32)
    a, b = plain.init(params), wrapped.init(params)
    for _ in range(3):
        (ua, a), (ub, b) = plain.update(grads, a, params), wrapped.update(grads, b, params)
        np.testing.assert_array_equal(ua["w"], ub["w"])
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_bfloat16_moments_round_only_what_is_stored():
    """The first update is computed from float32 moments, so the parameters equal the float32
    run's exactly; the stored moments are those moments rounded to bfloat16."""
    f32 = trainer("data=1", 2, ())
    b16 = trainer("data=1", 2, ("train.opt_dtype=bfloat16",))
    abstract = b16.abstract_state()
    floating = [x for x in jax.tree.leaves(abstract.opt_state) if x.dtype != jnp.int32]
    assert floating and all(x.dtype == jnp.bfloat16 for x in floating)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(abstract.params))
    batch = tokens()
    states = []
    for tr in (f32, b16):
        state, _ = tr.step(tr.init_state(), jax.device_put(batch, tr.placement.batch_sharding))
        states.append(jax.device_get(state))
    for x, y in zip(*(jax.tree.leaves(s.params) for s in states), strict=True):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(*(jax.tree.leaves(s.opt_state) for s in states), strict=True):
        np.testing.assert_array_equal(np.asarray(x).astype(y.dtype), y)


def test_optimizer_state_bytes_halve_in_bfloat16():
    def state_bytes(dtype: str) -> int:
        cfg = load_config(None, [f"train.opt_dtype={dtype}", "model.layers=2"])
        tx = make_optimizer(cfg.train, trainer("data=1", 2, ()).placement.abstract_params)
        shapes = jax.eval_shape(tx.init, trainer("data=1", 2, ()).placement.abstract_params)
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes) if x.ndim)

    assert state_bytes("bfloat16") * 2 == state_bytes("float32")


def test_xla_flags_for_the_platform_jax_will_run_on(monkeypatch):
    env = {"XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=false --xla_dump_to=/x"}
    monkeypatch.setattr(runtime, "gpu_plugin_installed", lambda: False)
    monkeypatch.setattr(runtime, "accelerator_plugin_installed", lambda: True)  # a TPU
    assert runtime.xla_flags(env) == [] and env["XLA_FLAGS"].endswith("/x")
    monkeypatch.setattr(runtime, "gpu_plugin_installed", lambda: True)
    added = runtime.xla_flags(env)
    # the user's own setting stays; the others are appended once
    assert "--xla_gpu_enable_latency_hiding_scheduler=false" in env["XLA_FLAGS"]
    assert len(added) == len(runtime.GPU_FLAGS) - 1
    assert all(flag in env["XLA_FLAGS"] for flag in added)
    assert runtime.xla_flags(env) == []
    cpu: dict[str, str] = {}
    monkeypatch.setattr(runtime, "gpu_plugin_installed", lambda: False)
    monkeypatch.setattr(runtime, "accelerator_plugin_installed", lambda: False)
    assert runtime.xla_flags(cpu) == ["--xla_multiheap_size_constraint_per_heap=33554432"]


def test_plugin_detection_respects_jax_platforms(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert not runtime.gpu_plugin_installed()
    assert not runtime.accelerator_plugin_installed()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_host_allocator_settings_take():
    """glibc accepts every `mallopt` setting of `tune_host_allocator`; what they save in page
    faults, with `CPU_FLAGS`' 32 MiB blocks, is the host's: experiments/host_memory.py."""
    assert runtime.tune_host_allocator()
