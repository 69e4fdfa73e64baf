"""What every experiment does with its figures: experiments/results/NAME.json plus a markdown
table, wherever the script is run from."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Resolved from this file, not the working directory, so that every script writes to one folder.
RESULTS = Path(__file__).resolve().parent / "results"


def write_results(
    name: str,
    rows: Sequence[dict[str, Any]],
    header: Sequence[str],
    cells: Callable[[dict[str, Any]], Sequence[Any]],
) -> Path:
    """Writes `RESULTS/NAME.json` (the rows) and `RESULTS/NAME.md` (one table line per row, from
    `cells`), prints the table, and returns the results folder, `experiments/results/`."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(list(rows), indent=2) + "\n")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in cells(r)) + " |" for r in rows]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return RESULTS


def train_one_step(run: Path, sizes: Sequence[str], context: int, timeout: float = 600) -> Path:
    """A run folder at `run`: a model of `sizes` (`model.*` overrides) with a context of `context`
    tokens, trained for one step on one repeated sentence (for the experiments that serve a
    model, where what it says does not matter)."""
    corpus = run.parent / f"{run.name}-corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 400)
    argv = [sys.executable, "-m", "jaxpar", "train", "--out", str(run), "--mesh", "data=1",
            *sizes, f"train.seq_len={context}", "train.batch_size=2", "train.steps=1",
            "train.sample_tokens=0", "train.warmup_steps=0", f"data.path={corpus}"]  # fmt: skip
    subprocess.run(argv, check=True, capture_output=True, timeout=timeout)
    return run
