"""Hardware profiles: what the planner's cost model knows of the devices, from small YAML files.

A profile gives one device's memory, its peak and sustained matmul rates per compute dtype, how many
devices share a node, and two links in the alpha-beta form (a latency per collective and a bus
bandwidth, as NCCL's tests report it): `node_link` inside a node (NVLink, a TPU slice's ICI, or
this host's memory), `network_link` between nodes (InfiniBand, DCN). `overlap` is the share of the
data-parallel gradient reduction hidden behind the backward pass (XLA's asynchronous collectives);
tensor-parallel all-reduces and pipeline sends sit on the critical path and are never hidden.
`layer_overhead_us` is the fixed time of one layer's forward or backward on one micro-batch beyond
its matmuls (kernel launches, the tick loop's bookkeeping): what makes many small micro-batches
slower than few large ones at equal FLOPs. `platform` is jax's backend of the devices (`cpu`,
`gpu`, `tpu`): with the compute dtype it decides which attention `model.attention` runs there
(`jaxpar.model.attention.implementation`), and `attention_tflops` is the rate of a fused
attention kernel where the platform has one (cuDNN's on GPUs: the matmul FLOPs of the causal half
it computes over its time, its backward's recomputation included).

The GPU profiles' sustained and attention rates are fitted to measured train steps
(`jaxpar/plan/measured.yaml`, `jaxpar.plan.calibrate.fit_rates`): a step's rate, all its other
work (norms, activations, the optimizer) included, not a bare matmul's.

Shipped profiles live in `jaxpar/plan/profiles/` (`h100-sxm`, `h200`, `a100-80g`, `tpu-v5e`, `cpu`);
`jaxpar plan --calibrate` measures the devices it runs on and writes one; any file of the same
fields works (`--hardware my-cluster.yaml`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from jaxpar.errors import JaxparError

PROFILES = Path(__file__).parent / "profiles"
DTYPES = ("bfloat16", "float32")
PEAK_SOURCES = ("datasheet", "measured")
PLATFORMS = ("cpu", "gpu", "tpu")
OPTIONAL = ("memory_gbytes_per_s", "peak_source", "platform", "attention_tflops")


@dataclass(frozen=True)
class Link:
    """A collective's cost: `latency_us` once per collective plus its bytes over `gbytes_per_s`
    (bus bandwidth: a ring all-reduce of n bytes over g devices moves 2 (g - 1) / g n)."""

    gbytes_per_s: float
    latency_us: float

    def seconds(self, bus_bytes: float, count: int) -> float:
        return count * self.latency_us * 1e-6 + bus_bytes / (self.gbytes_per_s * 1e9)


@dataclass(frozen=True)
class Hardware:
    name: str
    description: str
    memory_gib: float
    peak_tflops: dict[str, float]
    sustained_tflops: dict[str, float]
    devices_per_node: int
    node_link: Link
    network_link: Link
    overlap: float
    layer_overhead_us: float
    # The device memory's read bandwidth (GB/s): a decode step reads every weight once, so a
    # token takes at least the weights' bytes over it (0: not known).
    memory_gbytes_per_s: float = 0.0
    # "datasheet": `peak_tflops` are the vendor's dense peaks, the MFU denominator of `jaxpar
    # bench`; "measured": calibrated on a device without one (a CPU), used by the planner only.
    peak_source: str = "datasheet"
    # jax's backend of the devices: cpu, gpu or tpu (left out of a file: cpu for a profile named
    # cpu, else gpu).
    platform: str = "gpu"
    # A fused attention kernel's rate per dtype (left out: the sustained rate).
    attention_tflops: dict[str, float] = field(default_factory=dict)

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * 2**30)

    def peak_flops(self, dtype: str) -> float:
        return self.peak_tflops[dtype] * 1e12

    def sustained_flops(self, dtype: str) -> float:
        return self.sustained_tflops[dtype] * 1e12

    def attention_flops(self, dtype: str) -> float:
        """The fused attention kernel's FLOP/s in `dtype` (the sustained rate where not given)."""
        return self.attention_tflops.get(dtype, self.sustained_tflops[dtype]) * 1e12

    def to_yaml(self) -> str:
        return yaml.safe_dump(asdict(self), sort_keys=False)


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILES.glob("*.yaml"))


def load_hardware(name_or_file: str) -> Hardware:
    """A shipped profile by name, or a profile file.

    Raises:
        JaxparError: neither a shipped name nor a readable file, or a malformed profile (the
            message names the field).
    """
    path = PROFILES / f"{name_or_file}.yaml"
    if not path.is_file():
        path = Path(name_or_file)
        if not path.is_file():
            raise JaxparError(
                f"hardware {name_or_file!r} is neither a profile ({', '.join(profile_names())}) "
                "nor a profile file"
            )
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise JaxparError(f"hardware profile {str(path)!r} is not valid YAML{at}") from None
    return parse_hardware(raw, str(path))


