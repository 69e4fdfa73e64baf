"""jaxpar: train and serve a Llama-style transformer split over a mesh of devices.

The mesh has three axes: data (data parallelism, FSDP), pipeline (pipeline stages) and tensor
(Megatron tensor parallelism), written like --mesh data=2,pipeline=2,tensor=2. On a CPU host the
devices a mesh needs are simulated. Every command takes dotted config overrides (train.steps=50);
bad input ends with one line and exit code 2.

commands:
  train        train a model (defaults: a small model on 8 simulated CPU devices)
  checkpoints  list a run's checkpoints
  mesh         print a mesh: sizes, devices and groups
  shardings    print every parameter's layout on the mesh
  analyze      compile the train step without running it: memory, FLOPs, collectives, bubble
  bench        time train steps: median step time, tokens/s, MFU and HFU
  plan         rank every layout for N devices: memory, step time, MFU; the best compiled
  eval         negative log-likelihood and perplexity of a model on text
  generate     generate text with a KV cache on the mesh
  chat         talk to a model; replies stream as they are decoded
  serve        an OpenAI-compatible HTTP server with continuous batching
  export-hf    write a run's newest checkpoint as a Hugging Face Llama folder
  launch       run one jaxpar command as N local processes of one job

examples:
  jaxpar train --mesh data=2,pipeline=2,tensor=2 pipeline.microbatches=4 --out runs/demo
  jaxpar analyze --mesh pipeline=4,tensor=2 pipeline.microbatches=8 --json
  jaxpar plan --devices 64 --hardware h100-sxm model.layers=32 model.dim=4096 ...
  jaxpar train --mesh auto --devices 4 --out runs/demo
  jaxpar generate --run runs/demo --prompt "def " --greedy
  jaxpar serve --run runs/demo --mesh data=2,pipeline=2,tensor=2 serve.max_seqs=16
"""

# JAX is imported only after the mesh spec is known, because the number of simulated CPU devices
# has to be set before JAX starts: the commands import the library lazily.

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from jaxpar import __version__
from jaxpar.config import Config, load_config
from jaxpar.errors import JaxparError
from jaxpar.mesh import MeshSpec, parse_mesh, prepare


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise JaxparError(f"{message} (see '{self.prog} --help')")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.yaml", help="YAML config; keys as in README")
    p.add_argument(
        "--mesh",
        metavar="SPEC",
        help="mesh like data=2,tensor=4 (overrides parallel.mesh); "
        "'auto': the planner's best layout for the devices present",
    )
    p.add_argument("--devices", type=int, metavar="N", help="simulate N CPU devices")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.steps=50")


# Each command's one-line description, as the module docstring lists it (one source for both
# `jaxpar --help` and `jaxpar COMMAND --help`).
_DESCRIPTIONS = dict(
    line.strip().split(None, 1)
    for line in __doc__.split("commands:\n", 1)[1].split("\n\n", 1)[0].splitlines()
)


