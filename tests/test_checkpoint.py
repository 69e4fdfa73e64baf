"""Checkpoints: exact resume, restore onto other meshes, the non-finite guard, damaged files.

Kills and signals in real subprocesses are in test_faults.py.
"""

import functools
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from rich.console import Console

from jaxpar.checkpoint import Checkpointer, CorruptCheckpoint, list_checkpoints
from jaxpar.cli import main
from jaxpar.config import load_config
from jaxpar.errors import JaxparError
from jaxpar.mesh import make_mesh, parse_mesh
from jaxpar.placement import Placement
from jaxpar.train.loop import TrainingAborted, train
from jaxpar.train.step import Trainer

SIZES = [
    "model.layers=4", "model.dim=32", "model.heads=8", "model.kv_heads=8", "model.mlp_dim=64",
    "train.batch_size=16", "train.seq_len=16", "train.steps=20", "train.warmup_steps=3",
    "train.sample_tokens=0", "checkpoint.every=5", "train.dtype=float32",
]  # fmt: skip
QUIET = Console(quiet=True)


def config(*extra: str):
    return load_config(None, [*SIZES, *extra])


def mesh(spec: str):
    s = parse_mesh(spec)
    return make_mesh(s, jax.devices()[: s.size])


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@functools.cache
def straight(tmp_root: str) -> tuple[list[float], Path]:
    out = Path(tmp_root) / "straight"
    train(config(), mesh("data=2,pipeline=2,tensor=2"), out, QUIET)
    return losses(out), out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return straight(str(tmp_path_factory.mktemp("ref")))


def final_params(out: Path, mesh_spec: str, *extra: str) -> dict:
    trainer = Trainer(Placement(config(*extra), mesh(mesh_spec)))
    checkpointer = Checkpointer(trainer.placement, out / "checkpoints", trainer.abstract_state())
    state, _ = checkpointer.restore(checkpointer.steps()[-1])
    logical = checkpointer.to_logical(state)
    checkpointer.close()
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(x)
        for path, x in jax.tree_util.tree_leaves_with_path(logical.params)
    }


def test_stop_and_resume_is_bit_identical(reference, tmp_path):
    ref_losses, ref_out = reference
    out = tmp_path / "run"
    summary = train(config(), mesh("data=2,pipeline=2,tensor=2"), out, QUIET, stop_after=10)
    assert summary.stopped_by == "stop_after" and steps(out) == list(range(10))
    assert [r.step for r in list_checkpoints(out)] == [5, 10]
    summary = train(config(), mesh("data=2,pipeline=2,tensor=2"), out, QUIET)
    assert summary.start_step == 10 and summary.steps == 10
    assert steps(out) == list(range(20))  # one row per step: none duplicated
    assert losses(out) == ref_losses  # bitwise
    a = final_params(out, "data=2,pipeline=2,tensor=2")
    b = final_params(ref_out, "data=2,pipeline=2,tensor=2")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_resume_replaces_rows_past_the_checkpoint(reference, tmp_path):
    # A run killed after step 7 has metrics up to 7 but its newest checkpoint is 5.
    out = tmp_path / "run"
    train(config(), mesh("data=2,pipeline=2,tensor=2"), out, QUIET, stop_after=8)
    shutil.rmtree(out / "checkpoints" / "8")
    assert steps(out) == list(range(8))
    train(config(), mesh("data=2,pipeline=2,tensor=2"), out, QUIET)
    assert steps(out) == list(range(20))
    assert losses(out) == reference[0]


@pytest.mark.parametrize(
    "mesh_spec,extra",
    [
        ("pipeline=4,tensor=2", ("pipeline.microbatches=4",)),
        ("data=1", ()),
        ("data=4,tensor=2", ("parallel.fsdp=true",)),
        ("data=2,pipeline=2,tensor=2", ("pipeline.schedule=circular", "pipeline.repeats=2",
                                        "pipeline.microbatches=2")),
    ],
)  # fmt: skip
def test_restore_onto_another_mesh_continues_the_run(reference, tmp_path, mesh_spec, extra):
    ref_losses, ref_out = reference
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(ref_out / "checkpoints" / "10", out / "checkpoints" / "10")
    summary = train(config(*extra), mesh(mesh_spec), out, QUIET)
    assert summary.start_step == 10
    continued = losses(out)
    np.testing.assert_allclose(continued, ref_losses[10:], rtol=1e-5)
    # The largest relative difference, for the record (see the closing note).
    diff = max(abs(a - b) / abs(b) for a, b in zip(continued, ref_losses[10:], strict=True))
    print(f"{mesh_spec} {extra}: largest relative loss difference {diff:.2e}")


NAN = "train.fault_nan_steps=[4, 5, 6]"  # fault injection: the loss is NaN at these steps


def test_non_finite_steps_are_skipped(tmp_path):
    # Skipped steps leave parameters and optimizer state as they were: after steps 0-5 with 4
    # and 5 skipped, they equal a clean run's after steps 0-3, bit for bit.
    clean = tmp_path / "clean"
    train(config(), mesh("data=2,tensor=4"), clean, QUIET, stop_after=4)
    out = tmp_path / "run"
    train(config(NAN), mesh("data=2,tensor=4"), out, QUIET, stop_after=6)  # steps 0-5
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [False] * 4 + [True, True]
    assert [r["bad_in_row"] for r in rows] == [0, 0, 0, 0, 1, 2]
    assert losses(out)[:4] == losses(clean)
    a, b = final_params(out, "data=2,tensor=4"), final_params(clean, "data=2,tensor=4")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_too_many_bad_steps_abort_and_keep_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(TrainingAborted, match=r"3 steps in a row \(up to step 6\)"):
        train(config(NAN), mesh("data=2,tensor=4"), out, QUIET)
    assert [r.step for r in list_checkpoints(out)] == [5]  # saved after step 4, none after 6
    rc = main(["train", "--out", str(tmp_path / "cli"), "--mesh", "data=2,tensor=4", *SIZES, NAN])
    err = capsys.readouterr().err
    assert (
        rc == 1
        and err.startswith("jaxpar: training aborted: 3 steps in a row")
        and (err.count("\n") == 1)
    )


