"""Communication accounting: traffic per mesh axis, and Megatron's minimum for tensor parallelism.

Megatron-LM's tensor-parallel transformer needs, per layer and train step, two all-reduces of the
(b, s, d) activation in the forward pass (after the row-parallel attention output and MLP down
projections) and two in the backward pass (the input gradients of the column-parallel QKV and
gate/up projections), where b is the per-replica batch. The vocab-parallel embedding adds one in the
forward pass, the column-parallel LM head one in the backward pass, and the vocab-parallel
cross-entropy three all-reduces of (b, s) float32: the max, the sum of exponentials and the target
logit. `megatron_check` compares a compiled step's tensor-axis collectives with exactly that.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from jaxpar.analysis.hlo import DTYPE_BYTES, Collective
from jaxpar.config import ModelConfig
from jaxpar.mesh import TENSOR


@dataclass(frozen=True)
class AxisTraffic:
    """All collectives of one kind over one set of mesh axes in one program execution.

    Attributes:
        count: arrays moved, counted once per execution (a combined collective moving three arrays
            counts three; one inside a 4-trip loop counts four times).
        bytes: bytes moved per device per execution, summed the same way.
    """

    kind: str
    axes: tuple[str, ...]
    count: int
    bytes: int

    @property
    def axis(self) -> str:
        return ",".join(self.axes) or "none"


def traffic(found: Sequence[Collective]) -> list[AxisTraffic]:
    """Groups collectives by (kind, axes), with trip counts applied."""
    count: dict[tuple[str, tuple[str, ...]], int] = defaultdict(int)
    nbytes: dict[tuple[str, tuple[str, ...]], int] = defaultdict(int)
    for c in found:
        count[c.kind, c.axes] += len(c.shapes) * c.trips
        nbytes[c.kind, c.axes] += c.total_bytes
    return [AxisTraffic(k, a, count[k, a], nbytes[k, a]) for k, a in sorted(count)]


@dataclass(frozen=True)
class MegatronCheck:
    """Measured tensor-axis all-reduces of one train step against Megatron's minimum.

    Activation all-reduces move (b, s, d); cross-entropy ones move (b, s); scalars are the
    loss and gradient-norm partial sums. `unexpected` lists every other collective that involves the
    tensor axis (an all-gather of a weight would land here).
    """

    expected_activation: int
    measured_activation: int
    expected_ce: int
    measured_ce: int
    expected_bytes: int
    measured_bytes: int
    scalars: int
    unexpected: tuple[Collective, ...]

    @property
    def exact(self) -> bool:
        return (
            self.expected_activation == self.measured_activation
            and self.expected_ce == self.measured_ce
            and self.expected_bytes == self.measured_bytes
            and not self.unexpected
        )


def megatron_expected_bytes(cfg: ModelConfig, batch_local: int, seq: int, act_bytes: int) -> int:
    """Megatron's minimum tensor-parallel all-reduce bytes per device for one train step."""
    bsd = batch_local * seq * cfg.dim
    return (4 * cfg.layers + 2) * bsd * act_bytes + 3 * batch_local * seq * 4


def megatron_check(
    found: Sequence[Collective], cfg: ModelConfig, batch_local: int, seq: int, act_bytes: int
) -> MegatronCheck:
    """Classifies the tensor-axis collectives of a compiled train step (see module docstring)."""
    activation = ce = scalars = 0
    measured_bytes = 0
    unexpected = []
    for c in found:
        if TENSOR not in c.axes:
            continue
        for dtype, shape in c.shapes:
            size = math.prod(shape)
            if c.kind == "all-reduce" and size == 1:
                scalars += c.trips
            elif (
                c.kind == "all-reduce"
                and c.axes == (TENSOR,)
                and shape == (batch_local, seq, cfg.dim)
            ):
                activation += c.trips
                measured_bytes += c.trips * size * DTYPE_BYTES[dtype]
            elif c.kind == "all-reduce" and c.axes == (TENSOR,) and shape == (batch_local, seq):
                ce += c.trips
                measured_bytes += c.trips * size * DTYPE_BYTES[dtype]
            else:
                unexpected.append(c)
                break
    return MegatronCheck(
        expected_activation=4 * cfg.layers + 2,
        measured_activation=activation,
        expected_ce=3,
        measured_ce=ce,
        expected_bytes=megatron_expected_bytes(cfg, batch_local, seq, act_bytes),
        measured_bytes=measured_bytes,
        scalars=scalars,
        unexpected=tuple(unexpected),
    )
