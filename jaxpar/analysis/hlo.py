"""Collectives read from a compiled program's optimized HLO, with loop trip counts applied.

XLA's own cost analysis counts a while body once; here every instruction is weighted by how many
times its computation runs: the product of the `known_trip_count`s of the while loops around it.
Replica groups (explicit `{{0,1},{2,3}}`, iota `[2,4]<=[8]`, `[4,2]<=[2,4]T(1,0)` or the named
`mesh['axis_0'=2,...] {'axis_2'}` form) are turned into the mesh axes they run over: with global
device ids, id i is the i-th device of the mesh in row-major order.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2,
    "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\))?.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\dm\d\w*)?)\[([\d,]*)\]")
_CALLEES = re.compile(
    r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')


@dataclass(frozen=True)
class Collective:
    """One collective instruction of the compiled program.

    Attributes:
        kind: all-reduce, all-gather, reduce-scatter, all-to-all or collective-permute.
        axes: the mesh axes its groups span, e.g. ("tensor",); () for a no-op group of one.
        shapes: the arrays it moves, as (dtype, shape); a combined (tuple) collective has several.
        bytes: bytes of one execution, summed over `shapes` (the result for all-gather, the operand
            for the others).
        trips: how many times it runs per program execution (product of enclosing trip counts).
        op_name: the JAX operation it came from, from the HLO metadata.
    """

    kind: str
    axes: tuple[str, ...]
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    bytes: int
    trips: int
    op_name: str

    @property
    def total_bytes(self) -> int:
        return self.bytes * self.trips


def _arrays(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for dtype, dims in _ARRAY.findall(type_text):
        if dtype in DTYPE_BYTES:
            out.append((dtype, tuple(int(d) for d in dims.split(",") if d)))
    return out


def _nbytes(arrays: Sequence[tuple[str, tuple[int, ...]]]) -> int:
    return sum(DTYPE_BYTES[dt] * math.prod(shape) for dt, shape in arrays)


def _split_top_level(text: str) -> list[str]:
    """Splits `a, b, c` at commas that are not inside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _moved_arrays(kind: str, type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    arrays = _arrays(type_text)
    if kind.endswith("-start"):
        base = kind.removesuffix("-start")
        if base == "all-gather" or base == "collective-permute":
            # Async forms return (operands, results[, contexts]): count the results once.
            pieces = _split_top_level(type_text.strip()[1:-1])
            arrays = _arrays(pieces[1] if base == "all-gather" else pieces[0])
    return arrays


def parse_groups(attrs: str, num_devices: int) -> list[list[int]] | None:
    """The device-id groups of a collective's attribute text, or None when it has none."""
    m = re.search(r"source_target_pairs=\{(.*?)\}\}", attrs)
    if m:
        return [[int(x) for x in p.split(",")] for p in re.findall(r"\{(\d+,\d+)", m.group(0))]
    m = re.search(
        r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(([^)]*\)?)\))?\s*\{([^}]*)\}", attrs
    )
    if m:
        sizes = [int(v) for v in re.findall(r"=(\d+)", m.group(1))]
        names = re.findall(r"'(\w+)'=", m.group(1))
        chosen = [names.index(a) for a in re.findall(r"'(\w+)'", m.group(3))]
        ids = _device_ids(m.group(2), math.prod(sizes)).reshape(sizes)
        rest = [i for i in range(len(sizes)) if i not in chosen]
        moved = np.transpose(ids, rest + chosen)
        return moved.reshape(-1, math.prod(sizes[i] for i in chosen) or 1).tolist()
    m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs)
    if m:
        shape = [int(v) for v in m.group(1).split(",")]
        ids = np.arange(math.prod(shape)).reshape([int(v) for v in m.group(2).split(",")])
        if m.group(3):
            ids = ids.transpose([int(v) for v in m.group(3).split(",")])
        return ids.reshape(shape[0], -1).tolist()
    m = re.search(r"replica_groups=\{(\{[\d,{} ]*\})?\}", attrs)
    if m:
        found = re.findall(r"\{([\d,]+)\}", m.group(0))
        groups = [[int(x) for x in g.split(",")] for g in found]
        return groups or [list(range(num_devices))]
    if "replica_groups=" in attrs:
        raise ValueError(f"cannot read the replica groups of: {attrs[:300]}")
    return None


