"""The parser of `jaxpar` and its commands: each argument shared by several commands is defined
once, each command's arguments in one function, and `HELP` is the text `jaxpar --help` shows."""

from __future__ import annotations

import argparse
from typing import NoReturn

from jaxpar import __version__
from jaxpar.cli.devices import SIMULATED
from jaxpar.errors import JaxparError

HELP = """jaxpar: train and serve a Llama-style transformer split over a mesh of devices.

The mesh has three axes: data (data parallelism, FSDP), pipeline (pipeline stages) and tensor
(Megatron tensor parallelism), written like --mesh data=2,pipeline=2,tensor=2. On a CPU host the
devices a mesh needs are simulated. train, shardings, analyze, bench and plan take dotted config
overrides (train.steps=50); serve takes serve.* keys only. Bad input ends with one line and exit
code 2.

commands:
  train        train a model (defaults: a small model on 8 simulated CPU devices)
  checkpoints  list a run's checkpoints
  report       summarise runs: steps, losses, tokens/s, MFU, goodput (--plot: the losses as a PNG)
  mesh         print a mesh: sizes, devices and groups
  shardings    print every parameter's layout on the mesh
  analyze      compile the train step without running it: memory, FLOPs, collectives, bubble
  bench        time train steps: median step time, tokens/s, MFU and HFU (--stages: each
               pipeline stage alone, and the split that evens them out)
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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise JaxparError(f"{message} (see '{self.prog} --help')")


# -- arguments shared by several commands, each defined once -------------------------------------


def _add_config_file(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", metavar="FILE.yaml", help="YAML config; keys as in docs/configuration.md"
    )


def _add_overrides(p: argparse.ArgumentParser, example: str = "e.g. train.steps=50") -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=example)


def _add_devices(p: argparse.ArgumentParser, help: str = "simulate N CPU devices") -> None:
    p.add_argument("--devices", type=int, metavar="N", help=help)


def _add_json(p: argparse.ArgumentParser, help: str = "print one JSON document") -> None:
    p.add_argument("--json", action="store_true", help=help)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    """A config to build and place: --config, --mesh, --devices and KEY=VALUE overrides."""
    _add_config_file(p)
    p.add_argument(
        "--mesh",
        metavar="SPEC",
        help="mesh like data=2,tensor=4 (overrides parallel.mesh); "
        "'auto': the planner's best layout for the devices present",
    )
    _add_devices(p)
    _add_overrides(p)


def _add_process_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "multi-process jobs (SLURM, Open MPI and Cloud TPU are detected without these)"
    )
    g.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address")
    g.add_argument("--num-processes", type=int, metavar="N", help="processes in the job")
    g.add_argument("--process-id", type=int, metavar="I", help="this process, 0 to N-1")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """A trained model to load (--run or --init-from-hf) and the mesh to load it onto."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", metavar="OUT", help="a jaxpar run folder (its newest checkpoint)")
    source.add_argument("--init-from-hf", metavar="DIR", help="a local Hugging Face Llama folder")
    p.add_argument("--mesh", default="data=1", metavar="SPEC", help="mesh (default data=1)")
    _add_devices(p)
    p.add_argument(
        "--dtype", default="auto", choices=("auto", "float32", "bfloat16"), help="compute dtype"
    )


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    p.add_argument("--greedy", action="store_true", help="always the most likely token")
    p.add_argument("--temperature", type=float, metavar="T",
                   help="default: jaxpar.infer.sampling.DEFAULT_TEMPERATURE")  # fmt: skip
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="0: no limit")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus mass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decode-steps", type=int, default=8, metavar="N", help="tokens decoded per "
                   "dispatch, on the device without the host between them (default 8)")  # fmt: skip
    p.add_argument("--speculative", default="", metavar="SPEC", help="speculative decoding: "
                   "ngram:K (drafts looked up in the prompt and output) or draft:PATH:K (a "
                   "smaller model's, a run or Hugging Face folder), K drafts a pass")  # fmt: skip


# -- each command's arguments ----------------------------------------------------------------------


def _train_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--out", metavar="DIR", help="run folder (default: a new folder under runs/)")
    _add_process_args(p)


def _checkpoints_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", metavar="OUT", help="the run folder")


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("outs", nargs="+", metavar="OUT", help="run folders (the --out of jaxpar train)")
    p.add_argument("--plot", metavar="FILE.png", help="draw the training and held-out losses of "
                   "the runs to a new PNG")  # fmt: skip


