"""Many processes: `jaxpar launch` runs one job as two processes of `jax.distributed` (4 CPU
devices each, gloo collectives); it must train as one process with 8 devices does, write one set
of files and share checkpoints with one process. (A job whose process dies ends as a whole:
test_serve kills a process of a two-process server.)"""

import json
import re
import shutil
import subprocess
import sys

import pytest

from jaxpar.cli import main

SIZES = [
    "model.layers=3", "model.dim=32", "model.heads=4", "model.kv_heads=2", "model.mlp_dim=64",
    "train.batch_size=8", "train.seq_len=32", "train.warmup_steps=1", "pipeline.microbatches=2",
]  # fmt: skip
MESH = ["--mesh", "data=2,pipeline=2,tensor=2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    return path


def _launch(argv: list[str], **kwargs) -> subprocess.Popen:
    command = [sys.executable, "-m", "jaxpar", "launch", "-n", "2", "--devices-per-process", "4"]
    return subprocess.Popen(
        [*command, "--", *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        **kwargs,
    )  # fmt: skip


def _losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_as_one_and_share_checkpoints(tmp_path, corpus, capsys):
    train = ["train", *MESH, *SIZES, "train.steps=4", "checkpoint.every=2",
             "train.sample_tokens=8", f"data.path={corpus}"]  # fmt: skip
    two = tmp_path / "two"
    proc = _launch([*train, "--out", str(two)])
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    # One progress log and one set of files, from process 0; both processes ran.
    assert re.search(r"^\[0\] done: steps 0-3", output, re.M), output
    assert not re.search(r"^\[1\] (step|done)", output, re.M), output
    assert "[launch] process 1 of 2" in output
    assert sorted(p.name for p in two.iterdir()) == [
        "checkpoints", "config.yaml", "goodput.json", "metrics.jsonl", "stacks", "tensorboard",
    ]  # fmt: skip
    assert len(list((two / "tensorboard").iterdir())) == 1  # process 0's
    assert sorted(p.name for p in (two / "stacks").iterdir()) == ["process-0.txt", "process-1.txt"]

    one = tmp_path / "one"  # (its closing sample is the two processes' to show)
    assert main([*train, "train.sample_tokens=0", "--out", str(one)]) == 0
    two_losses, one_losses = _losses(two), _losses(one)
    assert len(two_losses) == 4
    # gloo sums in another order than XLA's in-process all-reduce: equal to float32 rounding.
    assert two_losses == pytest.approx(one_losses, rel=1e-6, abs=0)

    # The 2-process checkpoint of step 2, resumed by one process (on another mesh), continues
    # exactly as the uninterrupted 2-process run went on.
    shutil.rmtree(two / "checkpoints" / "4")
    capsys.readouterr()
    resume = [*train, "train.sample_tokens=0", "--out", str(two), "--mesh", "data=4,tensor=2"]
    assert main(resume) == 0
    assert "resuming from checkpoint 2 (written on mesh data=2,pipeline=2,tensor=2)" in (
        capsys.readouterr().out
    )
    assert _losses(two) == pytest.approx(two_losses, rel=1e-6, abs=0)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["launch", "-n", "2"], "launch needs a command after --"),
        (["launch", "-n", "0", "--", "train"], "-n 0 must be at least 1"),
        (["train", "--coordinator", "localhost:1234"], "go together"),
        (
            ["train", "--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"],
            "--process-id 2 must be in [0, 2)",
        ),  # fmt: skip
    ],
)
def test_bad_input(capsys, argv, fragment):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxpar: error: ") and fragment in err and len(err.splitlines()) == 1
