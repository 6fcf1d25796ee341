"""The documentation's code: shell commands exist, Python blocks compile, no internal history.

``make docs`` builds the site with ``mkdocs build --strict`` (broken links and anchors fail it);
these tests need no MkDocs.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from test_docs_blocks import ROOT, blocks, check_command, shell_commands

OWN_DOCS = sorted(
    p
    for p in [*(ROOT / "docs").rglob("*.md"), ROOT / "CONTRIBUTING.md", ROOT / "README.md"]
    if p.name != "design.md"
)
RESULTS_TEXT = sorted((ROOT / "benchmarks" / "results").glob("*.md"))


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


@pytest.mark.parametrize("path", OWN_DOCS, ids=_rel)
def test_shell_commands_exist(path: Path) -> None:
    for block in blocks(path, ("bash", "sh", "shell")):
        for cmd in shell_commands(block.code):
            check_command(cmd)


@pytest.mark.parametrize("path", OWN_DOCS, ids=_rel)
def test_python_blocks_compile(path: Path) -> None:
    for block in blocks(path, ("python",)):
        compile(block.code, f"{_rel(path)}:{block.line}", "exec")


HISTORY = re.compile(
    r"\b(the lead|earlier version|for the record|previously|issue \d+)|(?<!\.md)#\d{1,4}\b",
    flags=re.I,
)


@pytest.mark.parametrize("path", [*OWN_DOCS, *RESULTS_TEXT], ids=_rel)
def test_no_internal_history(path: Path) -> None:
    text = path.read_text()
    assert not HISTORY.findall(text), HISTORY.findall(text)


def test_every_page_is_in_the_nav_and_api_pages_are_public() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in (ROOT / "docs").rglob("*.md"):
        rel = str(page.relative_to(ROOT / "docs"))
        assert rel == "pypi.md" or rel.startswith("results/") or rel in nav, rel
    public = {"ops", "nn", "models", "train", "hf", "errors", "renamed"}
    api = {p.stem for p in (ROOT / "docs" / "api").glob("*.md")}
    assert api == public
    for name in public:
        text = (ROOT / "docs" / "api" / f"{name}.md").read_text()
        assert f"::: sparse_sinkhorn.{name}\n" in text


def test_the_sweep_results_are_gone() -> None:
    assert not list((ROOT / "benchmarks" / "results").glob("sweep.*"))
    for path in [*OWN_DOCS, *RESULTS_TEXT]:
        assert "results/sweep." not in path.read_text(), path


SPHINX_ROLE = re.compile(r":(class|func|data|mod|meth|attr|obj|exc):`")


def test_docstrings_use_markdown_cross_references() -> None:
    """The API pages are rendered by mkdocstrings, which shows a Sphinx role as literal text:
    docstrings link with ``[`name`][sparse_sinkhorn.path]`` instead."""
    found = [
        f"{_rel(p)}:{n}"
        for p in sorted((ROOT / "src").rglob("*.py"))
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if SPHINX_ROLE.search(line)
    ]
    assert not found, found
