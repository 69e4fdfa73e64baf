"""Pipeline parallelism: layout, schedules, equality with the sequential model, HLO traffic, bubble.

The reference is the plain sequential model (`Llama.__call__`: one scan over the layers in logical
order) on one device; the pipelined loss runs through the shard_map executor. Gradients are compared
per tensor as max|a - b| / max|b| in float32.
"""

import jax
import numpy as np
import pytest
from pipeline_cases import (
    B,
    D,
    T,
    assert_matches_sequential,
    circular,
    gpipe,
    params_for,
    tokens,
    trainer,
)

from jaxpar.analysis.flops import compute_overhead
from jaxpar.analysis.hlo import collectives
from jaxpar.cli import main
from jaxpar.mesh import AXES
from jaxpar.model.layout import StageLayout
from jaxpar.pipeline.schedule import Schedule

CASES = [
    # Every (P in {2, 4}, M = P or 2P, gpipe or circular) runs, most of them on a mesh with data
    # or tensor parallelism too (all three below: FSDP gpipe, and circular over uneven layers);
    # pipeline alone (manual over `pipeline` only) in five cases; uneven stages in two (P = 4,
    # M = P gpipe: over 6 layers below).
    ("pipeline=2", 8, (*circular(4), "pipeline.stage_layers=[6,2]")),  # stages of 3+3 and 1+1
    ("pipeline=4", 8, (*gpipe(8), "pipeline.stage_layers=[1,4,2,1]")),
    ("pipeline=4,tensor=2", 8, circular(8)),
    ("data=2,pipeline=4", 8, gpipe(8)),
    ("data=2,pipeline=2,tensor=2", 8, (*gpipe(4), "parallel.fsdp=true")),  # ZeRO-3 stages
    # uneven layers: 6 over 4 stages, 7 over 2 stages x 2 repeats (M = P)
    ("pipeline=4", 6, gpipe(4)),
    ("data=2,pipeline=2,tensor=2", 7, circular(2)),
    # recomputation inside the tick changes nothing numerically (full: test_schedules' 1f1b;
    # the policies differ only in what they save, test_schedule_memory's to show)
    ("pipeline=4", 8, (*circular(4), "model.remat=dots")),
    # pipeline=1: micro-batches are gradient accumulation
    ("data=4,tensor=2", 8, gpipe(4)),
]  # fmt: skip


@pytest.mark.parametrize("mesh_spec,layers,extra", CASES)
def test_pipeline_equals_sequential_model(mesh_spec, layers, extra):
    assert_matches_sequential(mesh_spec, layers, extra)


def test_padded_slots_get_no_gradient():
    tr = trainer("pipeline=4", 8, (*gpipe(8), "pipeline.stage_layers=[1,4,2,1]"))
    with jax.set_mesh(tr.placement.mesh):
        g = jax.jit(jax.grad(tr.placement.loss))(
            params_for(tr), jax.device_put(tokens(), tr.placement.batch_sharding)
        )
    w = np.asarray(g["blocks"]["mlp"]["w_down_FD"].get_value())  # [P, slots, F, D]
    padded = tr.placement.layout.slot_layer < 0
    assert padded.sum() == 16 - 8
    assert np.all(w[padded] == 0) and np.all(np.abs(w[~padded]).max(axis=(1, 2)) > 0)


# --- traffic between stages, read from the compiled step ------------------------------------


@pytest.mark.parametrize(
    "mesh_spec,extra",
    [
        ("data=2,pipeline=2,tensor=2", gpipe(4)),
        ("pipeline=4", circular(4)),
        ("pipeline=2,tensor=2", (*gpipe(4), "model.remat=full")),
    ],
)
def test_stage_traffic_is_one_activation_per_tick(mesh_spec, extra):
    tr = trainer(mesh_spec, 8, extra)
    found = collectives(
        tr.compile()[0].as_text(), tuple(tr.placement.mesh.shape[a] for a in AXES), AXES
    )
    sched, data = tr.placement.schedule, tr.placement.mesh.shape["data"]
    micro_rows = B // (data * sched.microbatches)
    activation = 4 * micro_rows * T * D  # float32 (b, T, D) per device

    permutes = [c for c in found if c.kind == "collective-permute"]
    assert all(c.axes == ("pipeline",) for c in permutes)
    assert all(c.shapes == (("f32", (micro_rows, T, D)),) for c in permutes)
    # one send per tick forward and one per tick backward; remat does not repeat them
    assert sum(c.trips for c in permutes) == 2 * sched.ticks
    assert sum(c.total_bytes for c in permutes) == 2 * sched.ticks * activation

    # Over `pipeline` only activations move besides: the micro-batches' inputs gathered to stage 0
    # and the outputs spread back (each data replica its own rows), once forward and once
    # backward, each one all-to-all (no reduction: see `jaxpar.pipeline.executor.gather_stages`).
    # Stage weights never move: they are the shard_map's stage-local inputs.
    q = B // (data * sched.stages)
    moved = [c for c in found if c.kind not in ("all-reduce", "collective-permute") and
             "pipeline" in c.axes]  # fmt: skip
    assert [(c.kind, c.axes, c.trips) for c in moved] == [("all-to-all", ("pipeline",), 1)] * 4
    # (XLA:CPU splits an all-to-all into one operand per stage)
    assert all(c.bytes == 4 * sched.stages * q * T * D for c in moved)
    # The all-reduces that involve `pipeline` are the embedding / LM head gradients (the batch is
    # split over data x pipeline outside the layers) and scalars: no stage weight among them.
    v = 256 // tr.placement.mesh.shape["tensor"]
    outer = {(v, D), (D, v), (D,), ()}
    for c in found:
        if c.kind == "all-reduce" and "pipeline" in c.axes:
            assert {shape for _, shape in c.shapes} <= outer, c


