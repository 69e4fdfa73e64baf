"""What every experiment does with its figures: experiments/results/NAME.json plus a markdown
table, wherever the script is run from."""

from __future__ import annotations

import json
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
