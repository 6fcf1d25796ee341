"""docs/configuration.md: every snippet runs and prints what its comments say (its tables
are checked against their result files by ``test_docs_figures.py``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from test_docs_blocks import ROOT, Block, blocks

PAGE = ROOT / "docs" / "configuration.md"
PYTHON_BLOCKS = blocks(PAGE, ("python",))


def test_the_page_has_a_snippet_per_configuration() -> None:
    assert len(PYTHON_BLOCKS) == 8


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
    if "routing_teacher" in block.code:  # the distillation trains the routed model's sort nets
        grads = [p.grad for n, p in ns["routed"].named_parameters() if ".sort_net." in n]
        assert grads and all(g is not None and bool(g.abs().sum() > 0) for g in grads)
    if "hard=True" in block.code:
        assert ns["serving"].config.attention.hard and not ns["model"].config.attention.hard
