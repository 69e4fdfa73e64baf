"""The pipeline schedule drawn as a stage x tick grid, in the terminal and as a PNG.

A cell names the micro-batch a stage runs at that tick (`3`, or `3b` for its second repeat on the
circular schedule); `.` is a bubble. The grid is the forward pass; the backward pass runs the same
grid from the last tick to the first.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxpar.pipeline.schedule import Schedule


def _label(schedule: Schedule, job: int) -> str:
    micro, repeat = job % schedule.microbatches, job // schedule.microbatches
    return f"{micro}{string.ascii_lowercase[repeat]}" if schedule.repeats > 1 else str(micro)


def ascii_timeline(schedule: Schedule) -> str:
    """The grid as text: one row per stage, one column per tick, `.` for idle."""
    table = schedule.table()
    width = max(len(_label(schedule, schedule.repeats * schedule.microbatches - 1)), 2)
    head = len(f"stage {schedule.stages - 1}")
    lines = [f"{'tick':<{head}} " + " ".join(f"{t:>{width}}" for t in range(schedule.ticks))]
    for stage, row in enumerate(table):
        cells = (_label(schedule, k) if k >= 0 else "." for k in row)
        lines.append(f"{f'stage {stage}':<{head}} " + " ".join(f"{c:>{width}}" for c in cells))
    idle = int((table < 0).sum())
    lines.append(f"idle {idle} of {table.size} stage-ticks = {idle / table.size:.1%} (bubble)")
    return "\n".join(lines)


def plot_timelines(schedules: Sequence[Schedule], path: Path) -> None:
    """Draws each schedule's grid as one panel of a PNG, ticks equally wide in every panel.

    Needs matplotlib (`pip install -e ".[plot]"`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba

    palette = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 7]  # 7 is grey
    width = max(s.ticks for s in schedules)
    rows = sum(s.stages for s in schedules)
    fig, axes = plt.subplots(
        len(schedules),
        1,
        figsize=(0.6 * width + 1.5, 0.45 * rows + 0.9 * len(schedules)),
        squeeze=False,
        height_ratios=[s.stages for s in schedules],
    )
    axes = axes[:, 0]
    for ax, s in zip(axes, schedules, strict=True):
        table = s.table()
        image = np.full((*table.shape, 4), to_rgba("0.85"))  # idle: grey, no label
        for (stage, tick), k in np.ndenumerate(table):
            if k >= 0:
                micro, repeat = k % s.microbatches, k // s.microbatches
                alpha = 1.0 - 0.5 * repeat / s.repeats  # later repeats lighter
                image[stage, tick] = to_rgba(palette[micro % len(palette)], alpha)
                ax.text(tick, stage, _label(s, k), ha="center", va="center", fontsize=7)
        ax.imshow(image, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(s.ticks))
        ax.set_yticks(range(s.stages), [f"stage {i}" for i in range(s.stages)])
        ax.set_xticks(np.arange(s.ticks + 1) - 0.5, minor=True)
        ax.set_yticks(np.arange(s.stages + 1) - 0.5, minor=True)
        ax.grid(which="minor", color="white", linewidth=1.5)
        ax.tick_params(which="minor", length=0)
        key = "cell: micro-batch, letter: repeat" if s.repeats > 1 else "cell: micro-batch"
        ax.set_title(f"{s.describe()};  grey: bubble;  {key}", fontsize=9, loc="left")
    axes[-1].set_xlabel("tick (forward pass; the backward pass runs the grid right to left)")
    fig.tight_layout()
    for ax, s in zip(axes, schedules, strict=True):
        box = ax.get_position()
        ax.set_position([box.x0, box.y0, box.width * s.ticks / width, box.height])
    fig.savefig(path, dpi=130)
    plt.close(fig)
