"""The serving wing's commands: eval, generate, chat, serve and export-hf.

Each command checks its arguments and the model's folder before JAX starts, sets up the mesh's
devices (`jaxpar.cli.devices`), and imports the library inside the function afterwards."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jaxpar.cli.devices import prepare_devices
from jaxpar.config import load_config
from jaxpar.errors import JaxparError
from jaxpar.mesh import parse_mesh


def _load_model(args: argparse.Namespace, text: bool = True):
    """The model named by --run or --init-from-hf, on the mesh of --mesh; with `text`, one
    whose ids can be read as text."""
    source = Path(args.run or args.init_from_hf)
    if not source.is_dir():  # before JAX starts: the mesh comes next
        flag = "--run" if args.run else "--init-from-hf"
        raise JaxparError(f"{flag} {str(source)!r} is not a directory")
    if text and args.init_from_hf:
        from jaxpar.interop.hf_config import no_tokenizer, read_hf_config

        if problem := no_tokenizer(source, read_hf_config(source)[0].vocab):
            raise JaxparError(problem)
    spec = prepare_devices(parse_mesh(args.mesh), args.devices)
    from jaxpar.infer.load import load_hf, load_run
    from jaxpar.mesh import make_mesh

    mesh = make_mesh(spec)
    warn = lambda msg: print(f"jaxpar: {msg}", file=sys.stderr)  # noqa: E731
    if args.run:
        return load_run(source, mesh, args.dtype, warn=warn)
    return load_hf(source, mesh, args.dtype)


def _sampling(args: argparse.Namespace):
    from jaxpar.infer.sampling import Sampling

    if args.max_new_tokens < 1:
        raise JaxparError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    if not args.greedy and args.temperature is not None and args.temperature <= 0:
        raise JaxparError(f"--temperature {args.temperature} must be > 0 (or use --greedy)")
    if args.top_k < 0:
        raise JaxparError(f"--top-k {args.top_k} must be 0 (no limit) or more")
    if not 0 < args.top_p <= 1:
        raise JaxparError(f"--top-p {args.top_p} must be in (0, 1]")
    if args.decode_steps < 1:
        raise JaxparError(f"--decode-steps {args.decode_steps} must be at least 1")
    if args.greedy or args.temperature is not None:
        return Sampling(0.0 if args.greedy else args.temperature, args.top_k, args.top_p)
    return Sampling(top_k=args.top_k, top_p=args.top_p)  # the default temperature


def cmd_eval(args: argparse.Namespace) -> int:
    """`jaxpar eval`: a model's negative log-likelihood and perplexity on --text or --tokens."""
    if args.batch < 1:
        raise JaxparError(f"--batch {args.batch} must be at least 1")
    path = Path(args.text or args.tokens)
    if not path.is_file():
        raise JaxparError(f"{'--text' if args.text else '--tokens'} {str(path)!r} does not exist")
    model = _load_model(args, text=bool(args.text))
    import json

    from jaxpar.infer.evaluate import evaluate, read_token_rows, text_rows

    if args.text:
        ids = model.encode(path.read_text(errors="replace"))
        model.check_ids(ids, f"--text {str(path)!r}")
        rows = text_rows(ids, model.context)
    else:
        rows = read_token_rows(path, model)
    result = evaluate(model, rows, args.batch)
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


def _speculation(args: argparse.Namespace):
    from jaxpar.infer.speculate import Speculation

    return Speculation.parse(args.speculative)