def _number(source: str, key: str, value: Any, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= minimum:
        raise JaxparError(
            f"hardware profile {source!r}: field {key!r} must be a number > {minimum:g}, "
            f"got {value!r}"
        )
    return float(value)


def _mapping(source: str, key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise JaxparError(
            f"hardware profile {source!r}: field {key!r} must be a mapping, got {value!r}"
        )
    return value


def _link(source: str, key: str, value: Any) -> Link:
    raw = _mapping(source, key, value)
    _known(source, key, raw, ("gbytes_per_s", "latency_us"))
    return Link(
        gbytes_per_s=_number(source, f"{key}.gbytes_per_s", raw.get("gbytes_per_s")),
        latency_us=_number(source, f"{key}.latency_us", raw.get("latency_us"), minimum=-1e-12),
    )


def _rates(source: str, key: str, value: Any, every: bool = True) -> dict[str, float]:
    """A rate per dtype: every dtype's, or (`every` False) those given."""
    raw = _mapping(source, key, value)
    _known(source, key, raw, DTYPES)
    return {d: _number(source, f"{key}.{d}", raw.get(d)) for d in DTYPES if every or d in raw}


def _known(source: str, where: str, raw: dict[str, Any], fields: tuple[str, ...]) -> None:
    for key in raw:
        if key not in fields:
            name = f"{where}.{key}" if where else key
            raise JaxparError(
                f"hardware profile {source!r}: unknown field {name!r} (valid: {', '.join(fields)})"
            )


def parse_hardware(raw: Any, source: str) -> Hardware:
    """A profile from its parsed YAML; every field is required and checked."""
    fields = tuple(Hardware.__dataclass_fields__)
    raw = _mapping(source, "(top level)", raw)
    _known(source, "", raw, fields)
    for key in fields:
        if key not in raw and key not in OPTIONAL:
            raise JaxparError(f"hardware profile {source!r}: missing field {key!r}")
    devices = raw["devices_per_node"]
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise JaxparError(
            f"hardware profile {source!r}: field 'devices_per_node' must be a positive integer, "
            f"got {devices!r}"
        )
    overlap = raw["overlap"]
    if isinstance(overlap, bool) or not isinstance(overlap, int | float) or not 0 <= overlap <= 1:
        raise JaxparError(
            f"hardware profile {source!r}: field 'overlap' must be a number from 0 to 1, "
            f"got {overlap!r}"
        )
    return Hardware(
        name=str(raw["name"]),
        description=str(raw["description"]),
        memory_gib=_number(source, "memory_gib", raw["memory_gib"]),
        peak_tflops=_rates(source, "peak_tflops", raw["peak_tflops"]),
        sustained_tflops=_rates(source, "sustained_tflops", raw["sustained_tflops"]),
        devices_per_node=devices,
        node_link=_link(source, "node_link", raw["node_link"]),
        network_link=_link(source, "network_link", raw["network_link"]),
        overlap=float(overlap),
        peak_source=_one_of(source, "peak_source", raw.get("peak_source", "datasheet"),
                            PEAK_SOURCES),
        memory_gbytes_per_s=_number(source, "memory_gbytes_per_s",
                                    raw.get("memory_gbytes_per_s", 0.0), minimum=-1e-12),
        layer_overhead_us=_number(
            source, "layer_overhead_us", raw["layer_overhead_us"], minimum=-1e-12
        ),
        platform=_one_of(source, "platform", raw.get("platform", _platform(raw)), PLATFORMS),
        attention_tflops=_rates(source, "attention_tflops", raw.get("attention_tflops", {}),
                                every=False),  # fmt: skip
    )


def _platform(raw: dict[str, Any]) -> str:
    """The platform of a profile that does not say: cpu for one named cpu, else gpu."""
    return "cpu" if raw.get("name") == "cpu" else "gpu"


# Device kinds (as JAX reports them) and their shipped profiles.
_KINDS = (("H100", "h100-sxm"), ("H200", "h200"), ("A100", "a100-80g"), ("v5 lite", "tpu-v5e"),
          ("v5e", "tpu-v5e"), ("cpu", "cpu"))  # fmt: skip


def _one_of(source: str, key: str, value: Any, valid: tuple[str, ...]) -> str:
    if value not in valid:
        raise JaxparError(
            f"hardware profile {source!r}: field {key!r} must be one of {', '.join(valid)}, "
            f"got {value!r}"
        )
    return value


def _profile_of(device_kind: str) -> str | None:
    """The shipped profile of a device kind (as JAX reports it), if any."""
    for marker, profile in _KINDS:
        if marker.lower() in device_kind.lower():
            return profile
    return None


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """The dense datasheet peak FLOP/s of one device of `device_kind` in `dtype`, from its shipped
    profile; None without a profile or a datasheet peak (a CPU's profile is measured). float16
    runs at bfloat16's rate on every shipped chip."""
    name = _profile_of(device_kind)
    if name is None:
        return None
    hardware = load_hardware(name)
    rate = hardware.peak_tflops.get("bfloat16" if dtype == "float16" else dtype)
    if hardware.peak_source != "datasheet" or rate is None:
        return None
    return rate * 1e12


def detect_hardware(name: str = "auto") -> Hardware:
    """`name`'s profile, or with `auto` the profile of the devices JAX sees.

    Raises:
        JaxparError: no shipped profile for the devices' kind.
    """
    if name != "auto":
        return load_hardware(name)
    import jax

    kind = jax.devices()[0].device_kind
    profile = _profile_of(kind)
    if profile is not None:
        return load_hardware(profile)
    raise JaxparError(
        f"no hardware profile for device kind {kind!r} (shipped: {', '.join(profile_names())}); "
        "write one with 'jaxpar plan --calibrate' and pass it as parallel.hardware=FILE.yaml"
    )
