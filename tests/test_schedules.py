"""Schedules with their own backward (1f1b, interleaved_1f1b, zb_h1, zb_v): tables of single or
fused ticks, the table checker, and equality with the sequential model."""

import numpy as np
import pytest
from pipeline_cases import assert_matches_sequential, interleaved, one_f, zb, zb_v

from jaxpar.errors import JaxparError
from jaxpar.pipeline.schedule import B, F, Schedule, ScheduleError, W, check_table

# --- tables ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name,p,m,v,tick", [
    ("1f1b", 1, 3, 1, "auto"), ("1f1b", 2, 1, 1, "auto"), ("1f1b", 4, 4, 1, "auto"),
    ("1f1b", 4, 32, 1, "auto"), ("1f1b", 4, 8, 1, "fused"),
    ("interleaved_1f1b", 2, 4, 2, "auto"), ("interleaved_1f1b", 4, 8, 3, "auto"),
    ("zb_h1", 2, 1, 1, "auto"), ("zb_h1", 4, 8, 1, "auto"), ("zb_h1", 4, 32, 1, "auto"),
    ("zb_h1", 4, 8, 1, "fused"), ("zb_v", 2, 1, 2, "auto"), ("zb_v", 4, 8, 2, "auto"),
    ("zb_v", 4, 3, 2, "forward"), ("gpipe", 4, 8, 1, "auto"), ("circular", 4, 8, 2, "auto"),
])  # fmt: skip
def test_every_job_runs_each_action_once_in_order(name, p, m, v, tick):
    s = Schedule(name, p, m, v, tick)  # checked when built
    jobs = s.jobs
    kinds = (F, B, W) if s.split else (F, B)
    for kind in kinds:
        for stage in range(p):
            done = jobs[kind, stage][jobs[kind, stage] >= 0]
            assert sorted(done.tolist()) == list(range(v * m)), (kind, stage)
    if not s.split:
        assert (jobs[W] < 0).all()


def test_stash_is_bounded_by_the_pipeline_not_the_micro_batches():
    # single ticks: a job's activation reaches the next stage one action later and its
    # cotangent comes back one B per stage, so stage s holds P - s jobs, the textbook's; fused
    # ticks hold each hop for a whole tick: 2 (P - s) - 1
    for p in (2, 4):
        assert [Schedule("1f1b", p, m).stash_slots for m in (1, p, 8 * p)] == [1, p, p]
        fused = [Schedule("1f1b", p, m, tick="fused").stash_slots for m in (1, p, 4 * p, 8 * p)]
        assert fused == [1, p, 2 * p - 1, 2 * p - 1]
        assert Schedule("zb_h1", p, 8 * p).stash_slots == p
        assert Schedule("zb_v", p, 8 * p, 2).stash_slots == 2 * p  # of half the layers each
        assert Schedule("zb_h1", p, 8 * p).routes.slots["wstash"] == p
        assert Schedule("1f1b", p, 8 * p).routes.slots["wstash"] == 1  # W right after its B


@pytest.mark.parametrize("p,m", [(2, 2), (2, 8), (4, 4), (4, 8), (4, 16)])
def test_ticks_are_the_formulas(p, m):
    """Single ticks: 3 M actions per stage, and the ramps: 1F1B's F's and B's cross P - 1 hops
    each way, ZB-H1 fills its ramp-down with W's, ZB-V loses only stage P - 1's wait for its
    first input."""
    assert Schedule("1f1b", p, m).ticks == 3 * m + 2 * (p - 1)
    assert Schedule("zb_h1", p, m).ticks == 3 * m + p - 1
    assert Schedule("zb_v", p, m, 2).ticks == 6 * m + p - 1
    assert Schedule("1f1b", p, m, tick="fused").ticks == m + 2 * (p - 1)


def test_lockstep_bubble_equals_the_textbook_with_equal_costs():
    for name, v, tick in (("gpipe", 1, "auto"), ("1f1b", 1, "fused"), ("circular", 2, "auto"),
                          ("interleaved_1f1b", 2, "auto")):  # fmt: skip
        for m in (4, 8, 16):
            s = Schedule(name, 4, m, v, tick)
            assert s.lockstep_bubble(1, 2, 0) == pytest.approx(s.bubble, abs=1e-12), (name, m)
    for m in (4, 8, 16, 32):
        fused_1f1b = Schedule("1f1b", 4, m, tick="fused").lockstep_bubble(1, 1, 1)
        for s in (Schedule("zb_h1", 4, m), Schedule("zb_v", 4, m, 2)):
            # single ticks in lockstep cost what asynchronous stages cost: the textbook bubble
            assert s.lockstep_bubble(1, 1, 1) == pytest.approx(s.bubble, abs=1e-12), (s, m)
            assert s.lockstep_bubble(1, 1, 1) <= 0.5 * fused_1f1b
        assert Schedule("zb_h1", 4, m).lockstep_bubble(1, 1, 1) < Schedule(
            "1f1b", 4, m
        ).lockstep_bubble(1, 1, 1)
    assert Schedule("zb_h1", 4, 8).bubble == pytest.approx(3 / 27)
    assert Schedule("zb_v", 4, 8, 2).bubble == pytest.approx(3 / 51)


