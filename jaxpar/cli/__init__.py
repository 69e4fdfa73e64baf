"""The `jaxpar` command line: `main` parses the arguments (`parser`), joins a multi-process job
and runs the command (`train` and `infer` hold the two wings' commands), and maps bad input to one
line and exit code 2. `jaxpar --help` shows `parser.HELP`.

JAX is imported only after the mesh spec is known, because the number of simulated CPU devices
has to be set before JAX starts: the commands import the library lazily, inside their functions.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

from jaxpar.cli import infer, train
from jaxpar.cli.parser import build_parser
from jaxpar.errors import JaxparError

__all__ = ["COMMANDS", "build_parser", "entry", "main"]


def cmd_launch(args: argparse.Namespace) -> int:
    """`jaxpar launch`: runs the command after `--` as N local processes of one job."""
    from jaxpar.launch import launch

    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    return launch(argv, args.num_processes, args.devices_per_process, args.pin_cores)


# Each command but launch, which runs before the job is joined (it starts the job's processes).
COMMANDS = {
    "train": train.cmd_train,
    "checkpoints": train.cmd_checkpoints,
    "report": train.cmd_report,
    "mesh": train.cmd_mesh,
    "shardings": train.cmd_shardings,
    "analyze": train.cmd_analyze,
    "bench": train.cmd_bench,
    "plan": train.cmd_plan,
    "eval": infer.cmd_eval,
    "generate": infer.cmd_generate,
    "chat": infer.cmd_chat,
    "serve": infer.cmd_serve,
    "export-hf": infer.cmd_export_hf,
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
    """The console script `jaxpar` and `python -m jaxpar`: exits with `main`'s code.

    A process of a multi-process job that fails leaves at once: a normal exit would first wait
    for every other process in `jax.distributed`'s shutdown, and they may never come (they wait
    for this one in a collective, or at start for its devices). Its exit is what ends the job:
    `launch` stops the others, and JAX's heartbeats end them on real hosts."""
    from jaxpar.distributed import current

    try:
        code = main()
    except BaseException:
        if current().count == 1:
            raise
        traceback.print_exc()
        code = 1
    if code and current().count > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