def _command(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, description=f"jaxpar {name}: {_DESCRIPTIONS[name]}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="jaxpar", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"jaxpar {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, parser_class=_Parser, metavar="command",
        help="one of the commands above; 'jaxpar COMMAND --help' describes its options",
    )  # fmt: skip

    p = _command(sub, "train")
    _add_config_args(p)
    p.add_argument("--out", metavar="DIR", help="run folder (default: a new folder under runs/)")
    _add_process_args(p)

    p = _command(sub, "checkpoints")
    p.add_argument("out", metavar="OUT", help="the run folder")

    p = _command(sub, "mesh")
    p.add_argument("spec", metavar="SPEC", help="e.g. data=2,pipeline=2,tensor=2")
    p.add_argument("--devices", type=int, metavar="N", help="simulate N CPU devices")

    p = _command(sub, "shardings")
    _add_config_args(p)

    p = _command(sub, "analyze")
    _add_config_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON document (keys in README)")
    p.add_argument("--timeline", metavar="FILE.png", help="draw the pipeline schedule to a PNG")

    p = _command(sub, "bench")
    _add_config_args(p)
    p.add_argument("--steps", type=int, default=10, metavar="N", help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=2, metavar="N", help="untimed steps first")
    p.add_argument("--json", action="store_true", help="print one JSON document")

    p = _command(sub, "plan")
    p.add_argument("--config", metavar="FILE.yaml", help="YAML config; keys as in README")
    p.add_argument("--devices", type=int, metavar="N", help="devices to plan for (default: those "
                   "present; on CPU, 8 simulated)")  # fmt: skip
    p.add_argument("--hardware", metavar="NAME|FILE", help="profile: h100-sxm, h200, a100-80g, "
                   "tpu-v5e, cpu, or a YAML file (default: the devices present)")  # fmt: skip
    p.add_argument("--top", type=int, default=5, metavar="K", help="rows to show and to compile "
                   "(default 5)")  # fmt: skip
    p.add_argument("--no-compile", action="store_true", help="rank by the cost model alone")
    p.add_argument("--json", action="store_true", help='print {"candidates": [...]}, best first')
    p.add_argument("--write", metavar="FILE.yaml", help="write the best layout's config (with "
                   "--calibrate: the measured profile)")  # fmt: skip
    p.add_argument("--calibrate", action="store_true", help="measure the devices present and "
                   "write their hardware profile")  # fmt: skip
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.batch_size=64")

    p = _command(sub, "eval")
    _add_model_args(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", metavar="FILE", help="a text file")
    source.add_argument("--tokens", metavar="FILE.npy", help="int token ids [batch, length]")
    p.add_argument("--batch", type=int, default=8, metavar="N", help="rows per forward pass")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = _command(sub, "generate")
    _add_model_args(p)
    _add_sampling_args(p)
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", metavar="TEXT", help="repeat for a batch")
    prompts.add_argument(
        "--prompt-ids", action="append", metavar="1,2,3", help="token ids; repeat for a batch"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = _command(sub, "chat")
    _add_model_args(p)
    _add_sampling_args(p)

    p = _command(sub, "serve")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free one)")
    p.add_argument("--model-name", metavar="NAME", help="the served model's id (default: the "
                   "folder's name)")  # fmt: skip
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="serve.* keys, e.g. "
                   "serve.max_seqs=16")  # fmt: skip

    p = _command(sub, "launch")
    p.add_argument(
        "-n", "--num-processes", type=int, required=True, metavar="N", help="processes to start"
    )
    p.add_argument(
        "--devices-per-process", type=int, metavar="K", help="simulated CPU devices per process"
    )
    p.add_argument(
        "--pin-cores", action="store_true", help="run process r on CPU core r alone (timing runs)"
    )
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")

    p = _command(sub, "export-hf")
    p.add_argument("out", metavar="OUT", help="the jaxpar run folder")
    p.add_argument("dest", metavar="DIR", help="a new folder for config.json and safetensors")
    return parser


def _add_process_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "multi-process jobs (SLURM, Open MPI and Cloud TPU are detected without these)"
    )
    g.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address")
    g.add_argument("--num-processes", type=int, metavar="N", help="processes in the job")
    g.add_argument("--process-id", type=int, metavar="I", help="this process, 0 to N-1")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", metavar="OUT", help="a jaxpar run folder (its newest checkpoint)")
    source.add_argument("--init-from-hf", metavar="DIR", help="a local Hugging Face Llama folder")
    p.add_argument("--mesh", default="data=1", metavar="SPEC", help="mesh (default data=1)")
    p.add_argument("--devices", type=int, metavar="N", help="simulate N CPU devices")
    p.add_argument(
        "--dtype", default="auto", choices=("auto", "float32", "bfloat16"), help="compute dtype"
    )


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    p.add_argument("--greedy", action="store_true", help="always the most likely token")
    p.add_argument("--temperature", type=float, metavar="T",
                   help="default: jaxpar.infer.engine.DEFAULT_TEMPERATURE")  # fmt: skip
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="0: no limit")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus mass")
    p.add_argument("--seed", type=int, default=0)