def test_lockstep_cost_charges_each_job_its_chunks_layers_and_the_ends_where_they_run():
    """Hand-computed tables. GPipe P = 2, M = 2 (F at ticks 0-2, jax.grad's B at 3-5), layers
    [3, 1], F = 1, B = 2 per layer: ticks 3, 3, 1 | 2, 6, 6 = 21 (balanced: 3 x 2 + 3 x 4 = 18);
    stage 1 at half speed: 3, 3, 2 | 4, 6, 6 = 24; the embedding and head run outside its ticks.
    Fused 1F1B P = 2, M = 2 (stage 0: F at 0, 1, B at 2, 3; stage 1: F + B at 1, 2), embedding 2
    (half in chunk 0's F, half in its B) and head 4 (in the last chunk's F): [3, 1] costs
    4 + 7 + 7 + 7 = 25 against balanced 3 + 10 + 10 + 5 = 28."""
    gpipe = Schedule("gpipe", 2, 2)
    assert gpipe.lockstep_cost(1, 2, 0, [3, 1]) == 21 and gpipe.lockstep_cost(1, 2, 0, [2, 2]) == 18
    assert gpipe.lockstep_cost(1, 2, 0, [3, 1], speeds=[1, 0.5]) == 24
    assert gpipe.lockstep_cost(1, 2, 0, [3, 1], ends=(10, 10)) == 21
    assert gpipe.lockstep_bubble(1, 2, 0, [3, 1]) == pytest.approx(1 - 12 / 21)  # (8 + 16) / 2
    fused = Schedule("1f1b", 2, 2, tick="fused")
    assert fused.lockstep_cost(1, 2, 0, [3, 1], ends=(2, 4)) == 25
    assert fused.lockstep_cost(1, 2, 0, [2, 2], ends=(2, 4)) == 28
    # equal layers are today's numbers exactly, per chunk or per layer
    for s in (Schedule("zb_h1", 4, 8), Schedule("zb_v", 4, 8, 2), fused,
              Schedule("interleaved_1f1b", 2, 4, 2)):  # fmt: skip
        chunks = len(s.places)
        assert s.lockstep_cost(1, 1.5, 0.5, [1] * chunks) == s.lockstep_cost(1, 1.5, 0.5)
        assert s.lockstep_cost(1, 1.5, 0.5, [3] * chunks) == s.lockstep_cost(3, 4.5, 1.5)


def test_tick_granularity_follows_the_action_costs():
    """`auto`: single ticks where F, B and W cost about the same, fused F + B ticks where B
    costs far more (long sequences: attention's backward is in B, none of it in W)."""
    assert Schedule("zb_h1", 4, 8).granularity == "single"
    assert Schedule("zb_h1", 4, 8, costs=(1, 3, 1)).granularity == "fused"
    assert Schedule("1f1b", 4, 8, costs=(1, 4, 0.5)).granularity == "fused"
    assert Schedule("zb_h1", 4, 8, tick="fused").granularity == "fused"
    assert Schedule("interleaved_1f1b", 4, 8, 2).granularity == "fused"
    assert Schedule("gpipe", 4, 8).granularity == "forward"
    assert Schedule("zb_h1", 4, 8).split and Schedule("1f1b", 4, 8).split
    assert not Schedule("1f1b", 4, 8, tick="fused").split


def test_v_shape_sends_both_ways_and_turns_on_the_last_stage():
    routes = Schedule("zb_v", 4, 4, 2).routes
    assert set(routes.channels) == {"up", "down", "self"}
    assert set(routes.channels["self"]) == {F, B}  # the turn: chunk P - 1 to P and back
    assert (routes.send_self[:, :3] < 0).all()  # only stage P - 1 turns
    assert (routes.head_ct[:, 1:] < 0).all() and (routes.head_ct[:, 0] >= 0).any()  # loss: stage 0


def test_checker_rejects_a_b_before_its_f():
    jobs = Schedule("1f1b", 2, 2, tick="fused").jobs.copy()
    f_tick = int(np.nonzero(jobs[F, 1] == 1)[0][0])
    jobs[B, 1][jobs[B, 1] == 1] = -1
    assert jobs[B, 1, 0] == -1
    jobs[B, 1, 0] = 1
    message = f"stage 1 tick 0: B of micro-batch 1 chunk 0 runs before its F \\(tick {f_tick}\\)"
    with pytest.raises(ScheduleError, match=message):
        check_table(jobs, 2, 2, 1, split=False, hand=True)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("1f1b", 2, 2, 2), "pipeline.repeats=2 needs pipeline.schedule=circular or"),
        (("interleaved_1f1b", 2, 2, 1), "pipeline.repeats=1: interleaved_1f1b needs at least 2"),
        (("interleaved_1f1b", 4, 2, 2), "pipeline.microbatches=2 is not a multiple of pipeline=4"),
        (("circular", 4, 2, 2), "pipeline.microbatches=2 < pipeline=4"),
        (("zb_h1", 1, 2, 1), "pipeline.schedule=zb_h1 with pipeline=1"),
        (("zb_v", 2, 2, 1), "pipeline.repeats=1: zb_v runs exactly 2 chunks per stage"),
        (("interleaved_1f1b", 2, 2, 2, "single"), "pipeline.tick=single: interleaved_1f1b runs "
         "fused ticks only"),
        (("1f1b", 2, 2, 1, "double"), "pipeline.tick='double' is not a tick granularity"),
        (("2f2b", 2, 2, 1), "pipeline.schedule='2f2b' is not a schedule"),
    ],
)  # fmt: skip
def test_a_schedule_states_the_configs_rules_as_a_jaxpar_error(args, message):
    """`Schedule` reads the one table of schedule rules (`jaxpar.schedule_rules`), the config's
    validation's too, and its error is a JaxparError (the CLI's one line, exit code 2)."""
    with pytest.raises(ScheduleError, match=message) as e:
        Schedule(*args)
    assert isinstance(e.value, JaxparError)


