"""Typed configuration: frozen dataclasses, loaded from YAML plus dotted `key=value` overrides.

This module does not import jax, so the CLI can read and validate a config (and decide how many
CPU devices to simulate) before JAX initialises its backend.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from jaxpar.errors import JaxparError, type_error, typed
from jaxpar.schedule_rules import SCHEDULES as SCHEDULES  # re-exported: the config's valid names
from jaxpar.schedule_rules import (
    check_schedule_counts,
    check_schedule_stages,
    check_schedule_tick,
)

if TYPE_CHECKING:
    from jaxpar.mesh import MeshSpec

DTYPES = ("auto", "float32", "bfloat16", "float16")
OPT_DTYPES = ("float32", "bfloat16")
REMAT = ("none", "full", "dots", "dots_no_batch", "dots_no_batch_attn")
ATTENTION = ("auto", "xla", "dot_product")
CONTEXT_ATTENTION = ("ring", "all_gather")
STAGE_SPLITS = ("balanced", "auto")
OPEN_METRICS = ("loopback", "all", "none")
TRACKERS = ("jsonl", "tensorboard", "wandb")
# Keys whose values are lists, kept as canonical text ("[3, 3, 1, 1]") so that a config stays
# hashable and reads back from YAML as it was written; each with its element type.
# The words each also takes.
_LIST_KEYS = {
    "pipeline.stage_layers": (int, STAGE_SPLITS),
    "parallel.stage_speeds": (float, ()),
    "train.fault_nan_steps": (int, ()),
}


def parse_list(key: str, text: str, kind: type) -> tuple:
    """A list value's text ("[3, 3, 1, 1]", "3,3,1,1" or "") as a tuple of `kind`, each positive.

    Raises:
        JaxparError: an entry that is not a positive `kind`; the message names the key.
    """
    items = [item.strip() for item in text.strip().strip("[]").split(",") if item.strip()]
    try:
        values = tuple(kind(item) for item in items)
    except ValueError:
        values = ()
    if len(values) != len(items) or not all(math.isfinite(x) and x > 0 for x in values):
        what = "integers" if kind is int else "numbers"
        raise JaxparError(f"config key {key!r} must be a list of positive {what}, got {text!r}")
    return values


def _list_text(key: str, value: Any) -> str:
    """The canonical text of a list key's value (a list, a tuple, its text or one of its words)."""
    kind, words = _LIST_KEYS[key]
    if isinstance(value, str) and value.strip() in (*words, ""):
        if not value.strip() and words:
            raise JaxparError(f"config key {key!r} must be {', '.join(words)} or a list")
        return value.strip()
    if isinstance(value, (list, tuple)):
        value = ",".join(str(typed(x, kind, f"an entry of config key {key!r}")) for x in value)
    values = parse_list(key, typed(value, str, f"config key {key!r}"), kind)
    return "[" + ", ".join(str(x) for x in values) + "]"


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-style decoder. Sizes are global (before any sharding)."""

    layers: int = 4
    dim: int = 256
    heads: int = 8
    kv_heads: int = 4
    mlp_dim: int = 768
    vocab: int = 256
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    # How attention is computed (`jaxpar.model.attention`): auto (cuDNN's fused kernel on GPUs
    # where it works, else xla), xla (jaxpar's einsums) or dot_product (jax.nn's kernel).
    attention: str = "auto"
    # Recompute activations in the backward pass, per layer (a checkpoint around each layer in
    # the layer scan, on every mesh): none, full, or a saving policy (dots: keep matmul outputs;
    # dots_no_batch: keep only weight-like matmul outputs; dots_no_batch_attn: those and the
    # attention output). `jaxpar.model.remat` lists what each keeps.
    remat: str = "none"
    # On a mesh with a `context` axis (`jaxpar.model.context`): how attention reaches the other
    # pieces' keys (ring: passed round by ppermute; all_gather: gathered whole), and whether the
    # sequence is laid out so that causal attention costs every piece the same.
    context_attention: str = "ring"
    context_load_balance: bool = True
    # Attention over more queries than this (on the XLA path) runs this many at a time, reading
    # only the keys they see: no (sequence x sequence) score matrix. 0: all at once.
    attention_block: int = 1024

    @property
    def architecture(self) -> dict[str, Any]:
        """The fields that fix the function the model computes: what a checkpoint or a Hugging
        Face folder must match (how it is computed, e.g. `attention`, may differ)."""
        return architecture(dataclasses.asdict(self))

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def num_params(self) -> int:
        """Parameter count, embeddings and LM head included."""
        d, f, v = self.dim, self.mlp_dim, self.vocab
        attn = d * self.heads * self.head_dim * 2 + d * self.kv_heads * self.head_dim * 2
        block = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_embeddings else d * v
        return v * d + self.layers * block + d + head


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation loop. `batch_size` is global: the sum over data-parallel replicas."""

    steps: int = 150
    seed: int = 0
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup_steps: int = 15
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0
    # "auto": float32 on CPU, bfloat16 on GPU/TPU. Parameters always stay float32.
    dtype: str = "auto"
    # Adam's moments as stored between steps (each update computes in float32): bfloat16 halves
    # the optimizer state's memory and the bytes an update reads and writes.
    opt_dtype: str = "float32"
    sample_tokens: int = 120  # the closing sample, with the prompt, fills at most seq_len
    sample_prompt: str = "def "
    # A step whose loss or gradient is not finite is skipped (state unchanged); this many in a
    # row abort the run, leaving the last good checkpoint in place.
    max_bad_steps: int = 3
    # Every this many steps (0: never) time each pipeline stage's layers on its own devices and,
    # when the slowest stage is more than `rebalance_threshold` above what the best split would
    # give (twice in a row), move the layers to that split (`jaxpar.train.balance`).
    rebalance_every: int = 0
    rebalance_threshold: float = 0.1
    # Where each step's scalars go besides OUT/metrics.jsonl, which is always written: a comma-
    # separated list of jsonl (that file alone), tensorboard (event files under OUT/tensorboard/)
    # and wandb (Weights & Biases, the `wandb` extra; WANDB_MODE=offline needs no network).
    tracker: str = "tensorboard"
    # The loss on `eval_batches` held-out batches (`data.eval_path` or `data.eval_fraction`)
    # every this many steps and after the last, on the same mesh, with no gradient.
    eval_every: int = 50
    eval_batches: int = 4
    # No step finished for this long ends the run, after every process has written its threads'
    # stacks to OUT/stacks/ (`jaxpar.train.watchdog`). 0: 20 x the slowest step so far, at least
    # 300 s; the first step, saves and evaluations (which may compile) get at least that much.
    hang_timeout_s: float = 0.0
    # Every this many steps each process's own time per step (its host's work: building its
    # batch) is gathered; one above the median by more than `straggler_threshold`, three checks
    # in a row, is reported once. (Multi-process runs only.)
    straggler_every: int = 10
    straggler_threshold: float = 0.5
    # Fault injection, for tests: a non-finite loss at these steps; process `fault_process` (-1:
    # every process) hangs before step `fault_hang_step` (-1: never) and sleeps `fault_slow_s`
    # more per step.
    fault_nan_steps: str = ""
    fault_hang_step: int = -1
    fault_slow_s: float = 0.0
    fault_process: int = -1

    @property
    def trackers(self) -> tuple[str, ...]:
        """`tracker` as names, each once, in the order given."""
        return tuple(dict.fromkeys(n.strip() for n in self.tracker.split(",") if n.strip()))

    @property
    def nan_steps(self) -> tuple[int, ...]:
        return parse_list("train.fault_nan_steps", self.fault_nan_steps, int)


