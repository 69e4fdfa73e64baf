"""Schedules with their own backward: compiled memory flat in M, remat per layer, and the
traffic between stages read from the compiled step."""

import jax
import pytest
from pipeline_cases import interleaved, one_f, trainer, zb

from jaxpar.analysis.flops import action_costs
from jaxpar.analysis.hlo import collectives, parse
from jaxpar.config import load_config
from jaxpar.mesh import AXES, make_mesh, parse_mesh
from jaxpar.pipeline.schedule import Schedule
from jaxpar.placement import Placement
from jaxpar.train.step import Trainer

MEMORY = [
    "model.layers=4", "model.dim=64", "model.heads=4", "model.kv_heads=4", "model.mlp_dim=128",
    "model.vocab=256", "train.seq_len=64", "train.dtype=float32",
]  # fmt: skip


def temp_bytes(mesh_spec: str, extra: list[str]) -> int:
    spec = parse_mesh(mesh_spec)
    config = load_config(None, [*MEMORY, *extra])
    tr = Trainer(Placement(config, make_mesh(spec, jax.devices()[: spec.size])))
    return tr.compile()[0].memory_analysis().temp_size_in_bytes


def test_1f1b_and_zb_v_memory_is_flat_in_micro_batches():
    def at(m: int, *schedule: str) -> int:
        rows = 2  # per micro-batch, the same at every M
        sizes = ["model.layers=8", f"train.batch_size={rows * m}", f"pipeline.microbatches={m}"]
        return temp_bytes("pipeline=4", [*sizes, *schedule])

    # single ticks (auto takes fused ones from M = 8 with these sizes: B costs 1.17 F here):
    # 1F1B's stage s keeps P - s jobs at every M, ZB-V 2P jobs of half the layers (1F1B's
    # activations) and P pending W's; experiments/pipeline_schedules.py compiles them all
    assert Schedule("1f1b", 4, 4).stash_slots == Schedule("1f1b", 4, 32).stash_slots == 4
    assert Schedule("zb_v", 4, 4, 2).stash_slots == Schedule("zb_v", 4, 32, 2).stash_slots == 8
    v = {m: at(m, "pipeline.schedule=zb_v", "pipeline.repeats=2") for m in (4, 32)}
    assert v[32] <= 1.15 * v[4], v


def test_remat_per_layer_saves_memory_on_one_device():
    sizes = ["train.batch_size=8", "model.layers=8"]
    none = temp_bytes("data=1", [*sizes, "model.remat=none"])
    full = temp_bytes("data=1", [*sizes, "model.remat=full"])
    assert full <= 0.4 * none, (full, none)


@pytest.mark.parametrize("extra", [one_f(4), interleaved(4)])  # zb_v: test_plan_traffic
def test_two_permutes_per_tick_and_no_weight_gathers_over_pipeline(extra):
    tr = trainer("pipeline=2,tensor=2", 8, extra)
    module = parse(tr.compile()[0].as_text())
    found = collectives(module, tr.placement.spec.sizes, AXES)
    ticks = tr.placement.schedule.ticks
    permutes = [c for c in found if c.kind == "collective-permute"]
    assert sum(c.trips for c in permutes) == 2 * ticks
    assert {c.axes for c in permutes} == {("pipeline",)}
    gathers = [c for c in found if c.kind == "all-gather" and "pipeline" in c.axes]
    # only the token ids gather over pipeline (inputs and targets), once, outside the ticks
    assert all(c.trips == 1 for c in gathers) and len(gathers) <= 2, gathers
    assert all(dtype == "s32" for c in gathers for dtype, _ in c.shapes), gathers


def test_zero_bubble_w_is_the_weight_part_of_the_backward_and_recomputes_nothing():
    placement = trainer("pipeline=2", 8, zb(4)).placement
    costs = action_costs(placement)
    assert costs.b + costs.w == costs.full_backward
    assert 0 < costs.w < costs.full_backward and 0 < costs.b < costs.full_backward
    # with these costs ZB-H1's lockstep step is cheaper than 1F1B's
    assert costs.lockstep_cost(Schedule("zb_h1", 4, 8)) < costs.lockstep_cost(
        Schedule("1f1b", 4, 8)
    )


def instructions(mesh_spec: str, layers: int, extra: tuple[str, ...]) -> int:
    module = parse(trainer(mesh_spec, layers, extra).compile()[0].as_text())
    return sum(len(body) for body in module.computations.values())


@pytest.mark.parametrize("schedule", [one_f])  # zb_h1 single: the same program, W's moved
def test_compiled_program_does_not_grow_with_micro_batches_or_layers(schedule):
    small = instructions("pipeline=2,tensor=2", 4, schedule(2))
    # twice the layers and twice M: the program the permutes test above compiles
    large = instructions("pipeline=2,tensor=2", 8, schedule(4))
    assert abs(large - small) <= 0.02 * small, (small, large)