def _config_and_mesh(args: argparse.Namespace) -> tuple[Config, MeshSpec]:
    """Loads the config and sets up the devices its mesh needs (the placement checks the rest).

    The config comes back with the resolved mesh and compute dtype, as a run records them."""
    overrides = list(args.overrides)
    if args.mesh is not None:
        overrides.append(f"parallel.mesh={args.mesh}")
    config = load_config(args.config, overrides)
    if config.parallel.mesh == AUTO:
        config, spec = _auto_layout(config, args.devices)
    else:
        spec = prepare(parse_mesh(config.parallel.mesh), args.devices)
    from jaxpar.placement import compute_dtype

    resolved_dtype = compute_dtype(config.train.dtype).name
    return config.replace(**{"parallel.mesh": str(spec), "train.dtype": resolved_dtype}), spec


AUTO = "auto"
SIMULATED = 8  # CPU devices `plan` and `--mesh auto` simulate when not told a count
MAX_SIMULATED = 64  # the most CPU devices `plan` simulates to compile-check its candidates


def _auto_layout(config: Config, devices: int | None) -> tuple[Config, MeshSpec]:
    """`--mesh auto`: the planner's best layout (by the cost model) for the devices present."""
    prepare(MeshSpec(data=-1), devices or SIMULATED)
    import jax

    from jaxpar.distributed import current
    from jaxpar.plan.hardware import detect_hardware
    from jaxpar.plan.planner import auto_layout, describe_choice

    config, result = auto_layout(
        config, jax.device_count(), detect_hardware(config.parallel.hardware)
    )
    if current().primary:
        print(f"jaxpar: {describe_choice(result)}", file=sys.stderr)
    return config, result.best.candidate.spec


def _placement(args: argparse.Namespace):
    config, spec = _config_and_mesh(args)
    from jaxpar.mesh import make_mesh
    from jaxpar.placement import Placement

    return Placement(config, make_mesh(spec))


def cmd_train(args: argparse.Namespace) -> int:
    from jaxpar.runs import check_train_dir, new_run_dir

    out = Path(args.out) if args.out else new_run_dir()
    check_train_dir(out)
    config, spec = _config_and_mesh(args)
    from rich.console import Console

    from jaxpar.distributed import current
    from jaxpar.infer.load import sample_text
    from jaxpar.mesh import make_mesh
    from jaxpar.train.loop import TrainingAborted, train

    console = Console(highlight=False, soft_wrap=True, quiet=not current().primary)
    console.print(f"run folder: {out}")
    try:
        summary = train(config, make_mesh(spec), out, console)
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
    from jaxpar.mesh import describe, make_mesh

    spec = prepare(parse_mesh(args.spec), args.devices)
    print(describe(make_mesh(spec)))
    return 0


def cmd_shardings(args: argparse.Namespace) -> int:
    placement = _placement(args)
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


def _check_timeline_path(path: str) -> Path:
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise JaxparError(f"--timeline {path!r} must name a .png file")
    if not out.parent.is_dir():
        raise JaxparError(f"--timeline {path!r}: folder {str(out.parent)!r} does not exist")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise JaxparError(
            "--timeline needs matplotlib: pip install -e '.[plot]' (the terminal timeline does not)"
        ) from None
    return out


def cmd_analyze(args: argparse.Namespace) -> int:
    timeline = _check_timeline_path(args.timeline) if args.timeline else None
    placement = _placement(args)
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
    if args.steps < 1:
        raise JaxparError(f"--steps {args.steps} must be at least 1")
    if args.warmup < 0:
        raise JaxparError(f"--warmup {args.warmup} must be 0 or more")
    placement = _placement(args)
    import json

    from jaxpar.train.bench import bench
    from jaxpar.train.step import Trainer

    config = placement.config
    console = _wide_console()
    log = console.print if not args.json else lambda *a, **k: None
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


