"""Exact PartitionSpecs of every parameter under each preset, and rule validation.

Every dimension size is distinct (L=3, D=24, N=4, K=2, H=6, F=40, V=56), so a spec applied to the
wrong (e.g. transposed) dimension shows up as a wrong shard shape.
"""

import math

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxpar import sharding as S
from jaxpar.analysis.params import param_rows
from jaxpar.config import load_config
from jaxpar.errors import JaxparError
from jaxpar.mesh import MeshSpec, make_mesh, parse_mesh
from jaxpar.placement import Placement
from jaxpar.train.step import Trainer

SIZES = [
    "model.layers=3", "model.dim=24", "model.heads=4", "model.kv_heads=2",
    "model.mlp_dim=40", "model.vocab=56", "train.batch_size=8", "train.seq_len=8",
]  # fmt: skip

SHAPES = {
    "blocks.attn.wq_DNH": (1, 3, 24, 4, 6),
    "blocks.attn.wk_DKH": (1, 3, 24, 2, 6),
    "blocks.attn.wv_DKH": (1, 3, 24, 2, 6),
    "blocks.attn.wo_NHD": (1, 3, 4, 6, 24),
    "blocks.attn_norm.scale": (1, 3, 24),
    "blocks.mlp.w_gate_DF": (1, 3, 24, 40),
    "blocks.mlp.w_up_DF": (1, 3, 24, 40),
    "blocks.mlp.w_down_FD": (1, 3, 40, 24),
    "blocks.mlp_norm.scale": (1, 3, 24),
    "embed_VD": (56, 24),
    "final_norm.scale": (24,),
    "head_DV": (24, 56),
}

_T, _D, _S = "tensor", "data", "pipeline"
MEGATRON = {
    "blocks.attn.wq_DNH": P(_S, None, None, _T, None),
    "blocks.attn.wk_DKH": P(_S, None, None, _T, None),
    "blocks.attn.wv_DKH": P(_S, None, None, _T, None),
    "blocks.attn.wo_NHD": P(_S, None, _T, None, None),
    "blocks.attn_norm.scale": P(_S, None, None),
    "blocks.mlp.w_gate_DF": P(_S, None, None, _T),
    "blocks.mlp.w_up_DF": P(_S, None, None, _T),
    "blocks.mlp.w_down_FD": P(_S, None, _T, None),
    "blocks.mlp_norm.scale": P(_S, None, None),
    "embed_VD": P(_T, None),
    "final_norm.scale": P(None),
    "head_DV": P(None, _T),
}
FSDP = {
    "blocks.attn.wq_DNH": P(_S, None, _D, _T, None),
    "blocks.attn.wk_DKH": P(_S, None, _D, _T, None),
    "blocks.attn.wv_DKH": P(_S, None, _D, _T, None),
    "blocks.attn.wo_NHD": P(_S, None, _T, None, _D),
    "blocks.attn_norm.scale": P(_S, None, None),
    "blocks.mlp.w_gate_DF": P(_S, None, _D, _T),
    "blocks.mlp.w_up_DF": P(_S, None, _D, _T),
    "blocks.mlp.w_down_FD": P(_S, None, _T, _D),
    "blocks.mlp_norm.scale": P(_S, None, None),
    "embed_VD": P(_T, _D),
    "final_norm.scale": P(None),
    "head_DV": P(_D, _T),
}
REPLICATED = {name: P(*(None,) * len(shape)) for name, shape in SHAPES.items()}
DATA_PARALLEL = {
    name: P(_S, *(None,) * (len(shape) - 1))
    if name.startswith("blocks")
    else P(*(None,) * len(shape))
    for name, shape in SHAPES.items()
}

CASES = [
    # (preset, mesh, fsdp flag, expected specs, expected shard shape of wq, of head)
    ("replicated", "data=1", False, REPLICATED, (1, 3, 24, 4, 6), (24, 56)),
    ("data-parallel", "data=8", False, DATA_PARALLEL, (1, 3, 24, 4, 6), (24, 56)),
    ("megatron", "data=4,tensor=2", False, MEGATRON, (1, 3, 24, 2, 6), (24, 28)),
    ("fsdp", "data=4,tensor=2", True, FSDP, (1, 3, 6, 2, 6), (6, 28)),
]


@pytest.mark.parametrize("preset,mesh_spec,fsdp,expected,wq_shard,head_shard", CASES)
def test_exact_partition_specs(preset, mesh_spec, fsdp, expected, wq_shard, head_shard):
    spec = parse_mesh(mesh_spec)
    devices = jax.devices()[: spec.size]
    config = load_config(None, [*SIZES, f"parallel.fsdp={fsdp}"])
    trainer = Trainer(Placement(config, make_mesh(spec, devices)))
    assert trainer.placement.rules is S.PRESETS[preset]
    rows = {
        r.name: r
        for r in param_rows(trainer.placement.abstract_params, trainer.placement.param_shardings)
    }
    assert {name: r.shape for name, r in rows.items()} == SHAPES
    assert {name: r.spec for name, r in rows.items()} == expected
    shardings = {
        ".".join(map(str, path)): v.get_value()
        for path, v in nnx.to_flat_state(trainer.placement.param_shardings)
    }
    shard = {name: shardings[name].shard_shape(SHAPES[name]) for name in rows}
    assert shard["blocks.attn.wq_DNH"] == wq_shard
    assert shard["head_DV"] == head_shard
    for name, r in rows.items():
        assert r.bytes_per_device == 4 * math.prod(shard[name])