@dataclass(frozen=True)
class DataConfig:
    """A glob of local text files; `{stdlib}` expands to the Python standard library's folder."""

    path: str = "{stdlib}/*.py"
    # Held-out text for `train.eval_every`: a glob of files, or this share of `path`'s bytes (its
    # end, then left out of training). Neither: no held-out loss.
    eval_path: str = ""
    eval_fraction: float = 0.0


@dataclass(frozen=True)
class ParallelConfig:
    """How the model is laid out: the mesh spec (`auto`: the planner's best layout for the devices
    present, `jaxpar.plan`), whether to shard parameters over `data` too, and the hardware profile
    `auto` plans for (`auto`: the profile of the devices' kind)."""

    mesh: str = "data=2,tensor=4"
    fsdp: bool = False
    hardware: str = "auto"
    # Relative speed of each pipeline stage's devices, e.g. [1, 1, 0.5, 1] for a stage on slower
    # or shared devices ("": all equal): `pipeline.stage_layers=auto` gives a slow stage fewer
    # layers.
    stage_speeds: str = ""

    @property
    def speeds(self) -> tuple[float, ...] | None:
        """`stage_speeds` as numbers, None when not given."""
        return parse_list("parallel.stage_speeds", self.stage_speeds, float) or None


@dataclass(frozen=True)
class CheckpointConfig:
    """Asynchronous orbax checkpoints under OUT/checkpoints/; `every=0` saves only at the end."""

    every: int = 50
    keep: int = 3


