"""What each pipeline schedule needs of its layout, stated once (no jax: the config reads it).

`SCHEDULE_RULES` is read by config validation (`jaxpar.config.validate`, `validate_for_mesh`), by
`jaxpar.pipeline.schedule.Schedule` when it builds a table, and by the planner's search space
(`jaxpar.plan.space`), so none of them states a rule of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxpar.errors import JaxparError


@dataclass(frozen=True)
class ScheduleRule:
    """What one pipeline schedule needs of its layout: the one statement of these rules, read by
    `validate` (repeats), `validate_for_mesh` (stages and micro-batches), `Schedule` (both) and
    the planner (which repeats to try)."""

    chunks: str  # chunks of layers per stage (repeats): "one", "any" (>= 1), "several" (>= 2),
    # "two" (exactly 2)
    microbatches: str  # "any", "per_stage" (at least one per stage), "groups" (of one per stage)
    needs_pipeline: bool  # nothing to schedule on one stage
    hand_backward: bool  # the step runs the table's B and W ticks (else jax.grad of the F ticks)
    zero_bubble: bool  # W's (weight gradients) deferred into the pipeline's idle ticks
    ticks: str  # "forward" (jax.grad's), "fused" (F + B per tick), "single" (one action per
    # tick), "either" (single or fused, whichever the per-action costs make cheaper)
    shape: str = "circular"  # chunk j on stage j % P; "v": chunks s and 2P - 1 - s on stage s


SCHEDULE_RULES = {
    "gpipe": ScheduleRule("one", "any", False, False, False, "forward"),
    "circular": ScheduleRule("any", "per_stage", False, False, False, "forward"),
    "1f1b": ScheduleRule("one", "any", False, True, False, "either"),
    "interleaved_1f1b": ScheduleRule("several", "groups", False, True, False, "fused"),
    "zb_h1": ScheduleRule("one", "any", True, True, True, "either"),
    "zb_v": ScheduleRule("two", "any", True, True, True, "single", "v"),
}
SCHEDULES = tuple(SCHEDULE_RULES)
TICKS = ("auto", "single", "fused")  # `pipeline.tick`


def schedule_rule(name: str) -> ScheduleRule:
    """`name`'s rule.

    Raises:
        JaxparError: `name` is not a schedule.
    """
    if name not in SCHEDULE_RULES:
        raise JaxparError(
            f"pipeline.schedule={name!r} is not a schedule; valid: {', '.join(SCHEDULES)}"
        )
    return SCHEDULE_RULES[name]


def check_schedule_counts(name: str, microbatches: int, repeats: int) -> None:
    """Raises JaxparError unless `name` runs `repeats` chunks of layers per stage (and the
    micro-batch count is positive): what holds whatever the mesh."""
    chunks = schedule_rule(name).chunks
    if microbatches < 1:
        raise JaxparError(f"pipeline.microbatches={microbatches} must be at least 1")
    if repeats < 1:
        raise JaxparError(f"pipeline.repeats={repeats} must be at least 1")
    if chunks == "one" and repeats != 1:
        raise JaxparError(
            f"pipeline.repeats={repeats} needs pipeline.schedule=circular or interleaved_1f1b "
            f"({name} has one chunk of layers per stage)"
        )
    if chunks == "two" and repeats != 2:
        raise JaxparError(
            f"pipeline.repeats={repeats}: {name} runs exactly 2 chunks per stage (set "
            "pipeline.repeats=2)"
        )
    if chunks == "several" and repeats < 2:
        raise JaxparError(
            f"pipeline.repeats={repeats}: {name} needs at least 2 chunks per stage "
            "(with 1 it is 1f1b)"
        )


def check_schedule_tick(name: str, tick: str) -> None:
    """Raises JaxparError unless `name` can run ticks of granularity `tick` (`pipeline.tick`)."""
    if tick not in TICKS:
        valid = ", ".join(TICKS)
        raise JaxparError(f"pipeline.tick={tick!r} is not a tick granularity; valid: {valid}")
    rule = schedule_rule(name)
    if tick != "auto" and rule.ticks in ("single", "fused") and tick != rule.ticks:
        raise JaxparError(
            f"pipeline.tick={tick}: {name} runs {rule.ticks} ticks only (use pipeline.tick=auto)"
        )


def check_schedule_stages(name: str, stages: int, microbatches: int) -> None:
    """Raises JaxparError unless `name` can run `microbatches` micro-batches over `stages`."""
    rule = schedule_rule(name)
    if rule.microbatches == "per_stage" and microbatches < stages:
        raise JaxparError(
            f"pipeline.microbatches={microbatches} < pipeline={stages}: the {name} schedule "
            "needs at least one micro-batch per stage in flight"
        )
    if rule.microbatches == "groups" and microbatches % stages:
        raise JaxparError(
            f"pipeline.microbatches={microbatches} is not a multiple of pipeline={stages}: "
            f"{name} runs the micro-batches through each chunk in groups of one per stage"
        )
    if rule.needs_pipeline and stages == 1:
        raise JaxparError(
            f"pipeline.schedule={name} with pipeline=1: there is no pipeline to fill (zero-bubble "
            "schedules move weight gradients into pipeline bubbles; use gpipe or 1f1b)"
        )
