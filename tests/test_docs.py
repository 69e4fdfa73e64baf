"""The docs stay true to the tree: every relative link resolves (file and heading), every config
key is documented, and every command example parses. No jax: this runs in a second."""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest

from jaxpar.cli import build_parser
from jaxpar.config import Config, load_config
from jaxpar.mesh import parse_mesh

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "experiments/README.md"]
CONFIG_PAGE = ROOT / "docs/configuration.md"

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """The page without its fenced code blocks (a `# comment` in bash is not a heading)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The heading anchors of a markdown page; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for line in _prose(page.read_text()).splitlines():
        if m := re.match(r"#{1,6}\s+(.*)", line):
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(_prose(page.read_text())) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    bad = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            bad.append(f"{target}: no such file")
        elif anchor and (file.suffix != ".md" or anchor not in anchors(file)):
            bad.append(f"{target}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not bad, f"{page.relative_to(ROOT)}: " + "; ".join(bad)


def config_keys() -> list[str]:
    """Every `section.key` of `Config`, from the dataclasses themselves."""
    config = Config()
    return [
        f"{section.name}.{key.name}"
        for section in dataclasses.fields(config)
        for key in dataclasses.fields(getattr(config, section.name))
    ]


def test_every_config_key_is_documented():
    text = CONFIG_PAGE.read_text()
    missing = [k for k in config_keys() if f"`{k}`" not in text]
    assert not missing, f"docs/configuration.md does not document {missing}"


def test_configuration_page_documents_only_real_keys():
    rows = re.findall(r"^\| `([a-z_]+\.[a-z_]+)` \|", CONFIG_PAGE.read_text(), re.M)
    stale = sorted(set(rows) - set(config_keys()))
    assert not stale, f"docs/configuration.md documents keys config.py no longer has: {stale}"


def command_examples() -> list[tuple[str, str]]:
    """(page, command line) for every `jaxpar ...` line in a fenced bash block of the docs."""
    out = []
    for page in PAGES:
        for block in re.findall(r"^```bash\n(.*?)^```", page.read_text(), re.S | re.M):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if "jaxpar" in words:
                    out.append((page.name, shlex.join(words[words.index("jaxpar") :])))
    return out


@pytest.mark.parametrize("page,line", command_examples())
def test_command_examples_parse(page, line):
    words = [w for w in shlex.split(line)[1:] if w != "..."]
    if words[:1] == ["launch"]:
        words = words[words.index("--") + 1 :]  # the launched command is an example too
    args = build_parser().parse_args(words)  # an unknown option raises JaxparError
    load_config(None, getattr(args, "overrides", []))  # so do unknown keys and wrong types
    for spec in (getattr(args, "mesh", None), getattr(args, "spec", None)):
        if spec is not None and spec != "auto":
            parse_mesh(spec)
