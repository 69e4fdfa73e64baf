"""Schedules with their own backward (1f1b, interleaved_1f1b, zb_h1): tables, the table checker,
equality with the sequential model, memory flat in M, and the traffic of the compiled step."""

import numpy as np
import pytest
from pipeline_cases import assert_matches_sequential, interleaved, one_f, zb

from jaxpar.errors import JaxparError
from jaxpar.pipeline.schedule import B, F, Schedule, ScheduleError, W, check_table

# --- tables ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name,p,m,v", [
    ("1f1b", 1, 3, 1), ("1f1b", 2, 1, 1), ("1f1b", 4, 4, 1), ("1f1b", 4, 32, 1),
    ("interleaved_1f1b", 2, 4, 2), ("interleaved_1f1b", 4, 8, 3),
    ("zb_h1", 2, 1, 1), ("zb_h1", 4, 8, 1), ("zb_h1", 4, 32, 1),
    ("gpipe", 4, 8, 1), ("circular", 4, 8, 2),
])  # fmt: skip
def test_every_job_runs_each_action_once_in_order(name, p, m, v):
    s = Schedule(name, p, m, v)  # checked when built
    jobs = s.jobs
    kinds = (F, B, W) if s.split else (F, B)
    for kind in kinds:
        for stage in range(p):
            done = jobs[kind, stage][jobs[kind, stage] >= 0]
            assert sorted(done.tolist()) == list(range(v * m)), (kind, stage)
    if not s.split:
        assert (jobs[W] < 0).all()


def test_1f1b_stash_is_bounded_by_the_pipeline_not_the_micro_batches():
    # lockstep: a job's activation reaches the next stage a tick later and its cotangent comes
    # back a tick per stage, so stage s holds 2 (P - s) - 1 jobs at the peak
    for p in (2, 4):
        assert [Schedule("1f1b", p, m).stash_slots for m in (1, p, 4 * p, 8 * p)] == [
            1, p, 2 * p - 1, 2 * p - 1,
        ]  # fmt: skip
    assert Schedule("1f1b", 4, 32).ticks == 32 + 2 * 3
    assert Schedule("zb_h1", 4, 32).routes.slots["wstash"] <= 4


def test_lockstep_bubble_equals_the_textbook_with_equal_costs():
    for name, v in (("gpipe", 1), ("1f1b", 1), ("circular", 2), ("interleaved_1f1b", 2)):
        for m in (4, 8, 16):
            s = Schedule(name, 4, m, v)
            assert s.lockstep_bubble(1, 2, 0) == pytest.approx(s.bubble, abs=1e-12), (name, m)
    # zb_h1 deferring W's beats 1f1b's lockstep bubble with F = B = W
    for m in (4, 8, 16, 32):
        assert Schedule("zb_h1", 4, m).lockstep_bubble(1, 1, 1) < Schedule(
            "1f1b", 4, m
        ).lockstep_bubble(1, 1, 1)


def test_checker_rejects_a_b_before_its_f():
    jobs = Schedule("1f1b", 2, 2).jobs.copy()
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
    jobs = Schedule("1f1b", 2, 4).jobs.copy()
    jobs[F, 0, 3] = 0  # job 0 again, where job 3 ran
    with pytest.raises(ScheduleError, match="stage 0 tick 3: F of micro-batch 0 chunk 0 runs "
                       "twice \\(first at tick 0\\)"):  # fmt: skip
        check_table(jobs, 2, 4, 1, split=False, hand=True)


def test_checker_rejects_an_input_used_before_it_arrives():
    jobs = Schedule("1f1b", 2, 2).jobs.copy()
    jobs[F, 1] = np.roll(jobs[F, 1], -1)  # stage 1 one tick early
    with pytest.raises(ScheduleError, match="stage 1 tick 0: F of micro-batch 0 chunk 0 runs "
                       "before its input arrives \\(stage 0 computes it at tick 0\\)"):  # fmt: skip
        check_table(jobs, 2, 2, 1, split=False, hand=True)


# --- every schedule computes the sequential model's loss and gradients ------------------------

CASES = [
    # alone: P in {2, 4}, M in {1, P, 2P} across the schedules
    ("pipeline=2", 8, one_f(1)),
    ("pipeline=4", 8, one_f(8)),
    ("pipeline=2", 8, zb(2)),
    ("pipeline=2", 8, interleaved(4)),
    ("pipeline=4", 8, interleaved(4)),
    # with tensor and data parallelism; uneven layer counts (7 over 2 x 2 chunks, 6 over 4)
    ("data=2,pipeline=2,tensor=2", 8, one_f(4)),
    ("data=2,pipeline=2,tensor=2", 7, interleaved(2)),
    ("pipeline=4,tensor=2", 6, zb(4)),
    # recomputation per layer, and ZeRO-3 stages
    ("pipeline=2,tensor=2", 8, (*one_f(2), "model.remat=full")),
    ("pipeline=4", 8, (*zb(4), "model.remat=dots")),  # (zb_h1 alone at P = 4)
    ("pipeline=2,data=2", 8, (*interleaved(2), "model.remat=full")),
    ("data=2,pipeline=4", 8, (*zb(4), "parallel.fsdp=true")),
]  # fmt: skip


@pytest.mark.parametrize("mesh_spec,layers,extra", CASES)
def test_schedule_equals_sequential_model(mesh_spec, layers, extra):
    assert_matches_sequential(mesh_spec, layers, extra)
