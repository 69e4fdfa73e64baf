"""The `jaxpar` CLI in-process: bad input gives exit 2 and one stderr line; a tiny run end to end.

JAX already runs with 8 simulated CPU devices here (conftest), so every mesh must use 8 devices;
a mesh that needs another count is reported as such.
"""

from __future__ import annotations

import json
import math

import pytest

from jaxpar.cli import main
from jaxpar.config import load_config

TINY = [
    "model.layers=1",
    "model.dim=32",
    "model.heads=4",
    "model.kv_heads=4",
    "model.mlp_dim=64",
]
MESH = ["--mesh", "data=2,tensor=4"]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("def main():\n    return 'hello world, some text to learn from'\n" * 40)
    return path


def _expect_error(capsys, argv, *fragments: str) -> str:
    """Runs the CLI, expects exit 2 and exactly one `jaxpar: error:` line naming `fragments`."""
    rc = main(argv)
    _, err = capsys.readouterr()
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert err == lines[0] + "\n"
    line = lines[0]
    assert line.startswith("jaxpar: error: "), line
    for fragment in fragments:
        assert fragment in line, line
    return line


# --- mesh errors ---------------------------------------------------------------------------------


def test_mesh_product_differs_from_device_count(capsys):
    # In a process where JAX already started, the mismatch is reported as the device count
    # that cannot be simulated (both numbers are named).
    _expect_error(
        capsys, ["mesh", "data=2,tensor=2"], "needs 4 devices but JAX already started with 8"
    )


def test_mesh_minus_one_cannot_fill(capsys):
    _expect_error(
        capsys,
        ["mesh", "data=-1,tensor=3"],
        "mesh data=-1,pipeline=1,tensor=3 cannot fill its -1 axis",
        "8 devices",
        "product 3",
    )


@pytest.mark.parametrize(
    ("spec", "fragments"),
    [
        ("data=2,expert=4", ["unknown axis 'expert'", "'data=2,expert=4'"]),
        ("tensor=4,tensor=2", ["axis 'tensor' is given twice"]),
        ("tensor=two", ["size 'two' of axis 'tensor' is not an integer"]),
        ("tensor=1.5", ["size '1.5' of axis 'tensor' is not an integer"]),
        ("tensor=0", ["size 0 of axis 'tensor' must be a positive integer or -1"]),
        ("data=-1,tensor=-1", ["'data=-1,tensor=-1'", "at most one axis may be -1"]),
    ],
)
def test_mesh_bad_spec(capsys, spec, fragments):
    _expect_error(capsys, ["mesh", spec], *fragments)


def test_mesh_bad_devices(capsys):
    _expect_error(
        capsys,
        ["mesh", "tensor=8", "--devices", "0"],
        "--devices must be a positive integer, got 0",
    )
    _expect_error(capsys, ["mesh", "tensor=8", "--devices", "x"], "invalid int value: 'x'")


def test_train_bad_mesh_spec(capsys, tmp_path):
    out = tmp_path / "run"
    _expect_error(
        capsys, ["train", "--out", str(out), "--mesh", "tensor=two"], "size 'two' of axis 'tensor'"
    )
    assert not out.exists()


# --- train: bad config ---------------------------------------------------------------------------