def test_optimizer_state_follows_parameter_shardings():
    config = load_config(None, [*SIZES, "parallel.fsdp=true"])
    trainer = Trainer(Placement(config, make_mesh(parse_mesh("data=4,tensor=2"))))
    adam = trainer.state_shardings.opt_state[1][0]  # chain(clip, adamw) -> adamw's ScaleByAdamState
    flat_mu = {".".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(adam.mu)}
    assert flat_mu["blocks.attn.wq_DNH"].spec == FSDP["blocks.attn.wq_DNH"]
    assert flat_mu["head_DV"].spec == FSDP["head_DV"]
    assert adam.count.spec == P()


def test_activation_names_stay_off_data_under_fsdp():
    assert S.FSDP.spec((S.BATCH, S.SEQ, S.ACT_EMBED)) == P("data", "context", None)
    assert S.FSDP.spec((S.BATCH, S.SEQ, S.ACT_VOCAB)) == P("data", "context", "tensor")


def test_only_activations_are_split_over_context():
    """`sequence` lands on `context` in every preset; no parameter axis ever does, so neither a
    checkpoint nor a Hugging Face folder depends on it."""
    params = (S.STAGE, S.LAYERS, S.EMBED, S.HEADS, S.KV_HEADS, S.HEAD_DIM, S.MLP, S.VOCAB, S.NORM)
    for rules in (S.DATA_PARALLEL, S.MEGATRON, S.FSDP):
        assert rules.mesh_axes(S.SEQ) == "context"
        assert all("context" not in S._as_tuple(rules.mesh_axes(a)) for a in params)


def test_conflicting_axes_raise():
    with pytest.raises(JaxparError, match="both map to mesh axis 'data'"):
        S.FSDP.spec((S.BATCH, S.EMBED))


def test_unknown_logical_name_raises():
    with pytest.raises(JaxparError, match="unknown logical axis 'hidden'"):
        S.MEGATRON.spec(("hidden", S.MLP))


def test_rules_validate_their_mapping():
    with pytest.raises(JaxparError, match="unknown mesh axis 'model'"):
        S.Rules("bad", ((S.MLP, "model"),))
    with pytest.raises(JaxparError, match="unknown logical axis 'hidden'"):
        S.Rules("bad", (("hidden", "tensor"),))
    with pytest.raises(JaxparError, match="mapped twice"):
        S.Rules("bad", ((S.MLP, "tensor"), (S.MLP, None)))


@pytest.mark.parametrize(
    "data,tensor,fsdp,name",
    [(1, 1, False, "replicated"), (8, 1, False, "data-parallel"), (2, 4, False, "megatron"),
     (1, 8, False, "megatron"), (4, 2, True, "fsdp"), (8, 1, True, "fsdp")],
)  # fmt: skip
def test_preset_choice(data, tensor, fsdp, name):
    assert S.rules_for(MeshSpec(data=data, pipeline=1, tensor=tensor), fsdp).name == name
    if name != "replicated":
        assert S.rules_for(MeshSpec(data=data, pipeline=2, tensor=tensor), fsdp).name == name
    assert S.rules_for(MeshSpec(data=1, pipeline=4, tensor=1), False).name == "data-parallel"


def test_pipeline_stage_axis_lands_on_pipeline():
    # 5 layers over 2 stages: chunks of 3 and 2 layers, padded to 3 slots per stage.
    sizes = [s for s in SIZES if not s.startswith("model.layers")] + ["model.layers=5"]
    mesh = make_mesh(parse_mesh("data=2,pipeline=2,tensor=2"))
    trainer = Trainer(Placement(load_config(None, sizes), mesh))
    assert trainer.placement.rules is S.MEGATRON
    rows = {
        r.name: r
        for r in param_rows(trainer.placement.abstract_params, trainer.placement.param_shardings)
    }
    assert rows["blocks.attn.wq_DNH"].shape == (2, 3, 24, 4, 6)
    assert rows["blocks.attn.wq_DNH"].logical_axes == (
        "stage",
        "layers",
        "embed",
        "heads",
        "head_dim",
    )
    assert {name: r.spec for name, r in rows.items()} == MEGATRON
    # one stage's slots, half the heads: (1, 3, 24, 2, 6) float32 per device
    assert rows["blocks.attn.wq_DNH"].bytes_per_device == 4 * 3 * 24 * 2 * 6
    assert rows["head_DV"].bytes_per_device == 4 * 24 * 28
    assert S.MEGATRON.spec((S.OUTER_BATCH, S.SEQ, S.ACT_VOCAB)) == P(
        ("data", "pipeline"), "context", _T
    )