def cmd_plan(args: argparse.Namespace) -> int:
    if args.top < 1:
        raise JaxparError(f"--top {args.top} must be at least 1")
    if args.devices is not None and args.devices < 1:
        raise JaxparError(f"--devices must be a positive integer, got {args.devices}")
    write = Path(args.write) if args.write else None
    if write is not None and write.exists():
        raise JaxparError(f"--write {str(write)!r} exists; give a new file name")
    config = load_config(args.config, args.overrides)
    from jaxpar.plan.hardware import detect_hardware, load_hardware

    hw = load_hardware(args.hardware) if args.hardware else None  # bad profiles fail first
    compiling = not args.no_compile and not args.calibrate
    present = None
    if args.calibrate or args.devices is None or (compiling and args.devices <= MAX_SIMULATED):
        prepare(MeshSpec(data=-1), args.devices or SIMULATED)  # on CPU: simulated devices
        import jax

        present = jax.device_count()
    if args.calibrate:
        return _calibrate(write)
    devices = args.devices or present
    hw = hw or detect_hardware(config.parallel.hardware)
    compile_top = args.top if compiling and present == devices else 0
    import json

    from rich.progress import Progress

    from jaxpar.plan.planner import plan, render

    console = _wide_console()
    with Progress(console=console, transient=True, disable=args.json) as bar:
        task = bar.add_task("planning", total=None)

        def progress(phase: str, done: int, total: int) -> None:
            bar.update(task, description=phase, completed=done, total=total)

        result = plan(config, devices, hw, args.top,
                      compile_top, progress)  # fmt: skip
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


def _load_model(args: argparse.Namespace):
    """The model named by --run or --init-from-hf, on the mesh of --mesh."""
    source = Path(args.run or args.init_from_hf)
    flag = "--run" if args.run else "--init-from-hf"
    if not source.is_dir():
        raise JaxparError(f"{flag} {str(source)!r} is not a directory")
    spec = prepare(parse_mesh(args.mesh), args.devices)
    from jaxpar.infer.load import load_hf, load_run
    from jaxpar.mesh import make_mesh

    mesh = make_mesh(spec)
    warn = lambda msg: print(f"jaxpar: {msg}", file=sys.stderr)  # noqa: E731
    if args.run:
        return load_run(source, mesh, args.dtype, warn=warn)
    return load_hf(source, mesh, args.dtype)


def _sampling(args: argparse.Namespace):
    from jaxpar.infer.engine import Sampling

    if args.max_new_tokens < 1:
        raise JaxparError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    if not args.greedy and args.temperature is not None and args.temperature <= 0:
        raise JaxparError(f"--temperature {args.temperature} must be > 0 (or use --greedy)")
    if args.top_k < 0:
        raise JaxparError(f"--top-k {args.top_k} must be 0 (no limit) or more")
    if not 0 < args.top_p <= 1:
        raise JaxparError(f"--top-p {args.top_p} must be in (0, 1]")
    if args.greedy or args.temperature is not None:
        return Sampling(0.0 if args.greedy else args.temperature, args.top_k, args.top_p)
    return Sampling(top_k=args.top_k, top_p=args.top_p)  # the default temperature


def cmd_eval(args: argparse.Namespace) -> int:
    if args.batch < 1:
        raise JaxparError(f"--batch {args.batch} must be at least 1")
    path = Path(args.text or args.tokens)
    if not path.is_file():
        raise JaxparError(f"{'--text' if args.text else '--tokens'} {str(path)!r} does not exist")
    model = _load_model(args)
    import json

    from jaxpar.infer.load import read_token_rows, text_rows

    if args.text:
        ids = model.encode(path.read_text(errors="replace"))
        model.check_ids(ids, f"--text {str(path)!r}")
        rows = text_rows(ids, model.context)
    else:
        rows = read_token_rows(path, model)
    result = model.evaluate(rows, args.batch)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{model.source}: nll {result['nll']:.4f} nats/token, perplexity "
            f"{result['perplexity']:.3f} over {result['tokens']:,} predicted tokens"
        )
    return 0


def _prompts(args: argparse.Namespace, model) -> list[list[int]]:
    if args.prompt_ids:
        prompts = []
        for text in args.prompt_ids:
            try:
                ids = [int(x) for x in text.split(",") if x.strip()]
            except ValueError:
                raise JaxparError(
                    f"--prompt-ids {text!r} is not a comma-separated list of ids"
                ) from None
            prompts.append(ids)
        labels = [f"--prompt-ids {t!r}" for t in args.prompt_ids]
    else:
        prompts = [model.encode(t) for t in args.prompt]
        labels = [f"--prompt {t!r}" for t in args.prompt]
    for ids, label in zip(prompts, labels, strict=True):
        if not ids:
            raise JaxparError(f"{label} is empty; give at least one token")
        model.check_ids(ids, label)
    return prompts


