"""The training loop: data, the compiled step, metrics, progress, and a closing text sample."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from jaxpar.config import Config, dump_yaml
from jaxpar.data import Corpus, global_batch
from jaxpar.infer.sample import generate
from jaxpar.mesh import mesh_spec_of
from jaxpar.train.step import Trainer


@dataclass(frozen=True)
class Summary:
    steps: int
    first_loss: float
    last_loss: float
    tokens_per_s: float
    compile_s: float
    train_s: float
    sample: str


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tps]:,.0f} tok/s"),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
    )


def train(config: Config, mesh: jax.sharding.Mesh, out: Path, console: Console) -> Summary:
    """Trains `config` on `mesh`, writing `out/config.yaml` and `out/metrics.jsonl`.

    The caller has validated the config against the mesh and made sure `out` holds no run.
    """
    t = config.train
    corpus = Corpus.from_glob(config.data.path)
    corpus.check_fits(t.seq_len)
    trainer = Trainer(config, mesh)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_yaml(config))

    m = config.model
    console.print(
        f"model: {m.num_params / 1e6:.2f}M params ({m.layers} layers, dim {m.dim}, "
        f"{m.heads} heads / {m.kv_heads} kv), {trainer.dtype.name} compute"
    )
    console.print(
        f"mesh: {mesh_spec_of(mesh)} on {mesh.devices.size} {jax.default_backend()} devices, "
        f"rules '{trainer.rules.name}'; data: {corpus.files} files, {len(corpus.tokens):,} bytes"
    )
    state = trainer.init_state()
    step_fn, compile_s = trainer.compile()
    console.print(f"compiled the train step in {compile_s:.1f}s")
    overhead = trainer.compute_overhead()
    console.print(
        f"pipeline: {trainer.schedule.describe()}; {trainer.layout.imbalance()}\n"
        f"compute: {overhead.flops_per_device / 1e9:.3f} GFLOP per device per step = "
        f"{overhead.ratio:.3f} x ideal; overhead {overhead.bubble:.1%} of the step, "
        f"{overhead.stack_bubble:.1%} of the layer stack (theoretical bubble "
        f"{trainer.schedule.bubble:.1%})"
    )

    shape = trainer.batch_shape()
    tokens_per_step = t.batch_size * t.seq_len
    losses, times = [], []
    log_every = max(1, t.steps // 10)
    start = time.perf_counter()
    with (out / "metrics.jsonl").open("w") as metrics_file, _progress(console) as progress:
        task = progress.add_task("train", total=t.steps, loss=float("nan"), tps=0.0)
        for step in range(t.steps):
            batch = global_batch(corpus, t.seed, step, shape, trainer.batch_sharding)
            t0 = time.perf_counter()
            state, metrics = step_fn(state, batch)
            metrics = jax.device_get(metrics)  # waits for the step's results
            dt = time.perf_counter() - t0
            row = {
                "step": step,
                "loss": float(metrics["loss"]),
                "lr": float(metrics["lr"]),
                "grad_norm": float(metrics["grad_norm"]),
                "step_time_s": dt,
                "tokens_per_s": tokens_per_step / dt,
            }
            metrics_file.write(json.dumps(row) + "\n")
            losses.append(row["loss"])
            times.append(dt)
            progress.update(task, advance=1, loss=row["loss"], tps=row["tokens_per_s"])
            if not console.is_terminal and (step % log_every == 0 or step == t.steps - 1):
                console.print(
                    f"step {step:>5}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
                    f"grad_norm {row['grad_norm']:.3f}  {row['tokens_per_s']:,.0f} tok/s"
                )
    train_s = time.perf_counter() - start

    sample = ""
    if t.sample_tokens:
        prompt = np.frombuffer(t.sample_prompt.encode(), dtype=np.uint8).astype(np.int32)
        spec = mesh_spec_of(mesh)
        rows = spec.data * spec.pipeline  # the batch is split over both outside the layers
        with jax.set_mesh(mesh):
            ids = generate(
                trainer.graphdef, state.params, np.tile(prompt, (rows, 1)), t.sample_tokens,
                t.seq_len, seed=t.seed, dtype=trainer.dtype,
            )  # fmt: skip
        text = bytes(np.asarray(ids[0], dtype=np.uint8)).decode("utf-8", errors="replace")
        sample = t.sample_prompt + text
    # Step 0 waits for nothing in flight; later steps show the steady state.
    steady = times[1:] or times
    return Summary(
        steps=t.steps,
        first_loss=losses[0],
        last_loss=losses[-1],
        tokens_per_s=tokens_per_step * len(steady) / sum(steady),
        compile_s=compile_s,
        train_s=train_s,
        sample=sample,
    )