# --- bfloat16 --------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["gpipe", "zb_h1"])
def test_bfloat16_pipelined_step_compiles(schedule):
    """A bfloat16 reduction in a shard_map manual over some mesh axes aborts XLA:CPU (the process
    dies: "Invalid binary instruction opcode copy"); the activations enter and leave the stages
    without one. zb_h1's W ticks (`weight_grads`, which `jaxpar analyze`'s `action_costs` also
    runs) take the gradient of each weight as its matmul casts it, to bfloat16."""
    extra = (f"pipeline.schedule={schedule}", "pipeline.microbatches=2", "train.dtype=bfloat16")
    trainer("data=4,pipeline=2", 2, extra).compile()


# --- bubble ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mesh_spec,extra",
    [
        # (M = P and 2P: gpipe's 4 and circular's 8; circular's 4 is compiled for other tests)
        *[("pipeline=4", extra) for extra in (gpipe(4), circular(4), circular(8))],
        ("data=2,pipeline=2,tensor=2", gpipe(4)),  # compiled for the traffic test above
    ],
)
def test_measured_bubble_of_the_layer_stack_equals_the_schedule(mesh_spec, extra):
    tr = trainer(mesh_spec, 8, extra)
    overhead = compute_overhead(tr.placement, tr.compile()[0].as_text())
    assert overhead.stack_bubble == pytest.approx(tr.placement.schedule.bubble, abs=1e-12)
    p, m, v = (
        tr.placement.schedule.stages,
        tr.placement.schedule.microbatches,
        tr.placement.schedule.repeats,
    )
    assert tr.placement.schedule.bubble == pytest.approx((p - 1) / (v * m + p - 1))
    assert 0 < overhead.bubble < overhead.stack_bubble  # embedding and head are not bubbled


# --- layout and schedule as data -------------------------------------------------------------


def test_uneven_layout_is_balanced_and_padded():
    layout = StageLayout(layers=6, stages=4)
    assert layout.chunk_sizes == (2, 2, 1, 1)
    assert layout.slot_layer.tolist() == [[0, 1], [2, 3], [4, -1], [5, -1]]
    assert "layers per stage [2, 2, 1, 1] in 2 slots each; 2/8 slots padded" in layout.imbalance()


def test_circular_layout_interleaves_chunks():
    layout = StageLayout(layers=8, stages=4, repeats=2)
    assert layout.slot_layer.tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    layout = StageLayout(layers=7, stages=2, repeats=2)
    assert layout.slot_layer.tolist() == [[0, 1, 4, 5], [2, 3, 6, -1]]


def test_v_layout_goes_down_the_stages_and_back():
    # zb_v: stage s holds chunks s and 2P - 1 - s, so stage 0 holds the first and the last
    layout = StageLayout(layers=8, stages=4, repeats=2, shape="v")
    assert layout.slot_layer.tolist() == [[0, 7], [1, 6], [2, 5], [3, 4]]
    layout = StageLayout(layers=7, stages=2, repeats=2, shape="v")
    assert layout.slot_layer.tolist() == [[0, 1, 6, -1], [2, 3, 4, 5]]


@pytest.mark.parametrize("layers,stages,repeats,shape", [
    (6, 4, 1, "circular"), (8, 4, 2, "circular"), (7, 2, 2, "circular"), (5, 1, 1, "circular"),
    (7, 2, 2, "v"),
])  # fmt: skip
def test_layout_round_trip(layers, stages, repeats, shape):
    layout = StageLayout(layers, stages, repeats, shape)
    x = np.arange(layers * 3, dtype=np.float32).reshape(layers, 3) + 1
    stacked = np.asarray(layout.to_stages(x))
    assert stacked.shape == (stages, repeats * layout.chunk_size, 3)
    assert np.all(stacked[layout.slot_layer < 0] == 0)
    np.testing.assert_array_equal(np.asarray(layout.to_logical(stacked)), x)


