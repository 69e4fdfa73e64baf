"""The `jaxpar` command: argument parsing, dispatch, and bad input turned into exit code 2.

JAX is imported only after the mesh spec is known, because the number of simulated CPU devices
has to be set before JAX starts.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from jaxpar.config import Config, load_config, validate_for_mesh
from jaxpar.errors import JaxparError
from jaxpar.mesh import MeshSpec, parse_mesh, prepare


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise JaxparError(f"{message} (see '{self.prog} --help')")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.yaml", help="YAML config; keys as in README")
    p.add_argument(
        "--mesh", metavar="SPEC", help="mesh like data=2,tensor=4 (overrides parallel.mesh)"
    )
    p.add_argument("--devices", type=int, metavar="N", help="simulate N CPU devices")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.steps=50")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxpar", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train a model (defaults: a small model on 8 CPU devices)")
    _add_config_args(p)
    p.add_argument("--out", metavar="DIR", help="run folder (default: a new folder under runs/)")
    _add_process_args(p)

    p = sub.add_parser("checkpoints", help="list a run's checkpoints")
    p.add_argument("out", metavar="OUT", help="the run folder")

    p = sub.add_parser("mesh", help="print a mesh: sizes, devices and groups")
    p.add_argument("spec", metavar="SPEC", help="e.g. data=2,pipeline=2,tensor=2")
    p.add_argument("--devices", type=int, metavar="N", help="simulate N CPU devices")

    p = sub.add_parser("shardings", help="print every parameter's layout on the mesh")
    _add_config_args(p)

    p = sub.add_parser(
        "analyze", help="compile the train step (run nothing): memory, FLOPs, collectives, bubble"
    )
    _add_config_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON document (keys in README)")
    p.add_argument("--timeline", metavar="FILE.png", help="draw the pipeline schedule to a PNG")

    p = sub.add_parser("bench", help="time train steps: median step time, tokens/s, MFU")
    _add_config_args(p)
    p.add_argument("--steps", type=int, default=10, metavar="N", help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=2, metavar="N", help="untimed steps first")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p = sub.add_parser("eval", help="negative log-likelihood and perplexity of a model on text")
    _add_model_args(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", metavar="FILE", help="a text file")
    source.add_argument("--tokens", metavar="FILE.npy", help="int token ids [batch, length]")
    p.add_argument("--batch", type=int, default=8, metavar="N", help="rows per forward pass")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("generate", help="generate text with a KV cache on the mesh")
    _add_model_args(p)
    _add_sampling_args(p)
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", metavar="TEXT", help="repeat for a batch")
    prompts.add_argument(
        "--prompt-ids", action="append", metavar="1,2,3", help="token ids; repeat for a batch"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("chat", help="talk to a model: each line you type is answered, streamed")
    _add_model_args(p)
    _add_sampling_args(p)

    p = sub.add_parser(
        "launch", help="run one jaxpar command as N local processes (CPU devices, gloo)"
    )
    p.add_argument(
        "-n", "--num-processes", type=int, required=True, metavar="N", help="processes to start"
    )
    p.add_argument(
        "--devices-per-process", type=int, metavar="K", help="simulated CPU devices per process"
    )
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")

    p = sub.add_parser("export-hf", help="write a run's newest checkpoint as a Hugging Face Llama")
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
    p.add_argument("--temperature", type=float, default=0.8, metavar="T")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="0: no limit")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus mass")
    p.add_argument("--seed", type=int, default=0)


def _config_and_mesh(args: argparse.Namespace) -> tuple[Config, MeshSpec]:
    """Loads the config, sets up the devices and checks the config against the resolved mesh."""
    overrides = list(args.overrides)
    if args.mesh is not None:
        overrides.append(f"parallel.mesh={args.mesh}")
    config = load_config(args.config, overrides)
    spec = prepare(parse_mesh(config.parallel.mesh), args.devices)
    validate_for_mesh(config, *spec.sizes)
    from jaxpar.train.step import compute_dtype

    resolved_dtype = compute_dtype(config.train.dtype).name
    return config.replace(**{"parallel.mesh": str(spec), "train.dtype": resolved_dtype}), spec


def _new_run_dir() -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = Path("runs") / stamp, 1
    while path.exists():
        n += 1
        path = Path("runs") / f"{stamp}-{n}"
    return path


def cmd_train(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else _new_run_dir()
    if out.exists() and not out.is_dir():
        raise JaxparError(f"--out {str(out)!r} is a file; give a folder")
    if (out / "metrics.jsonl").exists() and not (out / "checkpoints").is_dir():
        raise JaxparError(
            f"--out {str(out)!r} already holds a run without checkpoints to resume from; "
            "choose a new folder"
        )
    config, spec = _config_and_mesh(args)
    from rich.console import Console

    from jaxpar.distributed import current
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
    if summary.sample:
        console.print("\nsample:", style="bold")
        console.print(summary.sample, markup=False)
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
    config, spec = _config_and_mesh(args)
    from jaxpar.analysis.params import param_rows, tree_bytes_per_device
    from jaxpar.analysis.report import param_table
    from jaxpar.mesh import make_mesh
    from jaxpar.train.step import Trainer

    trainer = Trainer(config, make_mesh(spec))
    rows = param_rows(trainer.abstract_params, trainer.param_shardings)
    table = param_table(rows, f"parameters on mesh {spec}, rules '{trainer.rules.name}'")
    console = _wide_console()
    console.print(table)
    total = sum(r.bytes for r in rows)
    per_device = sum(r.bytes_per_device for r in rows)
    abstract = trainer.init_state_abstract()
    opt_bytes = tree_bytes_per_device(abstract.opt_state, trainer.state_shardings.opt_state)
    console.print(
        f"parameters: {config.model.num_params:,} ({total:,} bytes); per device {per_device:,} "
        f"bytes = total / {total / per_device:.2f}; optimizer state per device {opt_bytes:,} bytes"
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
    config, spec = _config_and_mesh(args)
    import json

    from jaxpar.analysis.report import analyze, render
    from jaxpar.analysis.timeline import ascii_timeline, plot_timelines
    from jaxpar.mesh import make_mesh
    from jaxpar.train.step import Trainer

    trainer = Trainer(config, make_mesh(spec))
    analysis = analyze(trainer)
    if timeline is not None:
        plot_timelines([trainer.schedule], timeline)
    if args.json:
        print(json.dumps(analysis.to_json(), indent=2))
        return 0
    console = _wide_console()
    render(analysis, console)
    console.print(f"\n[bold]pipeline timeline[/bold] ({trainer.schedule.describe()})")
    console.print(ascii_timeline(trainer.schedule), markup=False)
    if timeline is not None:
        console.print(f"timeline: {timeline}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise JaxparError(f"--steps {args.steps} must be at least 1")
    if args.warmup < 0:
        raise JaxparError(f"--warmup {args.warmup} must be 0 or more")
    config, spec = _config_and_mesh(args)
    import json

    from jaxpar.mesh import make_mesh
    from jaxpar.train.bench import bench
    from jaxpar.train.step import Trainer

    trainer = Trainer(config, make_mesh(spec))
    console = _wide_console()
    log = console.print if not args.json else lambda *a, **k: None
    m = config.model
    log(
        f"bench: {m.num_params / 1e6:.1f}M params on mesh {spec} ({trainer.dtype.name}), "
        f"batch {config.train.batch_size} x {config.train.seq_len}, {args.warmup} warm-up + "
        f"{args.steps} timed steps"
    )
    result = bench(
        trainer,
        args.steps,
        args.warmup,
        progress=lambda i, dt: log(f"  step {i + 1}/{args.steps}: {dt * 1e3:,.1f} ms"),
    )
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    mfu = (
        f"MFU {result.mfu:.1%} of {result.peak_flops_per_device / 1e12:,.0f} TFLOP/s peak"
        if result.mfu is not None
        else f"MFU: no known peak for '{result.device_kind}'"
    )
    log(
        f"median step {result.median_step_s * 1e3:,.1f} ms, {result.tokens_per_s:,.0f} tokens/s, "
        f"compile {result.compile_s:.1f}s; {result.achieved_flops_per_device / 1e12:,.3f} "
        f"model TFLOP/s per device; {mfu}; loss {result.first_loss:.4f} -> {result.last_loss:.4f}"
    )
    return 0


def _load_model(args: argparse.Namespace):
    """The model named by --run or --init-from-hf, on the mesh of --mesh."""
    source = Path(args.run or args.init_from_hf)
    flag = "--run" if args.run else "--init-from-hf"
    if not source.is_dir():
        raise JaxparError(f"{flag} {str(source)!r} is not a directory")
    spec = prepare(parse_mesh(args.mesh), args.devices)
    from jaxpar.infer.serve import load_hf, load_run
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
    if not args.greedy and args.temperature <= 0:
        raise JaxparError(f"--temperature {args.temperature} must be > 0 (or use --greedy)")
    if args.top_k < 0:
        raise JaxparError(f"--top-k {args.top_k} must be 0 (no limit) or more")
    if not 0 < args.top_p <= 1:
        raise JaxparError(f"--top-p {args.top_p} must be in (0, 1]")
    temperature = 0.0 if args.greedy else args.temperature
    return Sampling(temperature, args.top_k, args.top_p)


def cmd_eval(args: argparse.Namespace) -> int:
    if args.batch < 1:
        raise JaxparError(f"--batch {args.batch} must be at least 1")
    path = Path(args.text or args.tokens)
    if not path.is_file():
        raise JaxparError(f"{'--text' if args.text else '--tokens'} {str(path)!r} does not exist")
    model = _load_model(args)
    import json

    import numpy as np

    from jaxpar.infer.serve import text_rows

    if args.text:
        ids = model.encode(path.read_text(errors="replace"))
        model.check_ids(ids, f"--text {str(path)!r}")
        rows = text_rows(ids, model.context)
    else:
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise JaxparError(f"--tokens {str(path)!r} is not a .npy array: {e}") from None
        if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
            raise JaxparError(
                f"--tokens {str(path)!r} holds a {array.dtype} array of shape {array.shape}; "
                "expected integers [batch, length]"
            )
        model.check_ids(array.ravel().tolist(), f"--tokens {str(path)!r}")
        rows = [row.astype(np.int32) for row in array]
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


def _check_length(model, prompt_len: int, new_tokens: int) -> None:
    if prompt_len + new_tokens > model.context:
        raise JaxparError(
            f"prompt of {prompt_len} tokens + --max-new-tokens {new_tokens} exceeds the model's "
            f"context of {model.context} tokens"
        )


def cmd_generate(args: argparse.Namespace) -> int:
    sampling = _sampling(args)
    model = _load_model(args)
    import json

    prompts = _prompts(args, model)
    longest = max(len(p) for p in prompts)
    _check_length(model, longest, args.max_new_tokens)
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

    _check_length(model, 1, args.max_new_tokens)
    gen = model.generator(1, model.context)
    keep = model.context - args.max_new_tokens  # the newest history that fits with the reply
    print(f"chatting with {model.source}; an empty line or Ctrl-D ends", file=sys.stderr)
    history: list[int] = []
    turn = 0
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        history = (history + model.encode(line + "\n"))[-keep:]
        model.check_ids(history, "the conversation")
        show = model.stream_decoder()

        def stream(step_ids: list[int | None], show=show) -> None:
            if step_ids[0] is not None and step_ids[0] not in model.stop_ids:
                print(show([step_ids[0]]), end="", flush=True)

        out = gen.generate(
            [history], args.max_new_tokens, sampling, seed=args.seed + turn,
            stop_ids=model.stop_ids, on_tokens=stream,
        )  # fmt: skip
        print()
        reply = [i for i in out.new_ids[0] if i not in model.stop_ids]
        history = (history + reply)[-keep:]
        turn += 1
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from jaxpar.launch import launch

    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    return launch(argv, args.num_processes, args.devices_per_process)


def cmd_export_hf(args: argparse.Namespace) -> int:
    from jaxpar.interop.hf import export_run

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
    "eval": cmd_eval,
    "generate": cmd_generate,
    "chat": cmd_chat,
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
