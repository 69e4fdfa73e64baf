"""`jaxpar report` on small run folders written here (no training): the summary of two runs, the
PNG, and each bad input refused with one line and exit code 2."""

from __future__ import annotations

import json
import math

import pytest

from jaxpar.cli import main
from jaxpar.train.report import read_run, summarize

GOODPUT = {
    "wall_s": 200.0,
    "goodput": 0.75,
    "seconds": {
        "productive": 150.0,
        "compile": 30.0,
        "recomputed": 12.0,
        "checkpoint": 8.0,
        "restore": 0.0,
    },  # fmt: skip
    "steps": {"productive": 20, "skipped": 1, "recomputed": 4},
    "restarts": 1,
    "down_s": 5.0,
    "attempts": [
        {
            "started": 1.0,
            "updated": 90.0,
            "start_step": 0,
            "end_step": 14,
            "ended": "stopped",
            "wall_s": 90.0,
            "seconds": {},
            "steps": {},
        },
        {
            "started": 95.0,
            "updated": 200.0,
            "start_step": 10,
            "end_step": 20,
            "ended": "finished",
            "wall_s": 105.0,
            "seconds": {},
            "steps": {},
        },
    ],  # fmt: skip
}


def _row(step: int, loss: float, tokens_per_s: float = 1000.0, **extra) -> dict:
    return {"step": step, "loss": loss, "lr": 1e-3, "grad_norm": 1.0, "step_time_s": 0.1,
            "tokens_per_s": tokens_per_s, "skipped": not math.isfinite(loss),
            "bad_in_row": int(not math.isfinite(loss)), **extra}  # fmt: skip


def _write_run(path, rows, steps=20, goodput=None):
    path.mkdir()
    (path / "config.yaml").write_text(f"train:\n  steps: {steps}\n  batch_size: 4\n")
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "checkpoints").mkdir()
    if goodput is not None:
        (path / "goodput.json").write_text(json.dumps(goodput))
    return path


@pytest.fixture
def runs(tmp_path):
    """Two runs: `alpha` with held-out losses, MFU, a skipped NaN step and a restart at step 10
    (goodput.json); `beta`, an older run of 8 of 10 steps without any of them."""
    alpha = [_row(s, 5.0 - 0.1 * s, 100.0 if s in (0, 10) else 1000.0 + s, mfu=0.4)
             for s in range(20)]  # fmt: skip
    alpha[7] = _row(7, math.nan, mfu=0.4)
    alpha[9]["eval_loss"] = 4.5
    alpha[19]["eval_loss"] = 4.6
    beta = [_row(s, 6.0 - 0.2 * s, 2000.0) for s in range(8)]
    return (_write_run(tmp_path / "alpha", alpha, goodput=GOODPUT),
            _write_run(tmp_path / "beta", beta, steps=10))  # fmt: skip


def test_summary_of_two_runs(capsys, runs):
    alpha, beta = runs
    assert main(["report", str(alpha), str(beta)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    first, second = (" ".join(block.split()) for block in out.split(str(beta)))
    assert str(alpha) in first
    for expected in [
        "0..19 of 20 planned",
        "final 3.1000 (step 19), best 3.1000 (step 19)",
        "final 4.6000 (step 19), best 4.5000 (step 9)",  # eval loss
        "1,010 (median)",  # steps 1..19 but 10 (each session's first): 1001..1019 but 1007, 1010
        "40.0% (median)",
        "skipped 1 (non-finite",
        "restarts 1 (attempts: 1 stopped, 1 finished; 5.0 s between attempts)",
        "75.0% of 200.0 s wall time",
        "steps: 20 productive, 4 recomputed, 1 skipped",
    ]:
        assert expected in first, (expected, first)
    assert ("productive 150.0 s 75.0% compile 30.0 s 15.0% recomputed 12.0 s 6.0% checkpoint "
            "8.0 s 4.0% steps:") in first  # fmt: skip
    assert "restore" not in first  # a zero part is left out
    assert "0..7 of 10 planned" in second
    assert "final 4.6000 (step 7), best 4.6000 (step 7)" in second
    assert "2,000 (median)" in second
    for absent in ("eval loss", "MFU", "restarts", "goodput"):
        assert absent not in second, absent


def test_summary_skips_non_finite_losses(runs):
    run = read_run(runs[0])
    assert math.isnan(run.rows[7]["loss"])
    s = summarize(run)
    assert s.skipped == 1
    assert s.best_loss == pytest.approx((19, 3.1))
    assert s.final_eval == (19, 4.6)


def test_plot(capsys, runs, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "losses.png"
    assert main(["report", *map(str, runs), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000
    assert f"plot: {png}" in capsys.readouterr().out
    none = tmp_path / "no-eval.png"  # the eval panel says so
    assert main(["report", str(runs[1]), "--plot", str(none)]) == 0
    assert none.stat().st_size > 10_000


def _expect_error(capsys, argv, *fragments: str) -> None:
    """Exit 2 and exactly one `jaxpar: error:` line naming `fragments` (as tests/test_cli.py)."""
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("jaxpar: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def test_not_a_run_folder(capsys, tmp_path):
    _expect_error(capsys, ["report", str(tmp_path / "none")], "does not exist")
    _expect_error(capsys, ["report", str(tmp_path)], "is not a run folder", "metrics.jsonl")
    _expect_error(capsys, ["report"], "required: OUT")


def test_bad_metrics_line(capsys, tmp_path):
    run = _write_run(tmp_path / "run", [_row(0, 5.0)])
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 1, "loss": 4.9\n')
    _expect_error(capsys, ["report", str(run)], f"{run / 'metrics.jsonl'}, line 2: not valid JSON")
    (run / "metrics.jsonl").write_text('{"step": 0, "loss": 5.0}\n[1, 2]\n')
    _expect_error(capsys, ["report", str(run)], "line 2: not a metrics row")
    (run / "metrics.jsonl").write_text('{"step": "zero", "loss": 5.0}\n')
    _expect_error(capsys, ["report", str(run)], "line 1: step must be an integer")


def test_bad_goodput(capsys, tmp_path):
    run = _write_run(
        tmp_path / "run", [_row(0, 5.0)], goodput={**GOODPUT, "seconds": {"eval": "x"}}
    )
    _expect_error(capsys, ["report", str(run)], "goodput.json: seconds.eval must be a number")


@pytest.mark.parametrize(
    ("plot", "fragments"),
    [
        ("losses.svg", ["--plot", "must name a .png file"]),
        ("missing/losses.png", ["--plot", "folder", "does not exist"]),
        ("taken.png", ["--plot", "exists; give a new file name"]),
    ],
)
def test_bad_plot_path(capsys, runs, tmp_path, plot, fragments):
    (tmp_path / "taken.png").write_bytes(b"keep")
    _expect_error(capsys, ["report", str(runs[0]), "--plot", str(tmp_path / plot)], *fragments)
    assert (tmp_path / "taken.png").read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alpha", "beta", "taken.png"]


def test_plot_without_matplotlib(capsys, runs, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import fails
    png = tmp_path / "losses.png"
    _expect_error(capsys, ["report", str(runs[0]), "--plot", str(png)],
                  "--plot needs matplotlib: pip install -e '.[plot]'")  # fmt: skip
    assert not png.exists()