def test_schedule_tables():
    g = Schedule("gpipe", stages=4, microbatches=4)
    assert g.ticks == 7 and g.bubble == pytest.approx(3 / 7)
    assert g.table()[3].tolist() == [-1, -1, -1, 0, 1, 2, 3]
    c = Schedule("circular", stages=4, microbatches=4, repeats=2)
    assert c.ticks == 11 and c.bubble == pytest.approx(3 / 11)
    assert c.table()[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, -1, -1, -1]
    busy = (c.table() >= 0).sum()
    assert busy == 4 * 8 and 1 - busy / c.table().size == pytest.approx(c.bubble)


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--mesh", "pipeline=4,tensor=2", "model.layers=3"],
         "model.layers=3 is fewer than pipeline stages x repeats = 4 x 1 = 4"),
        (["--mesh", "pipeline=2,tensor=4", "model.layers=3", *circular(2)],
         "model.layers=3 is fewer than pipeline stages x repeats = 2 x 2 = 4"),
        (["--mesh", "data=2,pipeline=2,tensor=2", "pipeline.microbatches=3"],
         "per-replica batch train.batch_size / data = 8 is not divisible by "
         "pipeline.microbatches = 3"),
        (["--mesh", "data=2,pipeline=4", "train.batch_size=4"],
         "per-replica batch train.batch_size / data = 2 is not divisible by pipeline stages = 4"),
        (["pipeline.schedule=2f2b"],
         "pipeline.schedule='2f2b' is not a schedule; valid: gpipe, circular, 1f1b, "
         "interleaved_1f1b, zb_h1"),
        (["pipeline.repeats=0"], "pipeline.repeats=0 must be at least 1"),
        (["pipeline.repeats=2"], "pipeline.repeats=2 needs pipeline.schedule=circular or "
         "interleaved_1f1b (gpipe has one chunk"),
        (["--mesh", "pipeline=2,data=4", "pipeline.schedule=interleaved_1f1b"],
         "pipeline.repeats=1: interleaved_1f1b needs at least 2 chunks per stage"),
        (["--mesh", "pipeline=4,data=2", "model.layers=6", "pipeline.schedule=interleaved_1f1b",
          "pipeline.repeats=2", "pipeline.microbatches=4"],
         "model.layers=6 is fewer than pipeline stages x repeats = 4 x 2 = 8"),
        (["--mesh", "pipeline=4,data=2", "model.layers=8", "pipeline.schedule=interleaved_1f1b",
          "pipeline.repeats=2", "pipeline.microbatches=2"],
         "pipeline.microbatches=2 is not a multiple of pipeline=4: interleaved_1f1b"),
        (["--mesh", "data=8", "pipeline.schedule=zb_h1"],
         "pipeline.schedule=zb_h1 with pipeline=1: there is no pipeline to fill"),
        (["--mesh", "pipeline=4,tensor=2", "model.layers=8", *circular(2)],
         "pipeline.microbatches=2 < pipeline=4: the circular schedule"),
        (["model.remat=some"], "model.remat='some' is not one of none, full"),
        # uneven stages: a wrong sum, a stage with no layer, more chunks than layers, a count
        # per stage that is not one per stage
        (["--mesh", "pipeline=2,data=4", "pipeline.stage_layers=[3,3]"],
         "pipeline.stage_layers=[3, 3] sums to 6 but model.layers=4"),
        (["--mesh", "pipeline=2,data=4", "pipeline.stage_layers=[4,0]"],
         "config key 'pipeline.stage_layers' must be a list of positive integers, got '[4,0]'"),
        (["--mesh", "pipeline=2,data=4", "model.layers=6", *circular(2),
          "pipeline.stage_layers=[5,1]"],
         "pipeline.stage_layers=[5, 1] gives a stage 1 layer(s) but each stage runs 2 chunk(s)"),
        (["--mesh", "pipeline=2,data=4", "pipeline.stage_layers=[1,1,2]"],
         "pipeline.stage_layers=[1, 1, 2] has 3 entries but pipeline=2"),
        (["--mesh", "pipeline=2,data=4", "pipeline.stage_layers=even"],
         "config key 'pipeline.stage_layers' must be a list of positive integers, got 'even'"),
        (["--mesh", "pipeline=2,data=4", "parallel.stage_speeds=[1,1,1]"],
         "parallel.stage_speeds=[1.0, 1.0, 1.0] has 3 entries but pipeline=2"),
    ],
)  # fmt: skip
def test_bad_pipeline_input_exits_2_with_one_line(capsys, tmp_path, args, fragment):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("jaxpar: error: ") and fragment in err, err
    assert not out.exists()
