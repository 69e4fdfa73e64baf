"""The training wing's commands: train, checkpoints, mesh, shardings, analyze, bench, report and
plan.

Each command sets up its devices first (`jaxpar.cli.devices`) and imports the library, and with it
JAX, inside the function afterwards."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from jaxpar.cli.devices import (
    MAX_SIMULATED,
    SIMULATED,
    config_and_mesh,
    placement_of,
    prepare_devices,
)
from jaxpar.config import load_config
from jaxpar.errors import JaxparError
from jaxpar.mesh import MeshSpec, parse_mesh

if TYPE_CHECKING:
    from jaxpar.placement import Placement


def cmd_train(args: argparse.Namespace) -> int:
    """`jaxpar train`: trains into --out (resuming its newest checkpoint); prints a summary."""
    from jaxpar.runs import check_train_dir, new_run_dir

    out = Path(args.out) if args.out else new_run_dir()
    check_train_dir(out)
    config, spec = config_and_mesh(args)
    from rich.console import Console

    from jaxpar.distributed import current
    from jaxpar.infer.train_sample import sample_text
    from jaxpar.mesh import make_mesh
    from jaxpar.train.goodput import process_start
    from jaxpar.train.loop import TrainingAborted, train

    console = Console(highlight=False, soft_wrap=True, quiet=not current().primary)
    console.print(f"run folder: {out}")
    try:
        summary = train(config, make_mesh(spec), out, console, started=process_start())
    except TrainingAborted as e:
        print(f"jaxpar: training aborted: {e}", file=sys.stderr)
        return 1
    if not summary.steps:
        console.print(f"nothing to do: the checkpoint is at step {summary.start_step}")
        return 0
    end = summary.start_step + summary.steps
    console.print(
        f"\ndone: steps {summary.start_step}-{end - 1}, loss {summary.first_loss:.4f} -> "
        f"{summary.last_loss:.4f}, {summary.tokens_per_s:,.0f} tokens/s, compile "
        f"{summary.compile_s:.1f}s, train {summary.train_s:.1f}s"
        + (f", {summary.skipped} non-finite steps skipped" if summary.skipped else "")
    )
    t = config.train
    if t.sample_tokens and not summary.stopped_by:
        text, made = sample_text(
            summary.placement, summary.state.params, t.sample_prompt, t.sample_tokens, t.seed
        )
        fitted = f" ({made} tokens: the context is {t.seq_len})" if made < t.sample_tokens else ""
        console.print(f"\nsample:{fitted}", style="bold")
        console.print(text, markup=False)
    console.print(f"\nmetrics: {out / 'metrics.jsonl'}   config: {out / 'config.yaml'}")
    return 0


def cmd_checkpoints(args: argparse.Namespace) -> int:
    """`jaxpar checkpoints`: a table of a run's checkpoints."""
    from jaxpar.checkpoint import list_checkpoints

    rows = list_checkpoints(Path(args.out))
    print(f"{'step':>8}  {'mesh':<28} {'size':>12}  state")
    for r in rows:
        state = "complete" if r.complete else "INCOMPLETE"
        print(f"{r.step:>8}  {r.mesh:<28} {r.bytes:>12,}  {state}")
    if not rows:
        print("(no checkpoints yet)")
    return 0


def cmd_mesh(args: argparse.Namespace) -> int:
    """`jaxpar mesh`: prints a mesh's sizes, devices and groups."""
    from jaxpar.mesh import describe, make_mesh

    spec = prepare_devices(parse_mesh(args.spec), args.devices)
    print(describe(make_mesh(spec)))
    return 0


def cmd_shardings(args: argparse.Namespace) -> int:
    """`jaxpar shardings`: every parameter's layout, and the bytes each device holds."""
    placement = placement_of(args)
    from jaxpar.analysis.params import param_rows, tree_bytes_per_device
    from jaxpar.analysis.report import param_table
    from jaxpar.train.step import Trainer

    rows = param_rows(placement.abstract_params, placement.param_shardings)
    title = f"parameters on mesh {placement.spec}, rules '{placement.rules.name}'"
    table = param_table(rows, title)
    console = _wide_console()
    console.print(table)
    total = sum(r.bytes for r in rows)
    per_device = sum(r.bytes_per_device for r in rows)
    trainer = Trainer(placement)
    opt_bytes = tree_bytes_per_device(
        trainer.abstract_state().opt_state, trainer.state_shardings.opt_state
    )
    console.print(
        f"parameters: {placement.config.model.num_params:,} ({total:,} bytes); per device "
        f"{per_device:,} bytes = total / {total / per_device:.2f}; optimizer state per device "
        f"{opt_bytes:,} bytes"
    )
    return 0


