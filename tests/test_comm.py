"""Communication read from the compiled train step's HLO, and the HLO reader itself."""

import functools
import math

import jax
import pytest
from sizes import BATCH, DIM, LAYERS, SEQ, TRAFFIC

from jaxpar.analysis.comm import megatron_check, megatron_expected_bytes, traffic
from jaxpar.analysis.hlo import axes_of_groups, collectives, parse_groups
from jaxpar.analysis.params import tree_bytes_per_device
from jaxpar.config import load_config
from jaxpar.mesh import AXES, make_mesh, parse_mesh
from jaxpar.placement import Placement
from jaxpar.train.step import Trainer


@functools.cache
def compiled_collectives(mesh_spec: str, fsdp: bool = False):
    config = load_config(None, [*TRAFFIC, f"parallel.fsdp={fsdp}"])
    mesh = make_mesh(parse_mesh(mesh_spec))
    trainer = Trainer(Placement(config, mesh))
    compiled, _ = trainer.compile()
    found = collectives(compiled.as_text(), tuple(mesh.shape[a] for a in AXES), AXES)
    return trainer, found


@pytest.mark.parametrize(
    "mesh_spec,fsdp", [("data=2,tensor=4", False), ("tensor=8", False), ("data=4,tensor=2", True)]
)
def test_tensor_parallel_traffic_is_megatrons_minimum(mesh_spec, fsdp):
    trainer, found = compiled_collectives(mesh_spec, fsdp)
    config = trainer.placement.config
    b_local = config.train.batch_size // trainer.placement.mesh.shape["data"]
    check = megatron_check(found, config.model, b_local, config.train.seq_len, act_bytes=4)
    # Per layer 2 forward + 2 backward, plus embedding forward and LM-head backward.
    assert check.measured_activation == check.expected_activation == 4 * LAYERS + 2
    assert check.measured_ce == 3
    assert check.measured_bytes == check.expected_bytes
    activation = (4 * LAYERS + 2) * b_local * SEQ * DIM
    assert check.expected_bytes == (activation + 3 * b_local * SEQ) * 4
    assert check.unexpected == ()
    assert check.exact
    # Nothing but all-reduces ever runs over the tensor groups: no weight is gathered.
    assert {c.kind for c in found if "tensor" in c.axes} == {"all-reduce"}


@pytest.mark.parametrize("mesh_spec", ["data=8", "data=2,tensor=4"])
def test_data_parallel_gradients_are_reduced_once(mesh_spec):
    # Over `data`, the non-scalar all-reduces are the gradients: each local shard exactly once.
    trainer, found = compiled_collectives(mesh_spec)
    param_bytes = tree_bytes_per_device(
        trainer.placement.abstract_params, trainer.placement.param_shardings
    )
    grad_bytes = sum(
        c.trips * sum(4 * math.prod(s) for _, s in c.shapes if math.prod(s) > 1)
        for c in found
        if c.axes == ("data",) and c.kind == "all-reduce"
    )
    assert grad_bytes == param_bytes


def test_fsdp_gathers_weights_over_data_only():
    _, found = compiled_collectives("data=4,tensor=2", True)
    by_kind = {(t.kind, t.axes): t for t in traffic(found)}
    assert ("all-gather", ("data",)) in by_kind
    assert not [c for c in found if c.kind == "all-gather" and c.axes != ("data",)]


@pytest.mark.parametrize(
    ("mesh_spec", "remat"), [("context=4", "none"), ("data=2,context=2,tensor=2", "none"),
                             ("context=2", "full")],
)  # fmt: skip
def test_ring_permutes_over_context_are_the_rings_formula(mesh_spec, remat):
    config = load_config(None, [*TRAFFIC, f"parallel.mesh={mesh_spec}", f"model.remat={remat}"])
    spec = parse_mesh(mesh_spec)
    mesh = make_mesh(spec, jax.devices()[: spec.size])
    compiled, _ = Trainer(Placement(config, mesh)).compile()
    found = collectives(compiled.as_text(), spec.sizes, AXES)
    permutes = [c for c in found if c.kind == "collective-permute"]
    assert permutes and all(c.axes == ("context",) for c in permutes)
    # one piece's keys (or values) of one layer: (B / data, T / C, K / tensor, H)
    c, m = spec.context, config.model
    kv = BATCH // spec.data * SEQ // c * m.kv_heads // spec.tensor * m.head_dim
    assert all(math.prod(shape) == kv for p in permutes for _, shape in p.shapes)
    forward = [p for p in permutes if "transpose" not in p.op_name]
    backward = [p for p in permutes if "transpose" in p.op_name]
    # forward: C - 1 hops of k and v (float32 here, the compute dtype); backward: C - 1 hops of
    # k, v, dk and dv (float32) and one last hop of dk and dv; per layer
    cb = 4
    fwd = LAYERS * 2 * (c - 1) * kv * cb
    bwd = LAYERS * ((c - 1) * (2 * kv * cb + 2 * kv * 4) + 2 * kv * 4)
    moved = lambda ps: sum(p.total_bytes for p in ps)  # noqa: E731
    recomputed = [p for p in backward if "rematted_computation" in p.op_name]
    if remat == "full":
        # the forward ring runs again in the backward pass; XLA merges the backward's own hops of
        # k and v with it (the same permutes of the same arrays), so the bytes are the same
        assert moved(recomputed) == fwd
    else:
        assert not recomputed
    assert moved(forward) == fwd
    assert moved(permutes) == fwd + bwd