def cmd_generate(args: argparse.Namespace) -> int:
    """`jaxpar generate`: continues each prompt; the text, or with --json ids and timings."""
    sampling, speculation = _sampling(args), _speculation(args)
    model = _load_model(args, text=not args.prompt_ids)
    import json

    from jaxpar.infer.load import make_drafter

    prompts = _prompts(args, model)
    longest = max(len(p) for p in prompts)
    model.check_fits(longest, args.max_new_tokens)
    gen = model.generator(len(prompts), longest + args.max_new_tokens)
    drafter = make_drafter(speculation, model, gen.rows, gen.max_len, args.dtype)
    print(f"jaxpar: {gen.cache_summary()}", file=sys.stderr)
    out = gen.generate(prompts, args.max_new_tokens, sampling, seed=args.seed,
                       stop_ids=model.stop_ids, steps=args.decode_steps,
                       drafter=drafter)  # fmt: skip
    # (a model without a tokenizer for its ids, given --prompt-ids: the ids only)
    texts = None if model.unreadable else [model.decode(ids) for ids in out.new_ids]
    if args.json:
        doc = {
            "new_ids": out.new_ids,
            "text": texts,
            "time_to_first_token_s": out.prefill_s,
            "tokens_per_s": out.tokens_per_s,
            "compile_s": out.compile_s,
            "speculation": {"passes": out.passes, "drafted": out.drafted,
                            "accepted": out.accepted} if drafter else None,
        }  # fmt: skip
        print(json.dumps(doc))
        return 0
    for prompt, new, text in zip(prompts, out.new_ids, texts or out.new_ids, strict=True):
        print(f"{prompt} + {new}" if texts is None else model.decode(prompt) + text)
        print("-" * 40)
    print(
        f"time to first token {out.prefill_s * 1e3:,.1f} ms, then {out.tokens_per_s:,.1f} "
        f"tokens/s per sequence x {len(prompts)} sequences (compile {out.compile_s:.1f}s)",
        file=sys.stderr,
    )
    if drafter:
        print(f"speculation: {out.accepted:,} of {out.drafted:,} drafted tokens kept, "
              f"{sum(map(len, out.new_ids)) / max(out.passes, 1):.2f} tokens a target pass",
              file=sys.stderr)  # fmt: skip
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """`jaxpar chat`: a chat in the terminal."""
    sampling, speculation = _sampling(args), _speculation(args)
    model = _load_model(args)
    from jaxpar.infer.chat import Chat, chat_in_terminal

    chat = Chat(model, args.max_new_tokens, sampling, seed=args.seed, steps=args.decode_steps,
                speculation=speculation, dtype=args.dtype)  # fmt: skip
    print(f"jaxpar: {chat.generator.cache_summary()}", file=sys.stderr)
    print(f"chatting with {model.source}; an empty line or Ctrl-D ends", file=sys.stderr)
    chat_in_terminal(chat)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """`jaxpar serve`: the OpenAI-compatible server, until SIGTERM or Ctrl-C."""
    bad = [o for o in args.overrides if not o.startswith("serve.")]
    if bad:
        raise JaxparError(f"{bad[0]!r}: serve takes serve.* settings only (the model's come "
                          "from its folder)")  # fmt: skip
    settings = load_config(None, args.overrides).serve  # refused before anything loads
    from jaxpar.infer.speculate import Speculation

    Speculation.parse(settings.speculative, "serve.speculative")
    from jaxpar.distributed import current
    from jaxpar.infer.access import check_tls, read_access
    from jaxpar.infer.server import bind, serve

    log = lambda msg: print(f"jaxpar: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    # Process 0 of a multi-process job serves HTTP; the others follow its steps.
    primary = current().primary
    if primary:
        access = read_access(settings, warn=log)
        check_tls(settings)
        sock = bind(args.host, args.port)
    model = _load_model(args)
    config = load_config(None, args.overrides, base=model.config).serve
    from jaxpar.infer.scheduler import Engine

    name = args.model_name or Path(args.run or args.init_from_hf).resolve().name
    engine = Engine(model, config)
    if not primary:
        engine.follow()
        return 0
    log(f"{model.source}: compiling the steps for {engine.slots} slots of up to {model.context} "
        f"tokens")  # fmt: skip
    log(engine.generator.cache_summary())
    engine.start()
    serve(engine, name, sock, access, log)
    if engine.failed:
        log(f"stopped: a step failed in lockstep with the other processes ({engine.failed})")
        return 1
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    """`jaxpar export-hf`: writes a run's newest checkpoint as a Hugging Face folder."""
    from jaxpar.infer.export import export_run

    dest = export_run(Path(args.out), Path(args.dest))
    print(f"wrote {dest}")
    return 0
