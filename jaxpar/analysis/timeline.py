"""The pipeline schedule drawn as a stage x tick grid, in the terminal and as a PNG.

Each stage has a row per kind of action its schedule runs: F (forward), B (backward; the input
gradient alone for zero-bubble schedules) and W (weight gradient). A cell names the micro-batch
(`3`, or `3b` for its second chunk on a stage); `.` is idle. For gpipe and circular the B rows are
`jax.grad`'s transposed scan: the forward ticks run again from the last to the first.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxpar.pipeline.schedule import KINDS, Schedule, W

COLOURS = {"F": "tab:blue", "B": "tab:orange", "W": "tab:green"}


def _label(schedule: Schedule, job: int) -> str:
    micro, repeat = schedule.job(job)
    return f"{micro}{string.ascii_lowercase[repeat]}" if schedule.repeats > 1 else str(micro)


def _kinds(schedule: Schedule) -> list[int]:
    return [k for k in range(len(KINDS)) if k != W or schedule.split]


def ascii_timeline(schedule: Schedule) -> str:
    """The grid as text: per stage one row per action kind, one column per tick."""
    jobs = schedule.jobs
    ticks = jobs.shape[-1]
    width = max(len(_label(schedule, schedule.repeats * schedule.microbatches - 1)), 2)
    head = len(f"stage {schedule.stages - 1} F")
    lines = [f"{'tick':<{head}} " + " ".join(f"{t:>{width}}" for t in range(ticks))]
    for stage in range(schedule.stages):
        for kind in _kinds(schedule):
            cells = (_label(schedule, k) if k >= 0 else "." for k in jobs[kind, stage])
            name = f"stage {stage} {KINDS[kind]}"
            lines.append(f"{name:<{head}} " + " ".join(f"{c:>{width}}" for c in cells))
    busy = (jobs >= 0).any(axis=0)
    idle = int((~busy).sum())
    lines.append(
        f"stage-ticks with no action: {idle} of {busy.size} = {idle / busy.size:.1%}; textbook "
        f"bubble {schedule.bubble:.1%}, lockstep with F = B = W: "
        f"{schedule.lockstep_bubble(1, 1, 1):.1%}"
    )
    return "\n".join(lines)


def plot_timelines(schedules: Sequence[Schedule], path: Path) -> None:
    """Draws each schedule as one panel of a PNG: a row per stage, each tick's cell split into
    its F, B and W slots, coloured by kind and labelled with the micro-batch; ticks are equally
    wide in every panel.

    Needs matplotlib (`pip install -e ".[plot]"`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    width = max(s.jobs.shape[-1] for s in schedules)
    rows = sum(s.stages for s in schedules)
    fig, axes = plt.subplots(
        len(schedules), 1, figsize=(0.45 * width + 2, 0.6 * rows + 1.0 * len(schedules)),
        squeeze=False, height_ratios=[s.stages for s in schedules],
    )  # fmt: skip
    for ax, s in zip(axes[:, 0], schedules, strict=True):
        kinds = _kinds(s)
        share = 1 / len(kinds)
        for kind_index, kind in enumerate(kinds):
            for (stage, tick), job in np.ndenumerate(s.jobs[kind]):
                y = stage - 0.5 + kind_index * share
                if job < 0:
                    ax.add_patch(Rectangle((tick - 0.5, y), 1, share, color="0.9"))
                    continue
                alpha = 1.0 - 0.5 * s.job(job)[1] / s.repeats  # later chunks lighter
                colour = COLOURS[KINDS[kind]]
                ax.add_patch(Rectangle((tick - 0.5, y), 1, share, color=colour, alpha=alpha))
                ax.text(tick, y + share / 2, _label(s, job), ha="center", va="center", fontsize=6)
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_ylim(s.stages - 0.5, -0.5)
        ax.set_yticks(range(s.stages), [f"stage {i}" for i in range(s.stages)])
        for edge in np.arange(s.jobs.shape[-1] + 1) - 0.5:
            ax.axvline(edge, color="white", linewidth=1)
        for edge in np.arange(s.stages + 1) - 0.5:
            ax.axhline(edge, color="white", linewidth=2)
        lockstep = s.lockstep_bubble(1, 1, 1)
        ax.set_title(
            f"{s.describe()}; lockstep bubble with F = B = W: {lockstep:.1%}", fontsize=9,
            loc="left",
        )  # fmt: skip
    handles = [Patch(color=c, label=k) for k, c in COLOURS.items()] + [
        Patch(color="0.9", label="idle")
    ]
    axes[0, 0].legend(handles=handles, ncol=4, fontsize=8, loc="lower right",
                      bbox_to_anchor=(1, 1.15))  # fmt: skip
    axes[-1, 0].set_xlabel("tick")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