def test_megatron_expected_bytes_formula():
    config = load_config(None, TRAFFIC)
    # L=4, b=2, s=16, d=64, float32: (4*4 + 2) * 2*16*64 * 4 + 3 * 2*16 * 4
    assert megatron_expected_bytes(config.model, 2, 16, 4) == 18 * 2048 * 4 + 384


# The reader on hand-written HLO: every replica-group form and nested loop trip counts.

HLO = """HloModule test, entry_computation_layout={()->f32[]}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%inner_body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]) parameter(0)
  %x = f32[4,8] get-tuple-element(%p), index=1
  %ar = f32[4,8]{1,0} all-reduce(%x), channel_id=1, replica_groups=[2,4]<=[8], use_global_device_ids=true, to_apply=%add
  ROOT %t = (s32[], f32[4,8]) tuple(%i, %ar)
}

%outer_body (q: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %q = (s32[], f32[4,8]) parameter(0)
  %w = (s32[], f32[4,8]) while(%q), condition=%cond, body=%inner_body, backend_config={"known_trip_count":{"n":"3"}}
  %y = f32[4,8] get-tuple-element(%w), index=1
  %ag = bf16[8,8]{1,0} all-gather(%y), channel_id=2, replica_groups=[4,2]<=[2,4]T(1,0), dimensions={0}, use_global_device_ids=true
  ROOT %u = (s32[], f32[4,8]) tuple(%j, %y)
}

ENTRY %main () -> f32[] {
  %init = (s32[], f32[4,8]) tuple(%zero, %z)
  %loop = (s32[], f32[4,8]) while(%init), condition=%cond, body=%outer_body, backend_config={"known_trip_count":{"n":"5"}}
  %r = (f32[2], f32[]) all-reduce(%v, %c), channel_id=3, replica_groups=mesh['axis_0'=2,'axis_1'=1,'axis_2'=4] {'axis_0'}, to_apply=%add
  %cp = f32[16]{0} collective-permute(%v), channel_id=4, source_target_pairs={{0,2},{2,0},{4,6},{6,4}}
  ROOT %o = f32[] constant(0)
}
"""


def test_hlo_reader_applies_nested_trip_counts_and_reads_every_group_form():
    mesh_shape = (2, 2, 1, 2)  # data, pipeline, context, tensor
    found = {c.kind: c for c in collectives(HLO, mesh_shape, AXES)}
    ar_inner = [c for c in collectives(HLO, mesh_shape, AXES) if c.kind == "all-reduce"][0]
    assert (
        ar_inner.trips == 15 and ar_inner.bytes == 128 and ar_inner.axes == ("pipeline", "tensor")
    )
    assert ar_inner.total_bytes == 15 * 128
    gather = found["all-gather"]
    assert gather.trips == 5 and gather.bytes == 128 and gather.axes == ("data",)
    permute = found["collective-permute"]
    assert permute.trips == 1 and permute.axes == ("pipeline",)


def test_replica_group_forms():
    assert parse_groups("replica_groups={{0,1},{2,3}}", 4) == [[0, 1], [2, 3]]
    assert parse_groups("replica_groups={}", 4) == [[0, 1, 2, 3]]
    assert parse_groups("replica_groups=[2,4]<=[8]", 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert parse_groups("replica_groups=[4,2]<=[2,4]T(1,0)", 8) == [
        [0, 4], [1, 5], [2, 6], [3, 7]
    ]  # fmt: skip
    named = "replica_groups=mesh['axis_0'=2,'axis_1'=1,'axis_2'=4] {'axis_2'}"
    assert parse_groups(named, 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    named = "replica_groups=mesh['axis_0'=2,'axis_1'=1,'axis_2'=4] {'axis_0'}"
    assert parse_groups(named, 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    # The named form with a device order: tensor pairs of data=4,tensor=2 as XLA prints them.
    named = (
        "replica_groups=mesh['axis_0'=1,'axis_1'=2,'axis_2'=4], device_ids=([4,2]T(1,0)) {'axis_1'}"
    )
    assert parse_groups(named, 8) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    named = "replica_groups=mesh['axis_0'=2,'axis_1'=2], device_ids=(3,2,1,0) {'axis_0'}"
    assert parse_groups(named, 4) == [[3, 1], [2, 0]]
    with pytest.raises(ValueError, match="cannot read the replica groups"):
        parse_groups("replica_groups=something_new", 8)
    assert axes_of_groups([[0, 4], [1, 5]], (2, 1, 1, 4), AXES) == ("data",)
    assert axes_of_groups([[0], [1]], (2, 1, 1, 4), AXES) == ()
    # context pairs of data=2,context=2,tensor=2 (tensor fastest), as an iota XLA prints
    context = parse_groups("replica_groups=[4,2]<=[2,2,2]T(0,2,1)", 8)
    assert context == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert axes_of_groups(context, (2, 1, 2, 2), AXES) == ("context",)


def test_the_devices_of_a_collective_are_mesh_positions():
    mesh = make_mesh(parse_mesh("data=2,tensor=4"))
    assert [d.id for d in mesh.devices.flat] == [d.id for d in jax.devices()]