def cmd_generate(args: argparse.Namespace) -> int:
    sampling = _sampling(args)
    model = _load_model(args)
    import json

    prompts = _prompts(args, model)
    longest = max(len(p) for p in prompts)
    model.check_fits(longest, args.max_new_tokens)
    gen = model.generator(len(prompts), longest + args.max_new_tokens)
    out = gen.generate(
        prompts, args.max_new_tokens, sampling, seed=args.seed, stop_ids=model.stop_ids
    )
    texts = [model.decode(ids) for ids in out.new_ids]
    if args.json:
        doc = {
            "new_ids": out.new_ids,
            "text": texts,
            "time_to_first_token_s": out.prefill_s,
            "tokens_per_s": out.tokens_per_s,
            "compile_s": out.compile_s,
        }
        print(json.dumps(doc))
        return 0
    for prompt, text in zip(prompts, texts, strict=True):
        print(model.decode(prompt) + text)
        print("-" * 40)
    print(
        f"time to first token {out.prefill_s * 1e3:,.1f} ms, then {out.tokens_per_s:,.1f} "
        f"tokens/s per sequence x {len(prompts)} sequences (compile {out.compile_s:.1f}s)",
        file=sys.stderr,
    )
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    sampling = _sampling(args)
    model = _load_model(args)
    from jaxpar.infer.chat import Chat

    chat = Chat(model, args.max_new_tokens, sampling, seed=args.seed)
    print(f"chatting with {model.source}; an empty line or Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        chat.reply(line, on_text=lambda text: print(text, end="", flush=True))
        print()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    bad = [o for o in args.overrides if not o.startswith("serve.")]
    if bad:
        raise JaxparError(f"{bad[0]!r}: serve takes serve.* settings only (the model's come "
                          "from its folder)")  # fmt: skip
    load_config(None, args.overrides)  # refused before anything loads
    from jaxpar.infer.server import bind, serve

    sock = bind(args.host, args.port)
    model = _load_model(args)
    import jax

    if jax.process_count() > 1:
        raise JaxparError("jaxpar serve runs in one process (its mesh may span that process's "
                          "devices); multi-process serving is not supported")  # fmt: skip
    config = load_config(None, args.overrides, base=model.config).serve
    from jaxpar.infer.scheduler import Engine

    log = lambda msg: print(f"jaxpar: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    name = args.model_name or Path(args.run or args.init_from_hf).resolve().name
    engine = Engine(model, config)
    log(f"{model.source}: compiling the steps for {engine.slots} slots of {model.context} "
        f"tokens ({engine.generator.slot_bytes / 2**20:,.2f} MiB of cache per slot)")  # fmt: skip
    engine.start()
    serve(engine, name, sock, config.shutdown_s, log)
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from jaxpar.launch import launch

    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    return launch(argv, args.num_processes, args.devices_per_process, args.pin_cores)


def cmd_export_hf(args: argparse.Namespace) -> int:
    from jaxpar.infer.load import export_run

    dest = export_run(Path(args.out), Path(args.dest))
    print(f"wrote {dest}")
    return 0


COMMANDS = {
    "train": cmd_train,
    "checkpoints": cmd_checkpoints,
    "mesh": cmd_mesh,
    "shardings": cmd_shardings,
    "analyze": cmd_analyze,
    "bench": cmd_bench,
    "plan": cmd_plan,
    "eval": cmd_eval,
    "generate": cmd_generate,
    "chat": cmd_chat,
    "serve": cmd_serve,
    "export-hf": cmd_export_hf,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; bad input prints one line to stderr and returns 2."""
    try:
        args = build_parser().parse_args(argv)
        if args.command == "launch":
            return cmd_launch(args)
        from jaxpar.distributed import join

        join(*(getattr(args, k, None) for k in ("coordinator", "num_processes", "process_id")))
        return COMMANDS[args.command](args)
    except JaxparError as e:
        print(f"jaxpar: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jaxpar: interrupted", file=sys.stderr)
        return 130


def entry() -> NoReturn:
    sys.exit(main())