def test_checker_rejects_a_missing_w():
    jobs = Schedule("zb_h1", 2, 2).jobs.copy()
    tick = int(np.nonzero(jobs[W, 0] == 1)[0][0])
    jobs[W, 0, tick] = -1
    with pytest.raises(ScheduleError, match="stage 0: micro-batch 1 chunk 0 has no W"):
        check_table(jobs, 2, 2, 1, split=True, hand=True)


def test_checker_rejects_a_micro_batch_run_twice():
    jobs = Schedule("1f1b", 2, 4, tick="fused").jobs.copy()
    jobs[F, 0, 3] = 0  # job 0 again, where job 3 ran
    with pytest.raises(ScheduleError, match="stage 0 tick 3: F of micro-batch 0 chunk 0 runs "
                       "twice \\(first at tick 0\\)"):  # fmt: skip
        check_table(jobs, 2, 4, 1, split=False, hand=True)


def test_checker_rejects_a_v_chunk_before_its_input_comes_back():
    s = Schedule("zb_v", 2, 2, 2)
    jobs = s.jobs.copy()
    # stage 0 swaps micro-batch 1's first F (the model's chunk 0) with micro-batch 0's second
    # (chunk 3, on the way back up), which then runs before stage 1 has sent it its input
    early, late = (int(np.nonzero(jobs[F, 0] == job)[0][0]) for job in (1, 2))
    jobs[F, 0, early], jobs[F, 0, late] = 2, 1
    up = int(np.nonzero(jobs[F, 1] == 2)[0][0])
    with pytest.raises(
        ScheduleError,
        match=f"stage 0 tick {early}: F of micro-batch 0 chunk 1 "
        f"runs before its input arrives \\(stage 1 computes it at tick {up}\\)",
    ):
        check_table(jobs, 2, 2, 2, split=True, hand=True, places=s.places)


def test_checker_rejects_an_input_used_before_it_arrives():
    jobs = Schedule("1f1b", 2, 2, tick="fused").jobs.copy()
    jobs[F, 1] = np.roll(jobs[F, 1], -1)  # stage 1 one tick early
    with pytest.raises(ScheduleError, match="stage 1 tick 0: F of micro-batch 0 chunk 0 runs "
                       "before its input arrives \\(stage 0 computes it at tick 0\\)"):  # fmt: skip
        check_table(jobs, 2, 2, 1, split=False, hand=True)


# --- every schedule computes the sequential model's loss and gradients ------------------------

CASES = [
    # alone: P in {2, 4}, M in {1, P, 2P} across the schedules (M = 1 with remat below); uneven
    # stages (pipeline.stage_layers: one layer beside many) for every schedule
    ("pipeline=4", 8, (*one_f(8), "pipeline.stage_layers=[1,1,1,5]")),
    ("pipeline=2", 8, (*zb(2), "pipeline.tick=fused", "pipeline.stage_layers=[7,1]")),
    ("pipeline=4", 8, (*zb_v(8), "model.remat=dots")),
    ("pipeline=2", 8, (*interleaved(4), "pipeline.stage_layers=[2,6]")),
    # with tensor and data parallelism; uneven layer counts (7 over 2 x 2 chunks, 6 over 4)
    ("data=2,pipeline=2,tensor=2", 8, one_f(4)),
    ("pipeline=4,tensor=2", 6, (*zb(4), "pipeline.stage_layers=[1,3,1,1]")),
    ("data=2,pipeline=2,tensor=2", 7, (*zb_v(4), "pipeline.stage_layers=[5,2]")),
    # recomputation per layer, and ZeRO-3 stages
    ("pipeline=2,tensor=2", 8, (*one_f(1), "model.remat=full")),
    ("pipeline=2,data=2", 8, (*interleaved(2), "model.remat=full")),
    ("data=2,pipeline=4", 8, (*zb(4), "parallel.fsdp=true")),
    ("data=2,pipeline=2", 8, (*zb_v(2), "parallel.fsdp=true", "model.remat=full")),
]  # fmt: skip


@pytest.mark.parametrize("mesh_spec,layers,extra", CASES)
def test_schedule_equals_sequential_model(mesh_spec, layers, extra):
    assert_matches_sequential(mesh_spec, layers, extra)