@dataclass(frozen=True)
class PipelineConfig:
    """How the layer stack runs over the `pipeline` mesh axis (and micro-batching on any mesh).

    With pipeline=1 the micro-batches run one after another: gradient accumulation.
    """

    schedule: str = "gpipe"
    microbatches: int = 1
    # Chunks of layers per stage (circular schedule): micro-batches circle the ring this often.
    repeats: int = 1
    # Schedules with their own backward: one action per stage per tick (single), one F and one
    # B (fused), or auto: whichever costs less in lockstep with the model's F, B and W FLOPs.
    tick: str = "auto"
    # Layers per stage: balanced (sizes differ by at most one), auto (the split whose slowest
    # stage is fastest, by the cost model and `parallel.stage_speeds`), or a list such as
    # [3, 3, 1, 1] summing to model.layers, each at least `repeats` (a stage's layers are cut
    # into its chunks evenly).
    stage_layers: str = "balanced"

    @property
    def split(self) -> str | tuple[int, ...]:
        """`stage_layers` as "balanced", "auto" or a tuple of layer counts per stage."""
        if self.stage_layers in STAGE_SPLITS:
            return self.stage_layers
        return parse_list("pipeline.stage_layers", self.stage_layers, int)


@dataclass(frozen=True)
class ServeConfig:
    """`jaxpar serve`: continuous batching over `max_seqs` decode slots (rounded up to a multiple
    of data x pipeline, so every stage gets micro-batches), prompts prefilled `prefill_chunk`
    tokens at a time between decode steps (about `max_batched_tokens` tokens a turn), at most
    `max_queue` requests waiting. The KV cache is paged: each `data` shard's pool holds
    `kv_blocks` blocks of `block_size` positions (0: as many as its slots need at full context,
    so that nothing is ever preempted), taken as tokens arrive; full prompt blocks are kept for
    later prompts that start with them (`prefix_cache`)."""

    max_seqs: int = 8
    prefill_chunk: int = 64
    # Tokens a slot decodes per dispatch, on the device without the host between them, while no
    # request waits to start (one step at a time while one does).
    decode_steps: int = 8
    # Speculative decoding (`jaxpar.infer.speculate`): "ngram:K" or "draft:PATH:K" ("": none). A
    # turn then checks each slot's K drafts in one verify pass instead of decoding a block.
    speculative: str = ""
    # Tokens a turn of the loop computes: one per decoding slot, the rest in prompt pieces.
    max_batched_tokens: int = 512
    max_queue: int = 64
    block_size: int = 16
    kv_blocks: int = 0
    prefix_cache: bool = True
    # On SIGTERM, in-flight requests get this long to finish before they are cancelled.
    shutdown_s: float = 10.0
    # A request that waits this long for a slot is answered 503 (it never got one).
    queue_timeout_s: float = 60.0
    # The largest request body read; 0: 8 bytes a token of the model's context, plus 1 MiB.
    max_body_bytes: int = 0
    # API keys (`jaxpar.infer.access`): a file of keys, one a line, besides JAXPAR_API_KEY.
    # With a key, every /v1 request needs `Authorization: Bearer <key>`, and /metrics does too
    # except from `open_metrics` clients: "loopback" (this host), "all", or "none".
    api_key_file: str = ""
    open_metrics: str = "loopback"
    # TLS (uvicorn's): a PEM certificate chain and its private key, both or neither.
    ssl_certfile: str = ""
    ssl_keyfile: str = ""


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> Config:
        """A validated copy with dotted keys set to typed values, e.g.
        `replace(**{"train.steps": 5})`. Values are checked as a YAML file's are (an int may
        stand for a float; nothing is parsed from text).

        Raises:
            JaxparError: an unknown key, a value of the wrong type, or a value out of range.
        """
        tree = self.to_dict()
        for key, value in overrides.items():
            _set(tree, key, value, from_text=False)
        return _validated(tree)


