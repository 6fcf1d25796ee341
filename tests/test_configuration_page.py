"""docs/configuration.md: every snippet runs and prints what its comments say, and every
figure of its tables is the one in the committed result file it names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from test_docs_blocks import ROOT, Block, blocks

PAGE = ROOT / "docs" / "configuration.md"
RESULTS = ROOT / "docs" / "results" / "recall"
PYTHON_BLOCKS = blocks(PAGE, ("python",))


def test_the_page_has_a_snippet_per_configuration() -> None:
    assert len(PYTHON_BLOCKS) == 6


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda b: b.id)
def test_snippet_runs_and_prints_what_it_says(
    block: Block,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    if "transformers" in block.code:
        pytest.importorskip("transformers")
    ns: dict = {"__name__": "__configuration__"}
    exec(compile(block.code, f"configuration.md:{block.line}", "exec"), ns)
    printed = capsys.readouterr().out.splitlines()
    # every "print(...)  # X" prints X
    claims = re.findall(r"^print\(.*\)\s+#\s*(\S.*?)\s*$", block.code, flags=re.M)
    shown = [c for c in claims if c.startswith(("[", "torch.Size"))]
    assert [p.strip() for p in printed[: len(shown)]] == shown
    if "sinkhorn_plan" in block.code:
        assert ns["plan"].P[0, 0, 1:].argmax(-1).tolist() == list(range(7))
    if 'gate="bound"' in block.code:
        import torch

        out = ns["model"].generate(ns["prompt"], 8)
        assert out.shape == (1, 108) and torch.equal(out[:, :100], ns["prompt"])
    if "hf.convert" in block.code:
        ours, paper = (ns[n].config.sinkhorn_attention for n in ("model", "paper"))
        assert (ours["balance"], ours["pooling"], ours["sort_net"]) == (
            "softmax",
            "max",
            "bilinear",
        )
        assert (paper["balance"], paper["pooling"], paper["sort_net"]) == (
            "sinkhorn",
            "sum",
            "linear",
        )
    if "hard=True" in block.code:
        assert ns["serving"].config.attention.hard and not ns["model"].config.attention.hard


def _rows(table_header: str) -> list[list[str]]:
    """The body rows of the page's table whose header line starts with ``table_header``."""
    lines = PAGE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(table_header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def _result(path: Path, kind: str) -> dict:
    return next(r for r in json.loads(path.read_text())["results"] if r["kind"] == kind)


def test_passkey_seeds_are_the_committed_ones() -> None:
    rows = _rows("| length, steps | seeds |")
    assert len(rows) == 2
    for _, n_seeds, per_seed, file in rows:
        runs = _result(RESULTS / file.strip("`"), "softmax-max-layers")["runs"]
        assert int(n_seeds) == len(runs)
        assert per_seed == ", ".join(f"{r['eval']['accuracy']:.1f}" for r in runs)


KEYED = {  # the page's row label -> (file, kind)
    "dense attention": ("keyed-needles-512-3000steps.json", "dense"),
    '`topk`, `gate="bound"`, `compressed=True`': (
        "keyed-needles-512-3000steps.json",
        "topk-bound-compressed",
    ),
    '`topk`, `gate="bound"`': ("keyed-needles-512-3000steps-bound.json", "topk-bound"),
    '`topk`, `gate="mean"` (MoBA\'s), `compressed=True`': (
        "keyed-needles-512-3000steps.json",
        "topk-compressed",
    ),
    "`softmax-max-layers`": ("keyed-needles-512-3000steps.json", "softmax-max-layers"),
}


def test_keyed_needles_figures_are_the_committed_ones() -> None:
    rows = _rows("| configuration | seeds | accuracy % at 512 tokens |")
    assert {r[0] for r in rows} == set(KEYED)
    for label, n_seeds, accuracy in rows:
        file, kind = KEYED[label]
        result = _result(RESULTS / file, kind)
        assert int(n_seeds) == len(result.get("runs", [result]))
        mean = f"{result['eval']['accuracy']:.1f}"
        expected = mean if int(n_seeds) == 1 else f"{mean} ± {result['eval_std']['accuracy']:.1f}"
        assert accuracy == expected