def _device_ids(text: str | None, size: int) -> np.ndarray:
    """The device order of a named-mesh replica group: `[4,2]T(1,0)` (an iota reshaped and
    transposed), `0,1,2,...` (explicit), or absent (0..size-1)."""
    if not text:
        return np.arange(size)
    m = re.fullmatch(r"\s*\[([\d,]+)\](?:T\(([\d,]+)\))?\s*", text)
    if m:
        ids = np.arange(size).reshape([int(v) for v in m.group(1).split(",")])
        if m.group(2):
            ids = ids.transpose([int(v) for v in m.group(2).split(",")])
        return ids.reshape(-1)
    return np.array([int(v) for v in text.split(",")])


def axes_of_groups(
    groups: list[list[int]], mesh_shape: Sequence[int], axis_names: Sequence[str]
) -> tuple[str, ...]:
    """The mesh axes along which the members of each group differ."""
    varying: set[int] = set()
    for g in groups:
        c = np.array(np.unravel_index(np.array(g), mesh_shape))
        varying |= {k for k in range(len(mesh_shape)) if len(set(c[k].tolist())) > 1}
    return tuple(axis_names[k] for k in sorted(varying))


@dataclass(frozen=True)
class Instruction:
    name: str
    type_text: str
    op: str
    rest: str


@dataclass(frozen=True)
class HloModule:
    """An optimized HLO module: its computations' instructions and how often each computation runs.

    Attributes:
        computations: computation name -> its instructions, in order.
        trips: computation name -> executions per program run (0 when unreachable from ENTRY).
        entry: the ENTRY computation's name.
    """

    computations: dict[str, list[Instruction]]
    trips: dict[str, int]
    entry: str = ""

    def instructions(self):
        """(instruction, executions per run) for every reachable instruction."""
        for computation, instructions in self.computations.items():
            if self.trips.get(computation, 0):
                for instruction in instructions:
                    yield instruction, self.trips[computation]


def parse(hlo_text: str) -> HloModule:
    """Reads computations and weights each by the trip counts of the while loops around it."""
    bodies: dict[str, list[Instruction]] = defaultdict(list)
    entry, current = None, None
    for line in hlo_text.splitlines():
        if current is None:
            m = _COMPUTATION.match(line)
            if m and not line.lstrip().startswith(("HloModule", "//")):
                current = m.group(1)
                if line.startswith("ENTRY"):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTRUCTION.match(line)
        if m:
            bodies[current].append(Instruction(*m.groups()))
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")

    trips: dict[str, int] = defaultdict(int)

    def visit(computation: str, weight: int) -> None:
        trips[computation] += weight
        for ins in bodies.get(computation, ()):
            if ins.op in COLLECTIVES or ins.op.removesuffix("-start") in COLLECTIVES:
                continue  # to_apply of a reduction, not a call
            factor = 1
            if ins.op == "while":
                m = _TRIP.search(ins.rest)
                factor = int(m.group(1)) if m else 1
            callees = [c for _, c in _CALLEES.findall(ins.rest)]
            for branches in _BRANCHES.findall(ins.rest):
                callees += [b.strip().lstrip("%") for b in branches.split(",")]
            for callee in callees:
                if callee in bodies:
                    visit(callee, weight * factor)

    visit(entry, 1)
    return HloModule(dict(bodies), dict(trips), entry)


# Instructions that execute nothing of their own: no thunk on XLA:CPU.
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all"}