_COMPUTE_ONLY = (
    "attention", "remat", "context_attention", "context_load_balance", "attention_block",
)  # fmt: skip


def architecture(model: Mapping[str, Any]) -> dict[str, Any]:
    """A model section (as a dict, e.g. read back from a checkpoint) without its compute-only
    fields; see `ModelConfig.architecture`."""
    return {k: v for k, v in model.items() if k not in _COMPUTE_ONLY}


_SECTION_TYPES = {
    "model": ModelConfig,
    "train": TrainConfig,
    "data": DataConfig,
    "parallel": ParallelConfig,
    "pipeline": PipelineConfig,
    "serve": ServeConfig,
    "checkpoint": CheckpointConfig,
}


@functools.cache
def _field_types(cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, value: Any, t: type, from_text: bool) -> Any:
    """Converts `value` to type `t`, or raises naming the key, the value and the expected type."""
    what = f"config key {key!r}"
    if not from_text:
        return typed(value, t, what)
    if t is str:
        return str(value)  # verbatim: a prompt may end in a space
    text = str(value).strip()
    if t is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise type_error(what, value, (bool,))
    try:
        return t(text)
    except ValueError:
        raise type_error(what, value, (t,)) from None


def _set(tree: dict[str, dict[str, Any]], key: str, value: Any, from_text: bool) -> None:
    if key == "pipeline.remat":  # its old name: remat is per layer now, on every mesh
        key = "model.remat"
    # The prefix cache's own pool before the cache was paged (its blocks are the cache's now).
    if key == "serve.prefix_block":
        key = "serve.block_size"
    if key == "serve.prefix_blocks":
        key, value = "serve.prefix_cache", str(value).strip() not in ("0", "0.0")
        from_text = False
    section, _, name = key.partition(".")
    if section not in _SECTION_TYPES or not name:
        raise JaxparError(
            f"unknown config key {key!r} (keys look like SECTION.NAME with SECTION one of "
            f"{', '.join(_SECTION_TYPES)})"
        )
    types_ = _field_types(_SECTION_TYPES[section])
    if name not in types_:
        raise JaxparError(
            f"unknown config key {key!r} (valid keys in {section!r}: {', '.join(types_)})"
        )
    if key in _LIST_KEYS:
        tree[section][name] = _list_text(key, value)
    else:
        tree[section][name] = _coerce(key, value, types_[name], from_text)


