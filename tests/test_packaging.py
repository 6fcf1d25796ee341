"""Package metadata: one version source, a torch floor that matches the pinned version, extras
the README lists, an index description with absolute links only, and the citation files."""

from __future__ import annotations

import re

from test_docs_blocks import ROOT

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

META = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = META["project"]


def test_one_version_source() -> None:
    assert "version" not in PROJECT and "version" in PROJECT["dynamic"]
    attr = META["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "sparse_sinkhorn.__version__"
    init = (ROOT / "src" / "sparse_sinkhorn" / "__init__.py").read_text()
    (version,) = re.findall(r'^__version__ = "([^"]+)"$', init, flags=re.M)
    cff = (ROOT / "CITATION.cff").read_text()
    assert f'version: "{version}"' in cff
    assert f"{version}" in (ROOT / "CHANGELOG.md").read_text()


def test_torch_floor_is_the_tested_version() -> None:
    (torch_req,) = [d for d in PROJECT["dependencies"] if d.startswith("torch")]
    floor = re.fullmatch(r"torch>=(\d+\.\d+)", torch_req.split("#")[0].strip())
    assert floor is not None, torch_req
    pinned = re.search(r"^TORCH \?= torch==(\d+\.\d+)\.\d+", (ROOT / "Makefile").read_text(), re.M)
    assert pinned is not None and pinned.group(1) == floor.group(1)


def test_metadata_for_an_index() -> None:
    assert PROJECT["authors"] and PROJECT["keywords"] and PROJECT["classifiers"]
    assert PROJECT["urls"]["Paper"] == "https://arxiv.org/abs/2002.11296"
    assert {"dev", "docs"} <= set(PROJECT["optional-dependencies"])
    assert any(d.startswith("build") for d in PROJECT["optional-dependencies"]["dev"])
    readme = PROJECT["readme"]
    text = (ROOT / readme["file"]).read_text()
    assert readme["content-type"] == "text/markdown"
    for target in re.findall(r"\]\(([^)]+)\)", text):
        assert target.startswith("https://"), f"relative link in the index description: {target}"


def test_readme_lists_every_extra() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Install", 1)[1].split("## Quick start", 1)[0]
    listed = set(re.findall(r"^\| `(\w+)` \|", table, flags=re.M))
    assert listed == set(PROJECT["optional-dependencies"])


def test_citation_and_changelog() -> None:
    cff = (ROOT / "CITATION.cff").read_text()
    assert "cff-version: 1.2.0" in cff and "preferred-citation:" in cff
    for name in ("Tay", "Bahri", "Yang", "Metzler", "Juan"):
        assert f"family-names: {name}" in cff
    assert 'title: "Sparse Sinkhorn Attention"' in cff and "year: 2020" in cff
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "Keep a Changelog" in changelog and "## [Unreleased]" in changelog
    assert not re.search(r"\b[0-9a-f]{7,40}\b", changelog), "no commit hashes in the changelog"