# "{tmp}" is replaced with the test's tmp_path
BAD_TRAIN = {
    "heads": (
        [*MESH, "model.dim=96", "model.heads=6", "model.kv_heads=6"],
        ["model.heads=6 is not divisible by tensor=4"],
    ),
    "kv_heads": (
        [*MESH, "model.heads=8", "model.kv_heads=2"],
        ["model.kv_heads=2 is not divisible by tensor=4"],
    ),
    "mlp_dim": ([*MESH, "model.mlp_dim=30"], ["model.mlp_dim=30 is not divisible by tensor=4"]),
    "vocab": ([*MESH, "model.vocab=250"], ["model.vocab=250 is not divisible by tensor=4"]),
    "batch": ([*MESH, "train.batch_size=3"], ["train.batch_size=3 is not divisible by data=2"]),
    "dim_heads": (["model.heads=6"], ["model.dim=256 must be divisible by model.heads=6"]),
    "unknown_key": (["train.step=5"], ["unknown config key 'train.step'"]),
    "unknown_section": (["optim.lr=1"], ["unknown config key 'optim.lr'"]),
    "bad_int": (["train.steps=abc"], ["'train.steps' must be an integer, got 'abc'"]),
    "bad_float": (["train.lr=fast"], ["'train.lr' must be a number, got 'fast'"]),
    "bad_bool": (["parallel.fsdp=maybe"], ["'parallel.fsdp' must be true or false, got 'maybe'"]),
    "no_equals": (["train.steps"], ["override 'train.steps' must look like SECTION.NAME=VALUE"]),
    "missing_file": (
        ["--config", "{tmp}/nope.yaml"],
        ["config file '{tmp}/nope.yaml' does not exist"],
    ),
    "steps_zero": (["train.steps=0"], ["'train.steps' must be positive, got 0"]),
    "lr_zero": (["train.lr=0"], ["'train.lr' must be positive, got 0.0"]),
    "lr_negative": (["train.lr=-1"], ["'train.lr' must be positive, got -1.0"]),
    "data_no_match": (
        [*MESH, *TINY, "data.path={tmp}/none/*.txt"],
        ["data.path='{tmp}/none/*.txt' matches no files"],
    ),
    "data_too_short": (
        [*MESH, *TINY, "data.path={tmp}/short.txt", "train.seq_len=64"],
        ["data.path holds 10 bytes, too few for train.seq_len=64"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_TRAIN))
def test_train_bad_input(capsys, tmp_path, case):
    (tmp_path / "short.txt").write_text("0123456789")
    argv, fragments = BAD_TRAIN[case]
    out = tmp_path / "run"
    argv = ["train", "--out", str(out), *(a.replace("{tmp}", str(tmp_path)) for a in argv)]
    _expect_error(capsys, argv, *(f.replace("{tmp}", str(tmp_path)) for f in fragments))
    assert not out.exists(), sorted(p.name for p in out.iterdir())


def test_train_malformed_config_file(capsys, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  steps: [3\n  lr: 1\n")
    out = tmp_path / "run"
    _expect_error(
        capsys,
        ["train", "--out", str(out), "--config", str(config)],
        f"'{config}' is not valid YAML",
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "text,fragments",
    [
        ("- train\n", ("must hold a mapping", "got list")),
        ("train:\n  steps: true\n", ("'train.steps' must be an integer, got True",)),
    ],
)
def test_train_config_file_with_bad_content(capsys, tmp_path, text, fragments):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    out = tmp_path / "run"
    _expect_error(capsys, ["train", "--out", str(out), "--config", str(config)], *fragments)
    assert not out.exists()


def test_shardings_bad_input(capsys):
    _expect_error(
        capsys,
        ["shardings", *MESH, "model.vocab=250"],
        "model.vocab=250 is not divisible by tensor=4",
    )
    _expect_error(
        capsys,
        ["shardings", "--mesh", "tensor=8", "model.kv_heads=4"],
        "model.kv_heads=4 is not divisible by tensor=8",
    )


# --- argparse errors -----------------------------------------------------------------------------


def test_unknown_subcommand(capsys):
    _expect_error(capsys, ["bogus"], "invalid choice: 'bogus'", "(see 'jaxpar --help')")


def test_unknown_flag(capsys, tmp_path):
    out = tmp_path / "run"
    _expect_error(
        capsys, ["train", "--out", str(out), "--bogus"], "unrecognized arguments: --bogus"
    )
    assert not out.exists()


def test_missing_subcommand_and_missing_spec(capsys):
    _expect_error(capsys, [], "the following arguments are required: command")
    _expect_error(capsys, ["mesh"], "the following arguments are required: SPEC")


# --- nothing overwritten -------------------------------------------------------------------------


def test_existing_run_is_not_overwritten(capsys, tmp_path, text_file):
    out = tmp_path / "run"
    out.mkdir()
    metrics = out / "metrics.jsonl"
    metrics.write_text('{"step": 0, "loss": 1.0}\n')
    argv = ["train", "--out", str(out), *MESH, *TINY, "train.steps=1", f"data.path={text_file}"]
    _expect_error(capsys, argv, f"--out '{out}' already holds a run")
    assert metrics.read_text() == '{"step": 0, "loss": 1.0}\n'
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]


def test_out_that_is_a_file_is_rejected(capsys, tmp_path):
    out = tmp_path / "run"
    out.write_text("not a folder")
    _expect_error(capsys, ["train", "--out", str(out)], f"--out '{out}' is a file")
    assert out.read_text() == "not a folder"


# --- successful commands -------------------------------------------------------------------------


def test_train_end_to_end(capsys, tmp_path, text_file):
    out = tmp_path / "run"
    argv = [
        "train",
        "--out",
        str(out),
        *MESH,
        "train.steps=3",
        *TINY,
        "train.batch_size=4",
        "train.seq_len=16",
        "train.sample_tokens=8",
        "train.warmup_steps=1",
        f"data.path={text_file}",
    ]
    rc = main(argv)
    stdout, stderr = capsys.readouterr()
    assert rc == 0, stderr
    assert "Traceback" not in stderr

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    keys = {"step", "loss", "lr", "grad_norm", "step_time_s", "tokens_per_s", "skipped",
            "bad_in_row"}  # fmt: skip
    for i, row in enumerate(rows):
        assert set(row) == keys
        assert row["step"] == i
        for k in keys:
            assert isinstance(row[k], int | float) and math.isfinite(row[k]), (k, row)
        assert row["loss"] > 0 and row["grad_norm"] > 0
        assert row["step_time_s"] > 0 and row["tokens_per_s"] > 0
    # warmup of 1 step: lr 0 at step 0, the peak at step 1
    assert rows[0]["lr"] == 0.0
    assert rows[1]["lr"] == pytest.approx(3e-3)
    # a byte-level model starts near ln(256)
    assert abs(rows[0]["loss"] - math.log(256)) < 1.0

    config = load_config(out / "config.yaml")
    assert config.parallel.mesh == "data=2,pipeline=1,tensor=4"
    assert config.train.dtype == "float32"
    assert config.train.steps == 3
    assert config.model.dim == 32 and config.model.layers == 1
    assert config.data.path == str(text_file)
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoints", "config.yaml", "goodput.json", "metrics.jsonl", "stacks", "tensorboard",
    ]  # fmt: skip
    assert "goodput " in stdout

    assert f"run folder: {out}" in stdout
    assert f"metrics: {out / 'metrics.jsonl'}" in stdout
    assert "done: steps 0-2" in stdout
    assert "\nsample:\ndef " in stdout  # the sample starts with the prompt


def test_shardings(capsys):
    rc = main(["shardings", *MESH, *TINY])
    stdout, stderr = capsys.readouterr()
    assert rc == 0, stderr
    names = [
        "embed_VD",
        "head_DV",
        "final_norm.scale",
        "blocks.attn.wq_DNH",
        "blocks.attn.wk_DKH",
        "blocks.attn.wv_DKH",
        "blocks.attn.wo_NHD",
        "blocks.attn_norm.scale",
        "blocks.mlp.w_gate_DF",
        "blocks.mlp.w_up_DF",
        "blocks.mlp.w_down_FD",
        "blocks.mlp_norm.scale",
    ]
    for name in names:
        assert name in stdout, name
    assert "parameters on mesh data=2,pipeline=1,tensor=4" in stdout
    num_params = load_config(None, TINY).model.num_params
    totals = [line for line in stdout.splitlines() if line.startswith("parameters: ")]
    assert len(totals) == 1
    assert totals[0].startswith(
        f"parameters: {num_params:,} ({num_params * 4:,} bytes); per device "
    )
    assert "optimizer state per device" in totals[0]


def test_mesh_command_prints_groups(capsys):
    rc = main(["mesh", "data=2,pipeline=2,tensor=2"])
    stdout, stderr = capsys.readouterr()
    assert rc == 0, stderr
    assert stderr == ""
    lines = stdout.splitlines()
    assert lines[0] == "mesh data=2,pipeline=2,tensor=2  (8 cpu devices)"
    i = next(k for k, line in enumerate(lines) if line.startswith("tensor groups"))
    assert lines[i + 1 : i + 5] == ["  [0, 1]", "  [2, 3]", "  [4, 5]", "  [6, 7]"]
    assert "  stage 1: [2, 3, 6, 7]" in lines
    assert "  replica 0: [0, 1, 2, 3]" in lines
