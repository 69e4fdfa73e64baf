"""The package's import graph, read from the source: no cycles, and no arrow from a lower room
to a higher one (docs/architecture.md draws the rooms). Imports inside functions and under
TYPE_CHECKING count: a lazy import is still a dependency."""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "jaxpar"

DOC = PACKAGE.parent / "docs" / "architecture.md"


def forbidden() -> dict[str, str | tuple[str, ...]]:
    """Room -> the rooms it must not import ("*": anything of jaxpar but the errors), read from
    the import rules table of docs/architecture.md, so that the document and the test are one."""
    text = DOC.read_text()
    table = text[text.index("## Import rules") :]
    rules: dict[str, str | tuple[str, ...]] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or not re.fullmatch(r"`jaxpar[\w.]*`", cells[0]):
            continue
        banned = tuple(re.findall(r"`(jaxpar[\w.]*)`", cells[1]))
        rules[cells[0].strip("`")] = "*" if cells[1].startswith("anything else") else banned
    return rules


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def graph() -> dict[str, set[str]]:
    """Module -> the jaxpar modules it imports."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                # `from jaxpar.model import attention` imports the module jaxpar.model.attention
                targets = [f"{node.module}.{a.name}" for a in node.names]
                targets = [t if t in modules else node.module for t in targets]
            edges[name] |= {t for t in targets if t in modules and t != name}
    return edges


def in_room(module: str, room: str) -> bool:
    return module == room or module.startswith(room + ".")


def test_the_rules_are_read():
    rules = forbidden()
    assert rules["jaxpar.errors"] == "*"
    assert "jaxpar.pipeline" in rules["jaxpar.model"]  # the model sits below the pipeline
    assert "jaxpar.cli" in rules["jaxpar.plan"]
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    named = set(rules) | {b for banned in rules.values() if banned != "*" for b in banned}
    assert all(any(in_room(m, room) for m in modules) for room in named), named


def test_the_graph_is_read():
    edges = graph()
    assert "jaxpar.placement" in edges["jaxpar.train.step"]
    assert "jaxpar.model.attention" in edges["jaxpar.placement"]  # `from jaxpar.model import`
    assert "jaxpar.infer.load" in edges["jaxpar.cli.infer"]  # imported inside a function


def test_no_import_cycles():
    edges = graph()
    path: list[str] = []
    state: dict[str, str] = {}

    def visit(m: str) -> None:
        state[m] = "open"
        path.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == "open":
                cycle = path[path.index(n) :] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_no_arrow_runs_up():
    edges = graph()
    wrong = []
    for module, imported in edges.items():
        for room, banned in forbidden().items():
            if not in_room(module, room):
                continue
            for target in imported:
                if banned == "*":  # nothing but the errors
                    bad = target != "jaxpar.errors" and not in_room(target, room)
                else:
                    bad = any(in_room(target, b) for b in banned)
                if bad:
                    wrong.append(f"{module} -> {target}")
    assert not wrong, wrong