def _mesh_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", metavar="SPEC", help="e.g. data=2,pipeline=2,tensor=2")
    _add_devices(p)


def _analyze_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    _add_json(p, "print one JSON document (keys in docs/analysis.md)")
    p.add_argument("--timeline", metavar="FILE.png", help="draw the pipeline schedule to a PNG")


def _bench_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--steps", type=int, default=10, metavar="N", help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=2, metavar="N", help="untimed steps first")
    p.add_argument("--stages", action="store_true", help="time each pipeline stage's layers "
                   "alone on its own devices (--steps runs each) and propose a split")  # fmt: skip
    _add_json(p)


def _plan_args(p: argparse.ArgumentParser) -> None:
    _add_config_file(p)
    _add_devices(p, f"devices to plan for (default: those present; on CPU, {SIMULATED} simulated)")
    p.add_argument("--hardware", metavar="NAME|FILE", help="profile: h100-sxm, h200, a100-80g, "
                   "tpu-v5e, cpu, or a YAML file (default: the devices present)")  # fmt: skip
    p.add_argument("--top", type=int, default=5, metavar="K", help="rows to show and to compile "
                   "(default 5)")  # fmt: skip
    p.add_argument("--no-compile", action="store_true", help="rank by the cost model alone")
    _add_json(p, 'print {"candidates": [...]}, best first')
    p.add_argument("--write", metavar="FILE.yaml", help="write the best layout's config (with "
                   "--calibrate: the measured profile)")  # fmt: skip
    p.add_argument("--calibrate", action="store_true", help="measure the devices present and "
                   "write their hardware profile")  # fmt: skip
    _add_overrides(p, "e.g. train.batch_size=64")


def _eval_args(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", metavar="FILE", help="a text file")
    source.add_argument("--tokens", metavar="FILE.npy", help="int token ids [batch, length]")
    p.add_argument("--batch", type=int, default=8, metavar="N", help="rows per forward pass")
    _add_json(p, "print one JSON object")


def _generate_args(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    _add_sampling_args(p)
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", metavar="TEXT", help="repeat for a batch")
    prompts.add_argument(
        "--prompt-ids", action="append", metavar="1,2,3", help="token ids; repeat for a batch"
    )
    _add_json(p, "print one JSON object")


def _chat_args(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    _add_sampling_args(p)


def _serve_args(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free one)")
    p.add_argument("--model-name", metavar="NAME", help="the served model's id (default: the "
                   "folder's name)")  # fmt: skip
    _add_overrides(p, "serve.* keys, e.g. serve.max_seqs=16")


def _launch_args(p: argparse.ArgumentParser) -> None:
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


def _export_hf_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", metavar="OUT", help="the jaxpar run folder")
    p.add_argument("dest", metavar="DIR", help="a new folder for config.json and safetensors")


# Each command's arguments, in the order `jaxpar --help` lists the commands.
_ARGUMENTS = {
    "train": _train_args,
    "checkpoints": _checkpoints_args,
    "report": _report_args,
    "mesh": _mesh_args,
    "shardings": _add_config_args,
    "analyze": _analyze_args,
    "bench": _bench_args,
    "plan": _plan_args,
    "eval": _eval_args,
    "generate": _generate_args,
    "chat": _chat_args,
    "serve": _serve_args,
    "launch": _launch_args,
    "export-hf": _export_hf_args,
}

# Each command's one-line description, as `HELP` lists it (one source for both `jaxpar --help`
# and `jaxpar COMMAND --help`).
_DESCRIPTIONS = dict(
    line.strip().split(None, 1)
    for line in HELP.split("commands:\n", 1)[1].split("\n\n", 1)[0].splitlines()
)


def build_parser() -> argparse.ArgumentParser:
    """The parser of `jaxpar` and its commands (`_ARGUMENTS`)."""
    parser = _Parser(
        prog="jaxpar", description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"jaxpar {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, parser_class=_Parser, metavar="command",
        help="one of the commands above; 'jaxpar COMMAND --help' describes its options",
    )  # fmt: skip
    for name, add_arguments in _ARGUMENTS.items():
        add_arguments(sub.add_parser(name, description=f"jaxpar {name}: {_DESCRIPTIONS[name]}"))
    return parser