def executed_ops(hlo: str | HloModule) -> dict[str, dict[str, int]]:
    """The operations one run of the program executes, by computation and op: what XLA:CPU runs
    as one thunk each. Every instruction of the entry computation, of while loops (times their
    trip counts) and of conditional branches (each branch as if it ran: an upper bound), except
    those that execute nothing (parameters, tuples, bitcasts, constants); a fusion counts once,
    whatever it fuses. Returns computation -> op -> executions per run."""
    module = parse(hlo) if isinstance(hlo, str) else hlo
    bodies = module.computations
    found: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def visit(computation: str, weight: int) -> None:
        for ins in bodies.get(computation, ()):
            if ins.op not in _FREE:
                found[computation][ins.op] += weight
            callees = []
            if ins.op == "while":
                m = _TRIP.search(ins.rest)
                trips = int(m.group(1)) if m else 1
                bodies_ = [c for k, c in _CALLEES.findall(ins.rest) if k == "body"]
                callees = [(c, weight * trips) for c in bodies_]
            elif ins.op in ("conditional", "call"):
                names = [c for k, c in _CALLEES.findall(ins.rest) if k != "to_apply"]
                for branches in _BRANCHES.findall(ins.rest):
                    names += [b.strip().lstrip("%") for b in branches.split(",")]
                callees = [(c, weight) for c in names]
            for callee, w in callees:
                visit(callee, w)

    visit(module.entry, 1)
    return {c: dict(ops) for c, ops in found.items()}


def collectives(
    hlo: str | HloModule, mesh_shape: Sequence[int], axis_names: Sequence[str]
) -> list[Collective]:
    """Every collective in an optimized HLO module, with its axes, bytes and trip count."""
    module = parse(hlo) if isinstance(hlo, str) else hlo
    num_devices = math.prod(mesh_shape)
    found = []
    for ins, trips in module.instructions():
        kind = ins.op.removesuffix("-start")
        if kind not in COLLECTIVES:
            continue
        groups = parse_groups(ins.rest, num_devices)
        axes = axes_of_groups(groups, mesh_shape, axis_names) if groups else tuple(axis_names)
        arrays = _moved_arrays(ins.op, ins.type_text)
        found.append(
            Collective(
                kind=kind,
                axes=axes,
                shapes=tuple(arrays),
                bytes=_nbytes(arrays),
                trips=trips,
                op_name=_op_name(ins.rest),
            )
        )
    return found


def _op_name(attrs: str) -> str:
    """The JAX operation an instruction came from (its metadata), or ''."""
    name = re.search(r'op_name="([^"]*)"', attrs)
    return name.group(1) if name else ""


def dot_flops(hlo: str | HloModule, batch_dims: int = 0) -> int:
    """Matmul FLOPs of one program run on one device: 2 x output size x contracted size per dot,
    times the executions of its computation (cost_analysis counts a loop body once).

    Args:
        batch_dims: count only the dots with at least this many batch dimensions (attention's
            batch over rows and heads; a weight's matmul has none). Not the op_name: XLA drops
            some dots' metadata.
    """
    module = parse(hlo) if isinstance(hlo, str) else hlo
    total = 0
    for computation, instructions in module.computations.items():
        runs = module.trips.get(computation, 0)
        if not runs:
            continue
        shapes = {ins.name: _arrays(ins.type_text) for ins in instructions}
        for ins in instructions:
            batch = re.search(r"lhs_batch_dims=\{([\d,]*)\}", ins.rest)
            if ins.op != "dot" or batch_dims > (len(batch.group(1).split(",")) if batch else 0):
                continue
            lhs = re.match(r"\s*(?:[^%]*?)%([\w.\-]+)", ins.rest)
            contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.rest)
            out = _arrays(ins.type_text)
            if not (lhs and contracting and out and shapes.get(lhs.group(1))):
                raise ValueError(f"cannot read dot {ins.name}: {ins.rest[:200]}")
            lhs_shape = shapes[lhs.group(1)][0][1]
            k = math.prod(lhs_shape[int(i)] for i in contracting.group(1).split(",") if i)
            total += runs * 2 * math.prod(out[0][1]) * k
    return total