def test_damaged_checkpoint_falls_back_to_the_previous_one(reference, tmp_path):
    ref_losses, ref_out = reference
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    shutil.rmtree(out / "checkpoints" / "20")
    # Truncate every data file of checkpoint 15: it can no longer be read back.
    files = [f for f in (out / "checkpoints" / "15" / "state").rglob("*") if f.is_file()]
    biggest = max(files, key=lambda f: f.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    messages = []
    console = Console(quiet=True)
    console.print = lambda msg, **_: messages.append(str(msg))  # type: ignore[method-assign]
    summary = train(config(), mesh("data=2,pipeline=2,tensor=2"), out, console)
    assert any("checkpoint 15" in m and "falling back" in m for m in messages), messages
    assert summary.start_step == 10
    assert losses(out) == ref_losses


def test_flipped_bits_are_caught_by_the_checksums(reference, tmp_path):
    _, ref_out = reference
    out = tmp_path / "run"
    shutil.copytree(ref_out / "checkpoints" / "10", out / "checkpoints" / "10")
    meta = out / "checkpoints" / "10" / "meta" / "metadata"
    doc = json.loads(meta.read_text())
    doc["checksums"][0] ^= 1  # as if one array's bits had changed on disk
    meta.write_text(json.dumps(doc))
    trainer = Trainer(Placement(config(), mesh("data=2,tensor=4")))
    checkpointer = Checkpointer(trainer.placement, out / "checkpoints", trainer.abstract_state())
    with pytest.raises(JaxparError, match="no intact checkpoint"):
        checkpointer.restore_latest(warn=lambda m: None)
    checkpointer.close()


def test_serving_reads_the_parameters_alone_and_checks_them(reference, tmp_path):
    _, ref_out = reference
    out = tmp_path / "checkpoints"
    shutil.copytree(ref_out / "checkpoints" / "20", out / "20")
    trainer = Trainer(Placement(config(), mesh("data=2,tensor=4")))
    with Checkpointer(trainer.placement, out, trainer.abstract_state()) as checkpointer:
        full, meta = checkpointer.restore(20)
        whole = checkpointer.to_logical(full).params
    serving = Placement(config(), mesh("tensor=8"), serving=True)
    target = {"params": serving.abstract(serving.abstract_params, serving.param_shardings)}

    def serve():
        with Checkpointer(serving, out, target) as checkpointer:
            part, _ = checkpointer.restore(20)
            return part, checkpointer.to_logical(part)["params"]

    part, logical = serve()
    assert set(part) == {"params"}  # no optimizer moments are read
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(logical), jax.tree.leaves(whole), strict=True
    ):
        np.testing.assert_array_equal(a, b, err_msg=str(path))

    # A checkpoint written before the paths were recorded lists its checksums in the train
    # state's leaf order (step, parameters, optimizer state): serving still checks its part.
    file = out / "20" / "meta" / "metadata"
    doc = json.loads(file.read_text())
    file.write_text(json.dumps({k: v for k, v in doc.items() if k != "paths"}))
    serve()
    doc["checksums"][1] ^= 1
    file.write_text(json.dumps({k: v for k, v in doc.items() if k != "paths"}))
    with pytest.raises(CorruptCheckpoint, match="does not match its checksums"):
        serve()
    doc["checksums"][1] ^= 1
    file.write_text(json.dumps(doc))

    # Each part is checked against its own checksums: a damaged optimizer moment does not stop
    # serving, a damaged parameter does.
    paths = meta["paths"]
    for prefix, serving_fails in (("opt_state/", False), ("params/", True)):
        doc = json.loads(file.read_text())
        doc["checksums"][next(i for i, p in enumerate(paths) if p.startswith(prefix))] ^= 1
        file.write_text(json.dumps(doc))
        if serving_fails:
            with pytest.raises(CorruptCheckpoint, match="does not match its checksums"):
                serve()
        else:
            serve()
            checkpointer = Checkpointer(trainer.placement, out, trainer.abstract_state())
            with checkpointer, pytest.raises(CorruptCheckpoint, match="match its checksums"):
                checkpointer.restore(20)


def test_another_model_is_refused(reference, tmp_path):
    _, ref_out = reference
    out = tmp_path / "run"
    shutil.copytree(ref_out / "checkpoints" / "10", out / "checkpoints" / "10")
    with pytest.raises(JaxparError, match=r"holds another model \(model.dim=32 there, 64 here\)"):
        train(config("model.dim=64"), mesh("data=2,tensor=4"), out, QUIET)


def test_checkpoints_command_lists_steps_mesh_size_and_state(reference, capsys, tmp_path):
    _, ref_out = reference
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    (out / "checkpoints" / "25.orbax-checkpoint-tmp-123").mkdir()  # an unfinished save
    assert main(["checkpoints", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["step", "mesh", "size", "state"]
    rows = [line.split() for line in lines[1:]]
    assert [r[0] for r in rows] == ["10", "15", "20", "25"]
    assert all(r[1] == "data=2,pipeline=2,tensor=2" and r[3] == "complete" for r in rows[:3])
    assert rows[3][3] == "INCOMPLETE"
    assert main(["checkpoints", str(tmp_path / "nothing")]) == 2