def _wide_console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True, width=max(160, Console().width))


def _check_png_path(path: str, option: str, without: str, new: bool = False) -> Path:
    """Refuses the PNG an `option` (--timeline, --plot) names before any work: not a .png, in a
    folder that does not exist, a file that exists where it must be `new`, or no matplotlib to
    draw it (`without`: what works without it)."""
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise JaxparError(f"{option} {path!r} must name a .png file")
    if not out.parent.is_dir():
        raise JaxparError(f"{option} {path!r}: folder {str(out.parent)!r} does not exist")
    if new and out.exists():
        raise JaxparError(f"{option} {path!r} exists; give a new file name")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise JaxparError(
            f"{option} needs matplotlib: pip install -e '.[plot]' ({without} does not)"
        ) from None
    return out


def cmd_analyze(args: argparse.Namespace) -> int:
    """`jaxpar analyze`: compiles the train step and reports its costs without running it."""
    timeline = (
        _check_png_path(args.timeline, "--timeline", "the terminal timeline")
        if args.timeline
        else None
    )
    placement = placement_of(args)
    import json

    from jaxpar.analysis.report import analyze, render
    from jaxpar.analysis.timeline import ascii_timeline, plot_timelines
    from jaxpar.train.step import Trainer

    analysis = analyze(Trainer(placement))
    if timeline is not None:
        plot_timelines([placement.schedule], timeline)
    if args.json:
        print(json.dumps(analysis.to_json(), indent=2))
        return 0
    console = _wide_console()
    render(analysis, console)
    console.print(f"\n[bold]pipeline timeline[/bold] ({placement.schedule.describe()})")
    console.print(ascii_timeline(placement.schedule), markup=False)
    if timeline is not None:
        console.print(f"timeline: {timeline}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """`jaxpar bench`: times train steps (median step, tokens/s, MFU and HFU)."""
    if args.steps < 1:
        raise JaxparError(f"--steps {args.steps} must be at least 1")
    if args.warmup < 0:
        raise JaxparError(f"--warmup {args.warmup} must be 0 or more")
    placement = placement_of(args)
    import json

    from jaxpar.train.bench import bench
    from jaxpar.train.step import Trainer

    config = placement.config
    console = _wide_console()
    log = console.print if not args.json else lambda *a, **k: None
    if args.stages:
        return _bench_stages(placement, args, log)
    m = config.model
    log(
        f"bench: {m.num_params / 1e6:.1f}M params on mesh {placement.spec} "
        f"({placement.dtype.name}), batch {config.train.batch_size} x {config.train.seq_len}, "
        f"{args.warmup} warm-up + {args.steps} timed steps"
    )
    result = bench(
        Trainer(placement),
        args.steps,
        args.warmup,
        progress=lambda i, dt: log(f"  step {i + 1}/{args.steps}: {dt * 1e3:,.1f} ms"),
    )
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    mfu = (
        f"MFU {result.mfu:.1%}, HFU {result.hfu:.1%} of "
        f"{result.peak_flops_per_device / 1e12:,.0f} TFLOP/s peak"
        if result.mfu is not None and result.hfu is not None
        else f"MFU: no known peak for '{result.device_kind}'"
    )
    log(
        f"median step {result.median_step_s * 1e3:,.1f} ms, {result.tokens_per_s:,.0f} tokens/s, "
        f"compile {result.compile_s:.1f}s; {result.achieved_flops_per_device / 1e12:,.3f} "
        f"model TFLOP/s per device; {mfu}; loss {result.first_loss:.4f} -> {result.last_loss:.4f}"
    )
    return 0


def _bench_stages(placement: Placement, args: argparse.Namespace, log: Callable) -> int:
    """`jaxpar bench --stages`: each stage's layers timed alone, their speeds and the split
    that minimises the slowest stage."""
    import json

    from jaxpar.train.balance import StageTimer, check_balanceable, propose

    check_balanceable(placement, "bench --stages")
    layers = placement.layout.stage_sizes
    log(f"bench --stages: stages of {list(layers)} layers on mesh {placement.spec}, forward and "
        f"backward of one micro-batch, median of {args.steps} runs each")  # fmt: skip
    times = StageTimer(placement).times(args.steps)
    proposal = propose(placement, times)
    speeds = [round(s, 3) for s in proposal.speeds]
    if args.json:
        print(json.dumps({"stage_layers": list(layers), "times_s": times, "speeds": speeds,
                          "proposed": list(proposal.best),
                          "slowest_now": proposal.now_cost, "slowest_proposed": proposal.best_cost},
                         indent=2))  # fmt: skip
        return 0
    for stage, (n, t, speed) in enumerate(zip(layers, times, speeds, strict=True)):
        log(f"  stage {stage}: {n} layers, {t * 1e3:,.2f} ms, {t / n * 1e3:,.2f} ms per layer, "
            f"speed {speed:.2f}")  # fmt: skip
    best, listed = list(proposal.best), ", ".join(map(str, speeds))
    if proposal.best == layers:
        log(f"the split {best} is already the best for these speeds")
        return 0
    gain = proposal.now_cost / proposal.best_cost
    log(f"proposed: pipeline.stage_layers={best} (its slowest stage {gain:.2f}x faster by the "
        f"cost model), or parallel.stage_speeds=[{listed}] pipeline.stage_layers=auto")  # fmt: skip
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """`jaxpar report`: a summary of each run folder; --plot: their losses in one new PNG."""
    plot = None
    if args.plot:
        plot = _check_png_path(args.plot, "--plot", "the terminal summary", new=True)
    from rich.console import Console

    from jaxpar.train.report import plot_losses, read_run, render

    runs = [read_run(Path(out)) for out in args.outs]
    if plot is not None:
        plot_losses(runs, plot)
    console = Console(highlight=False)
    render(runs, console)
    if plot is not None:
        console.print(f"\nplot: {plot}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """`jaxpar plan`: ranks the layouts for --devices N and compile-checks the best --top."""
    write = _check_plan_args(args)
    config = load_config(args.config, args.overrides)
    from jaxpar.plan.hardware import detect_hardware, load_hardware

    hw = load_hardware(args.hardware) if args.hardware else None  # bad profiles fail first
    compiling = not args.no_compile and not args.calibrate
    present = _present_devices(args, compiling)
    if args.calibrate:
        return _calibrate(write)
    devices = args.devices or present
    hw = hw or detect_hardware(config.parallel.hardware)
    compile_top = args.top if compiling and present == devices else 0
    import json

    from jaxpar.plan.planner import render

    console = _wide_console()
    result = _plan_with_progress(config, devices, hw, args.top, compile_top, console, args.json)
    if write is not None:
        from jaxpar.config import dump_yaml

        write.write_text(dump_yaml(result.best.candidate.apply(config)))
    if args.json:
        print(json.dumps(result.to_json(args.top), indent=2))
        return 0
    render(result, args.top, console)
    if not compile_top:
        reason = (
            "--no-compile"
            if args.no_compile
            else (f"{devices} devices cannot be simulated here (at most {MAX_SIMULATED})")
        )
        console.print(f"ranked by the cost model alone: {reason}")
    if write is not None:
        console.print(f"config: {write}")
    return 0


def _check_plan_args(args: argparse.Namespace) -> Path | None:
    """Refuses a bad --top, --devices or --write before anything loads; the --write file."""
    if args.top < 1:
        raise JaxparError(f"--top {args.top} must be at least 1")
    if args.devices is not None and args.devices < 1:
        raise JaxparError(f"--devices must be a positive integer, got {args.devices}")
    write = Path(args.write) if args.write else None
    if write is not None and write.exists():
        raise JaxparError(f"--write {str(write)!r} exists; give a new file name")
    return write


def _present_devices(args: argparse.Namespace, compiling: bool) -> int | None:
    """The devices present (on CPU: simulated), or None where plan does not start JAX: it ranks
    --devices N by the cost model alone (--no-compile, or more than it can simulate)."""
    if args.calibrate or args.devices is None or (compiling and args.devices <= MAX_SIMULATED):
        prepare_devices(MeshSpec(data=-1), args.devices or SIMULATED)  # on CPU: simulated devices
        import jax

        return jax.device_count()
    return None


def _plan_with_progress(config, devices, hw, top, compile_top, console, quiet):
    """`planner.plan` under a progress bar on the console (none when `quiet`)."""
    from rich.progress import Progress

    from jaxpar.plan.planner import plan

    with Progress(console=console, transient=True, disable=quiet) as bar:
        task = bar.add_task("planning", total=None)

        def progress(phase: str, done: int, total: int) -> None:
            bar.update(task, description=phase, completed=done, total=total)

        return plan(config, devices, hw, top, compile_top, progress)


def _calibrate(write: Path | None) -> int:
    import jax

    from jaxpar.plan.calibrate import calibrate

    name = jax.devices()[0].device_kind.lower().replace(" ", "-")
    path = write or Path(f"hardware-{name}-{jax.device_count()}.yaml")
    if path.exists():
        raise JaxparError(f"{str(path)!r} exists; give a new file name with --write")
    profile = calibrate(name, progress=print)
    path.write_text(profile.to_yaml())
    print(f"profile: {path}")
    return 0
