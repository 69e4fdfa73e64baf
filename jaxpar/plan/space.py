"""The search space: every layout of a model on a number of devices that jaxpar can run.

A `Candidate` is one choice of the mesh (`data x pipeline x context x tensor`), FSDP, the pipeline
schedule, its micro-batches and repeats, the remat policy and the layers per stage. `candidates`
enumerates them for a config and a device count and keeps exactly those the config's own checks
accept (`validate`, `validate_for_mesh` and the `Schedule` itself), so a plan never proposes a
layout `train` refuses. The layers per stage are not searched: the planner prices each pipelined
layout on the balanced split and on the one `uneven` proposes (`auto_split`: `choose_split` on
the stages' costs, the embedding, head and loss on the stages that run them) and keeps the faster.

Left out, as copies of another candidate or as waste: FSDP over one replica (it shards nothing),
schedules other than gpipe on one stage (all are gradient accumulation over the micro-batches),
circular with one repeat (gpipe), layers that do not split evenly into the stages and repeats
(the padded layer slots would run and compute nothing), and a `context` axis whose 2C chunks do
not divide the sequence. The context strategy and its load balancing are the config's
(`model.context_attention`, `model.context_load_balance`), not searched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache

from jaxpar.config import REMAT, Config, load_config, validate_for_mesh
from jaxpar.errors import JaxparError
from jaxpar.mesh import MeshSpec
from jaxpar.pipeline.schedule import Schedule, auto_split, schedule_for
from jaxpar.schedule_rules import SCHEDULE_RULES


@dataclass(frozen=True)
class Candidate:
    data: int
    pipeline: int
    context: int
    tensor: int
    fsdp: bool
    schedule: str
    microbatches: int
    repeats: int
    remat: str
    stage_layers: tuple[int, ...] | None = None  # layers per stage; None: balanced

    @property
    def spec(self) -> MeshSpec:
        return MeshSpec(self.data, self.pipeline, self.context, self.tensor)

    @property
    def mesh(self) -> str:
        return str(self.spec)

    @property
    def overrides(self) -> list[str]:
        """The `key=value` list that realises this layout (with `--mesh` or `parallel.mesh`)."""
        return [
            f"parallel.mesh={self.mesh}",
            f"parallel.fsdp={str(self.fsdp).lower()}",
            f"pipeline.schedule={self.schedule}",
            f"pipeline.microbatches={self.microbatches}",
            f"pipeline.repeats={self.repeats}",
            f"model.remat={self.remat}",
            f"pipeline.stage_layers={self.split}",
        ]

    @property
    def split(self) -> str:
        """`pipeline.stage_layers` of this layout: balanced, or its list."""
        return "balanced" if self.stage_layers is None else str(list(self.stage_layers))

    def apply(self, config: Config) -> Config:
        """`config` laid out as this candidate (validated)."""
        return _applied(config, self)

    def schedule_in(self, config: Config) -> Schedule:
        """The schedule this layout of `config` runs."""
        return schedule_of(_applied(config, self), self.pipeline)

    def describe(self) -> str:
        parts = [f"{self.data}x{self.pipeline}x{self.tensor}"]
        if self.context > 1:
            parts.append(f"context={self.context}")
        if self.fsdp:
            parts.append("fsdp")
        if self.pipeline > 1:
            repeats = f" v={self.repeats}" if self.repeats > 1 else ""
            parts.append(f"{self.schedule}{repeats}")
            if self.stage_layers is not None:
                parts.append(self.split.replace(" ", ""))
        return " ".join(parts)


@cache
def _applied(config: Config, candidate: Candidate) -> Config:
    return load_config(None, candidate.overrides, base=config)


def schedule_of(config: Config, stages: int) -> Schedule:
    """`schedule_for` (built once per distinct table: building one checks it)."""
    return schedule_for(config, stages)


def factorisations(devices: int, seq_len: int) -> list[MeshSpec]:
    """Every (data, pipeline, context, tensor) whose product is `devices`, most data-parallel
    first, with context only where its 2C chunks divide `seq_len`."""
    divisors = [d for d in range(devices, 0, -1) if devices % d == 0]
    return [
        MeshSpec(data=d, pipeline=p, context=c, tensor=devices // (d * p * c))
        for d in divisors
        for p in sorted(x for x in divisors if (devices // d) % x == 0)
        for c in sorted(x for x in divisors if (devices // (d * p)) % x == 0)
        if c == 1 or seq_len % (2 * c) == 0
    ]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _raw(config: Config, spec: MeshSpec) -> Iterator[Candidate]:
    """Every combination for one mesh, before the checks."""
    layers, per_replica = config.model.layers, config.train.batch_size // spec.data
    for fsdp in (False, True) if spec.data > 1 else (False,):
        for remat in REMAT:
            if layers % spec.pipeline:
                continue
            if spec.pipeline == 1:
                for m in _divisors(per_replica):
                    yield Candidate(*spec.sizes, fsdp, "gpipe", m, 1, remat)
                continue
            for name, rule in SCHEDULE_RULES.items():
                chunks = range(2, layers // spec.pipeline + 1)  # circular v=1 is gpipe
                repeats = [1] if rule.chunks == "one" else [2] if rule.chunks == "two" else chunks
                repeats = [v for v in repeats if layers % (spec.pipeline * v) == 0]
                for v in repeats:
                    for m in _divisors(per_replica):
                        yield Candidate(*spec.sizes, fsdp, name, m, v, remat)


def check(config: Config, candidate: Candidate) -> None:
    """Raises JaxparError if jaxpar would refuse to run `candidate`."""
    layout = candidate.apply(config)  # validated
    validate_for_mesh(layout, candidate.spec)
    candidate.schedule_in(config)  # builds and checks the table


def uneven(config: Config, candidate: Candidate) -> Candidate:
    """`candidate` with the layers per stage `auto_split` proposes (unchanged where it keeps the
    balanced split, and on one stage)."""
    if candidate.pipeline == 1:
        return candidate
    layout = candidate.apply(config)
    sizes = auto_split(layout, candidate.pipeline, candidate.schedule_in(config))
    return candidate if sizes is None else dataclasses.replace(candidate, stage_layers=sizes)


def candidates(config: Config, devices: int) -> list[Candidate]:
    """Every layout of `config` on `devices` devices that jaxpar accepts.

    Raises:
        JaxparError: no layout at all; the message says why each axis fails.
    """
    found = []
    for spec in factorisations(devices, config.train.seq_len):
        for c in _raw(config, spec):
            try:
                check(config, c)
            except JaxparError:
                continue
            found.append(c)
    if not found:
        raise JaxparError(why_no_layout(config, devices))
    return found


def why_no_layout(config: Config, devices: int) -> str:
    """One line: which sizes each axis allows on its own, for a device count no layout uses.

    Each axis is tried alone (the others 1) with `validate_for_mesh`, the one statement of what
    divides over the mesh, on the config without its pipeline settings (gpipe, one micro-batch,
    one repeat) and FSDP, which the planner chooses itself.
    """
    m, t = config.model, config.train
    neutral = dataclasses.replace(
        config,
        pipeline=dataclasses.replace(config.pipeline, schedule="gpipe", microbatches=1, repeats=1),
        parallel=dataclasses.replace(config.parallel, fsdp=False),
    )

    def fits(spec: MeshSpec) -> bool:
        try:
            validate_for_mesh(neutral, spec)
        except JaxparError:
            return False
        return True

    sizes = _divisors(devices)
    tensor = [d for d in sizes if fits(MeshSpec(data=1, pipeline=1, tensor=d))]
    data = [d for d in sizes if fits(MeshSpec(data=d, pipeline=1, tensor=1))]
    pipeline = [d for d in sizes if fits(MeshSpec(data=1, pipeline=d, tensor=1))]
    context = [d for d in sizes if fits(MeshSpec(data=1, pipeline=1, context=d, tensor=1))]
    return (
        f"no layout of {devices} devices runs this model: tensor must divide model.heads="
        f"{m.heads}, kv_heads={m.kv_heads}, mlp_dim={m.mlp_dim} and vocab={m.vocab} (of the "
        f"divisors of {devices}: {tensor}); data must divide train.batch_size={t.batch_size} "
        f"({data}); pipeline must be at most model.layers={m.layers} and divide the per-replica "
        f"batch ({pipeline}); 2 x context must divide train.seq_len={t.seq_len} ({context}); "
        f"no data x pipeline x context x tensor from these multiplies to {devices} and passes "
        "every check"
    )