def _read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise JaxparError(f"config file {str(path)!r} does not exist")
    try:
        doc = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise JaxparError(f"config file {str(path)!r} is not valid YAML{at}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise JaxparError(
            f"config file {str(path)!r} must hold a mapping of sections "
            f"({', '.join(_SECTION_TYPES)}), got {type(doc).__name__}"
        )
    return doc


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    base: Config | None = None,
) -> Config:
    """Builds a validated `Config`: defaults (or `base`), then a YAML file, then overrides.

    Raises:
        JaxparError: a missing or malformed file, an unknown key, a value of the wrong type, or a
            value out of range; the message names it.
    """
    tree = (base or Config()).to_dict()
    if path is not None:
        for section, values in _read_yaml(path).items():
            if section not in _SECTION_TYPES:
                raise JaxparError(
                    f"unknown config section {section!r} in {str(path)!r} "
                    f"(valid: {', '.join(_SECTION_TYPES)})"
                )
            if not isinstance(values, Mapping):
                raise JaxparError(f"config section {section!r} must be a mapping, got {values!r}")
            for name, value in values.items():
                _set(tree, f"{section}.{name}", value, from_text=False)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise JaxparError(f"override {item!r} must look like SECTION.NAME=VALUE")
        _set(tree, key.strip(), value, from_text=True)
    return _validated(tree)


def _validated(tree: dict[str, dict[str, Any]]) -> Config:
    """The `Config` of a tree of sections (as `Config.to_dict` gives), validated."""
    config = Config(**{name: cls(**tree[name]) for name, cls in _SECTION_TYPES.items()})
    validate(config)
    return config


def _positive(key: str, value: float) -> None:
    if not math.isfinite(value) or value <= 0:
        raise JaxparError(f"config key {key!r} must be positive, got {value!r}")


def validate(config: Config) -> None:
    """Checks values that make sense on their own, whatever the mesh.

    Raises:
        JaxparError: the first value out of range; the message names it and what is valid.
    """
    _validate_model(config.model)
    _validate_train(config.train)
    _validate_data(config.data)
    config.pipeline.split, config.parallel.speeds  # noqa: B018 (each raises if malformed)
    _validate_checkpoint(config.checkpoint)
    p = config.pipeline
    check_schedule_counts(p.schedule, p.microbatches, p.repeats)
    check_schedule_tick(p.schedule, p.tick)
    _validate_serve(config.serve)


