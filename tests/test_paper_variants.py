"""Named attention configurations in the paper's decoder experiments (sort, lm, image), the
shape of the decoder's routing they record, and the ranking a results table keeps (and its
comparison across budgets)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparse_sinkhorn.cli import main
from sparse_sinkhorn.experiments import image, lm, sorting, variants
from sparse_sinkhorn.experiments.ranking import Ranking, compare, rank, ranking_line
from sparse_sinkhorn.experiments.recall_kinds import RECALL_KINDS
from sparse_sinkhorn.experiments.results import KIND_NAMES
from sparse_sinkhorn.experiments.routing_shape import ENTROPY, PREV_MASS, RoutingShape, row_shape
from sparse_sinkhorn.models import LanguageModel, LanguageModelConfig, Seq2Seq
from sparse_sinkhorn.nn import AttentionConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def test_one_table_for_recall_and_the_paper_experiments() -> None:
    assert RECALL_KINDS is variants.VARIANTS
    for name in variants.PAPER_VARIANTS:
        assert name in sorting.NAMES and name in lm.NAMES and name in image.NAMES
    assert variants.fields("sinkhorn-targets") == {
        "kind": "sinkhorn",
        "balance": "sinkhorn-targets",
    }
    assert variants.fields("softmax-max") == {
        "kind": "sinkhorn", "sort_net": "bilinear", "balance": "softmax", "pooling": "max",
    }  # fmt: skip
    assert not variants.is_causal("sinkhorn-leaky") and variants.is_causal("sinkhorn-targets")
    assert variants.label("sinkhorn-leaky") == "sinkhorn-leaky (NOT causal)"
    assert all(name in KIND_NAMES for name in variants.PAPER_VARIANTS)  # lm and image tables
    assert "NOT causal" in KIND_NAMES["sinkhorn-leaky"]
    assert variants.not_causal_note(["sinkhorn", "dense"]) is None
    assert "NOT causal" in (variants.not_causal_note(["sinkhorn-leaky"]) or "")
    # the default grids are the plain kinds, as before
    assert sorting.DEFAULT_KINDS == ("sinkhorn", "dense", "local", "sparse")
    assert lm.KINDS == image.KINDS == ("dense", "local", "sparse", "sinkhorn", "mixture")


def test_a_plain_kind_builds_the_configuration_it_always_did() -> None:
    preset = sorting.PRESETS["cpu"]
    routing = {"temperature": preset.temperature, "n_iters": preset.n_iters}
    for kind in sorting.KINDS:
        built = sorting.model_config(preset, kind).attention
        fields = routing if kind in ("sinkhorn", "mixture") else {}
        expected = AttentionConfig(
            kind=kind, block_size=preset.block_size, max_len=2 * preset.length + 1, **fields
        )
        assert built == expected
    targets = sorting.model_config(preset, "sinkhorn-targets").attention
    assert targets.balance == "sinkhorn-targets" and targets.n_iters == preset.n_iters
    for kind in lm.KINDS:
        config = lm.model_config(lm.PRESETS[("char", "cpu")], kind, 40).attention
        assert config.kind == kind and config.balance == "sinkhorn"


def test_sort_variants_change_the_decoder_only() -> None:
    """A causal balancing changes nothing without causality: the encoder of sinkhorn-targets
    (and sinkhorn-leaky) equals sinkhorn's; the decoder's causal self-attention differs."""
    preset = sorting.with_overrides(sorting.PRESETS["cpu"], {"length": 16, "block_size": 4})
    src = torch.randint(4, 20, (2, 20))
    tgt = torch.randint(4, 20, (2, 24))
    outputs = {}
    for name in ("sinkhorn", "sinkhorn-targets", "sinkhorn-leaky"):
        torch.manual_seed(0)
        model = Seq2Seq(sorting.model_config(preset, name)).eval()
        with torch.no_grad():
            memory, mask = model.encode(src)
            outputs[name] = (memory, model.decode(tgt, memory, mask))
    for name in ("sinkhorn-targets", "sinkhorn-leaky"):
        torch.testing.assert_close(outputs[name][0], outputs["sinkhorn"][0], rtol=0, atol=0)
        assert not torch.allclose(outputs[name][1], outputs["sinkhorn"][1])


def test_row_shape_by_hand() -> None:
    p = torch.tensor(
        [
            [0.0, 0.0, 0.0],
            [2.0, 0.0, 0.0],  # row 1: all on block 0 (unnormalised), entropy 0
            [0.5, 0.5, 0.0],  # row 2: half on block 1, entropy ln 2
        ]
    )
    prev, entropy, counted = row_shape(p)
    assert prev.tolist() == [1.0, 0.5] and counted.tolist() == [True, True]
    torch.testing.assert_close(
        entropy, torch.tensor([0.0, 0.6931471805599453], dtype=entropy.dtype)
    )
    _, _, counted = row_shape(torch.zeros(3, 3))  # a row without weight is not counted
    assert not counted.any()


def _shape(name: str) -> dict[str, float]:
    torch.manual_seed(0)
    attention = AttentionConfig(block_size=8, max_len=128, **variants.fields(name))
    config = LanguageModelConfig(
        vocab_size=32, d_model=32, n_heads=2, n_layers=2, attention=attention
    )
    model = LanguageModel(config).eval()
    with RoutingShape(model) as shape, torch.no_grad():
        model(torch.randint(1, 32, (4, 128)))
    return shape.metrics()


def test_the_paper_decoder_routes_to_the_block_before_and_targets_do_not() -> None:
    """Untrained, 16 blocks: the paper's prefix-causal balancing is nearly the shift
    "block i reads block i - 1" (about 0.89 of each row); the column targets are not
    (about 0.33), and spread their rows far more (entropy about 1.5 against 0.4 nats)."""
    paper, targets, softmax = _shape("sinkhorn"), _shape("sinkhorn-targets"), _shape("softmax-max")
    assert paper[PREV_MASS] > 0.8
    assert targets[PREV_MASS] < paper[PREV_MASS] - 0.3
    assert softmax[PREV_MASS] < paper[PREV_MASS] - 0.3
    assert targets[ENTROPY] > paper[ENTROPY] + 0.5
    assert _shape("dense") == {}  # no routing, no figures


def test_ranking_and_budget_comparison(tmp_path: Path) -> None:
    def row(kind: str, mean: float, std: float) -> dict[str, object]:
        return {"kind": kind, "eval": {"m": mean}, "eval_std": {"m": std}}

    lower = Ranking("m", higher_is_better=False)
    rows = [row("a", 2.0, 0.1), row("b", 1.0, 0.1), row("c", 1.5, 0.4)]
    assert rank(rows, lower) == ["b", "c", "a"]
    assert rank(rows, Ranking("m", higher_is_better=True)) == ["a", "c", "b"]
    record = {**lower.to_dict(), "order": rank(rows, lower)}
    assert ranking_line(record) == "Ranking by m (lower is better), best first: b > c > a"
    doc_b = {"experiment": "x", "ranking": record, "results": rows}
    doubled = [row("a", 1.9, 0.1), row("b", 0.9, 0.1), row("c", 1.25, 0.2)]
    doc_2b = {"experiment": "x", "ranking": record, "results": doubled}
    result = compare(doc_b, doc_2b)
    assert result.same_ranking and result.order_2b == ["b", "c", "a"]
    assert result.tied_neighbours() == []  # [0.8, 1.0], [1.05, 1.45], [1.8, 2.0]
    text = result.report()
    assert "same ranking: yes" in text and "| c | 1.5 ± 0.4 | 1.25 ± 0.2 | yes (0.35) |" in text
    swapped = [row("a", 1.0, 0.5), row("b", 1.1, 0.1), row("c", 1.2, 0.1)]
    changed = compare(doc_b, {**doc_2b, "results": swapped})
    assert not changed.same_ranking
    assert ("a", "b") in changed.tied_neighbours()
    # the script: exit 0 when the ranking holds, 1 when it changed
    for name, doc in (("b", doc_b), ("2b", doc_2b), ("swapped", {**doc_2b, "results": swapped})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(doc))
    script = Path(__file__).parents[1] / "examples" / "compare_budgets.py"
    same = subprocess.run([sys.executable, script, tmp_path / "b", tmp_path / "2b"], check=False)
    assert same.returncode == 0
    other = [sys.executable, script, tmp_path / "b", tmp_path / "swapped"]
    assert subprocess.run(other, check=False, capture_output=True).returncode == 1


def test_tiny_sort_run_of_the_variants(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["sort", "--out", str(tmp_path / "run"), "--length", "8", "--block-size", "4"]
    args += ["--n-eval", "12", "--no-progress", "--seeds", "1", "--steps", "2"]
    assert main([*args, "--attention", "sinkhorn-targets,sinkhorn-leaky,dense"]) == 0
    printed = capsys.readouterr().out
    assert "| sinkhorn-leaky (NOT causal) |" in printed and "NOT causal (the paper" in printed
    assert "mass on i−1" in printed and "Ranking by dev/exact_match" in printed
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    rows = {r["kind"]: r for r in results["results"]}
    assert rows["sinkhorn-targets"]["config"]["attention"]["balance"] == "sinkhorn-targets"
    for name in ("sinkhorn-targets", "sinkhorn-leaky"):
        assert 0.0 < rows[name]["eval"][PREV_MASS] <= 1.0 and rows[name]["eval"][ENTROPY] >= 0
    assert PREV_MASS not in rows["dense"]["eval"]
    assert sorted(results["ranking"]["order"]) == ["dense", "sinkhorn-leaky", "sinkhorn-targets"]
    assert results["ranking"]["metric"] == "dev/exact_match"
    with pytest.raises(SystemExit, match="unknown attention kind 'softmax-hard'"):
        main([*args, "--attention", "softmax-hard"])


def test_tiny_lm_run_of_the_variants(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "".join(f"the king {i % 7} speaks to the queen {i % 5}.\n" for i in range(400))
    )
    out = tmp_path / "lm"
    args = ["lm", "--level", "char", "--corpus", str(corpus), "--out", str(out), "--steps", "2"]
    args += ["--length", "32", "--block-size", "4", "--batch-size", "4", "--eval-windows", "2"]
    assert main([*args, "--attention", "softmax-max,sinkhorn-leaky,local", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "Softmax routing, max pooling (softmax-max)" in printed and "NOT causal" in printed
    results = json.loads((out / "results.json").read_text())
    rows = {r["kind"]: r for r in results["results"]}
    assert rows["softmax-max"]["config"]["attention"]["pooling"] == "max"
    assert 0.0 < rows["softmax-max"]["eval"][PREV_MASS] <= 1.0
    assert PREV_MASS not in rows["local"]["eval"]
    assert results["ranking"]["metric"] == "test/bits_per_char"
    assert len(results["ranking"]["order"]) == 3