def _one_of(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise JaxparError(f"{key}={value!r} is not one of {', '.join(valid)}")


def _validate_model(m: ModelConfig) -> None:
    for name in ("layers", "dim", "heads", "kv_heads", "mlp_dim", "vocab", "rope_theta",
                 "norm_eps"):  # fmt: skip
        _positive(f"model.{name}", getattr(m, name))
    if m.dim % m.heads:
        raise JaxparError(
            f"model.dim={m.dim} must be divisible by model.heads={m.heads} (head_dim = dim / heads)"
        )
    if m.head_dim % 2:
        raise JaxparError(
            f"head_dim = model.dim / model.heads = {m.head_dim} must be even for RoPE"
        )
    _one_of("model.attention", m.attention, ATTENTION)
    if m.heads % m.kv_heads:
        raise JaxparError(
            f"model.heads={m.heads} must be a multiple of model.kv_heads={m.kv_heads} "
            "(each kv head serves heads / kv_heads query heads)"
        )
    _one_of("model.remat", m.remat, REMAT)
    _one_of("model.context_attention", m.context_attention, CONTEXT_ATTENTION)
    if m.attention_block < 0:
        raise JaxparError(
            f"config key 'model.attention_block' must be >= 0 (0: no blocks), got "
            f"{m.attention_block}"
        )


def _validate_train(t: TrainConfig) -> None:
    for name in ("steps", "batch_size", "seq_len", "lr", "grad_clip"):
        _positive(f"train.{name}", getattr(t, name))
    if t.warmup_steps < 0:
        raise JaxparError(f"config key 'train.warmup_steps' must be >= 0, got {t.warmup_steps}")
    if not 0 <= t.min_lr_ratio <= 1:
        raise JaxparError(
            f"config key 'train.min_lr_ratio' must be in [0, 1], got {t.min_lr_ratio}"
        )
    for name in ("b1", "b2"):
        if not 0 <= getattr(t, name) < 1:
            raise JaxparError(
                f"config key 'train.{name}' must be in [0, 1), got {getattr(t, name)}"
            )
    if not (math.isfinite(t.weight_decay) and t.weight_decay >= 0):
        raise JaxparError(f"config key 'train.weight_decay' must be >= 0, got {t.weight_decay}")
    if t.sample_tokens < 0:
        raise JaxparError(f"config key 'train.sample_tokens' must be >= 0, got {t.sample_tokens}")
    if t.max_bad_steps < 1:
        raise JaxparError(f"train.max_bad_steps={t.max_bad_steps} must be at least 1")
    if t.rebalance_every < 0:
        raise JaxparError(f"train.rebalance_every={t.rebalance_every} must be >= 0 (0: never)")
    _positive("train.rebalance_threshold", t.rebalance_threshold)
    _one_of("train.dtype", t.dtype, DTYPES)
    _one_of("train.opt_dtype", t.opt_dtype, OPT_DTYPES)
    if not t.trackers:
        raise JaxparError(f"train.tracker={t.tracker!r} names no tracker; give one or more of "
                          f"{', '.join(TRACKERS)}")  # fmt: skip
    for name in t.trackers:
        _one_of("train.tracker", name, TRACKERS)
    for name in ("eval_every", "eval_batches", "straggler_every"):
        if getattr(t, name) < 1:
            raise JaxparError(f"train.{name}={getattr(t, name)} must be at least 1")
    if not (math.isfinite(t.hang_timeout_s) and t.hang_timeout_s >= 0):
        raise JaxparError(f"train.hang_timeout_s={t.hang_timeout_s} must be >= 0 (0: auto)")
    _positive("train.straggler_threshold", t.straggler_threshold)
    if not (math.isfinite(t.fault_slow_s) and t.fault_slow_s >= 0):
        raise JaxparError(f"train.fault_slow_s={t.fault_slow_s} must be >= 0")


def _validate_data(d: DataConfig) -> None:
    if not 0 <= d.eval_fraction < 1:
        raise JaxparError(f"data.eval_fraction={d.eval_fraction} must be in [0, 1)")
    if d.eval_path and d.eval_fraction:
        raise JaxparError(
            f"data.eval_path={d.eval_path!r} and data.eval_fraction={d.eval_fraction} both give "
            "held-out text; give one"
        )


def _validate_checkpoint(c: CheckpointConfig) -> None:
    if c.every < 0:
        raise JaxparError(f"checkpoint.every={c.every} must be >= 0 (0: only at the end)")
    if c.keep < 1:
        raise JaxparError(f"checkpoint.keep={c.keep} must be at least 1")


def _validate_serve(s: ServeConfig) -> None:
    for name in ("max_seqs", "prefill_chunk", "decode_steps", "max_batched_tokens", "max_queue",
                 "block_size", "shutdown_s", "queue_timeout_s"):  # fmt: skip
        _positive(f"serve.{name}", getattr(s, name))
    if s.kv_blocks < 0:
        raise JaxparError(f"serve.kv_blocks={s.kv_blocks} must be >= 0 (0: every slot's full "
                          "context)")  # fmt: skip
    if s.max_body_bytes < 0:
        raise JaxparError(f"serve.max_body_bytes={s.max_body_bytes} must be >= 0 (0: sized for "
                          "the model's context)")  # fmt: skip
    if s.open_metrics not in OPEN_METRICS:
        raise JaxparError(f"serve.open_metrics={s.open_metrics!r} must be one of "
                          f"{', '.join(OPEN_METRICS)}")  # fmt: skip
    if bool(s.ssl_certfile) != bool(s.ssl_keyfile):
        raise JaxparError("serve.ssl_certfile and serve.ssl_keyfile go together: give both or "
                          "neither")  # fmt: skip


def validate_model_for_mesh(m: ModelConfig, spec: MeshSpec, repeats: int = 1) -> None:
    """Checks that the model's sizes split over `tensor` and its layers fill the stages."""
    for name in ("heads", "kv_heads", "mlp_dim", "vocab"):
        value = getattr(m, name)
        if value % spec.tensor:
            raise JaxparError(
                f"model.{name}={value} is not divisible by tensor={spec.tensor}; use a tensor size "
                f"that divides it ({', '.join(str(d) for d in _divisors(value) if d <= 64)})"
            )
    chunks = spec.pipeline * repeats
    if m.layers < chunks:
        raise JaxparError(
            f"model.layers={m.layers} is fewer than pipeline stages x repeats = {spec.pipeline} x "
            f"{repeats} = {chunks}; every chunk needs a layer"
        )


def check_stage_split(split: str | tuple[int, ...], layers: int, stages: int,
                      repeats: int) -> None:  # fmt: skip
    """Checks a `pipeline.stage_layers` list against the model and the mesh: one count per
    stage, summing to the layers, each filling the stage's `repeats` chunks."""
    if isinstance(split, str):
        return
    text = f"pipeline.stage_layers=[{', '.join(map(str, split))}]"
    if len(split) != stages:
        raise JaxparError(f"{text} has {len(split)} entries but pipeline={stages}; give one per "
                          f"stage, or balanced or auto")  # fmt: skip
    if sum(split) != layers:
        raise JaxparError(f"{text} sums to {sum(split)} but model.layers={layers}")
    if min(split) < repeats:
        raise JaxparError(
            f"{text} gives a stage {min(split)} layer(s) but each stage runs {repeats} chunk(s) "
            f"(pipeline.repeats) and every chunk needs a layer"
        )


def validate_for_mesh(config: Config, spec: MeshSpec) -> None:
    """Checks the sizes that must divide over the mesh axes (global sizes, per-axis sizes)."""
    m, t, p = config.model, config.train, config.pipeline
    data, pipeline = spec.data, spec.pipeline
    validate_model_for_mesh(m, spec, p.repeats)
    check_stage_split(p.split, m.layers, pipeline, p.repeats)
    if t.rebalance_every and (pipeline == 1 or spec.context > 1):
        raise JaxparError(
            f"train.rebalance_every={t.rebalance_every} needs pipeline > 1 and context = 1 (it "
            f"times each stage's layers alone); mesh has pipeline={pipeline}, "
            f"context={spec.context}"
        )
    speeds = config.parallel.speeds
    if speeds is not None and len(speeds) != pipeline:
        raise JaxparError(
            f"parallel.stage_speeds={config.parallel.stage_speeds} has {len(speeds)} entries but "
            f"pipeline={pipeline}; give one per stage"
        )
    if t.batch_size % data:
        raise JaxparError(
            f"train.batch_size={t.batch_size} is not divisible by data={data}; the global batch "
            f"is split evenly over the data replicas (try a multiple of {data})"
        )
    if config.parallel.fsdp and m.dim % data:
        raise JaxparError(
            f"model.dim={m.dim} is not divisible by data={data}, which FSDP shards it over"
        )
    per_replica = t.batch_size // data
    for name, value in (("pipeline.microbatches", p.microbatches), ("pipeline stages", pipeline)):
        if per_replica % value:
            raise JaxparError(
                f"per-replica batch train.batch_size / data = {per_replica} is not divisible by "
                f"{name} = {value}; use a batch that is a multiple of {value * data}"
            )
    check_schedule_stages(p.schedule, pipeline, p.microbatches)
    if spec.context > 1 and t.seq_len % (2 * spec.context):
        raise JaxparError(
            f"train.seq_len={t.seq_len} is not divisible by 2 x context = {2 * spec.context}; "
            f"each of the {spec.context} pieces of the sequence is two chunks of equal length "
            f"(try a multiple of {2 * spec.context})"
        )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def dump_yaml(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
