"""The SortNet ablation command and the K = V option it needs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sparse_sinkhorn.cli import main
from sparse_sinkhorn.experiments.ablate import VARIANTS, results_table, summarize_variant
from sparse_sinkhorn.nn import SinkhornSelfAttention
from sparse_sinkhorn.ops import sinkhorn_attention
from sparse_sinkhorn.train import read_config


def test_tiny_ablation_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ab"
    flags = ["ablate", "--out", str(out), "--steps", "3", "--seeds", "2", "--no-progress"]
    flags += ["--length", "8", "--block-size", "4", "--n-eval", "12"]
    assert main([*flags, "--variants", "linear,0-iters,kv-tied"]) == 0
    printed = capsys.readouterr().out
    assert "| 0-iters |" in printed and "52.4" in printed and " ± " in printed
    assert "runs diverged (stopped at a non-finite loss; no metrics)" in printed
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "sort" and res["settings"]["n_seeds"] == 2
    assert [r["variant"] for r in res["results"]] == ["linear", "0-iters", "kv-tied"]
    for r in res["results"]:
        assert [run["seed"] for run in r["runs"]] == [0, 1]
        assert r["diverged"] == sum("diverged" in run for run in r["runs"]) == 0
        values = [run["eval"]["dev/exact_match"] for run in r["runs"]]
        assert r["eval"]["dev/exact_match"] == pytest.approx(sum(values) / 2)
    for name, overrides in VARIANTS.items():
        if name not in ("linear", "0-iters", "kv-tied"):
            continue
        saved = read_config(out / name / "seed0")["model_config"]
        assert saved["attention"]["kind"] == "sinkhorn"
        for field, value in overrides.items():
            assert saved["attention"][field] == value
    with pytest.raises(SystemExit, match="unknown variant 'bogus'"):
        main([*flags, "--variants", "bogus"])


def test_diverged_runs_are_counted_and_shown() -> None:
    run = {"seed": 0, "eval": {}, "train_loss": None, "diverged": "step 36: the training loss"}
    fine = {"eval": {"dev/exact_match": 30.0}, "train_loss": 0.2}
    result = summarize_variant(
        "0-iters", [run, fine, {**fine, "eval": {"dev/exact_match": 32.0}}], [0, 1, 2]
    )
    assert result["diverged"] == 1 and result["finished"] == 2
    assert result["eval"] == {"dev/exact_match": 31.0}  # the runs that finished
    assert "| 31.0 ± 1.4 |" in results_table([result], "sort") and "| 1 / 3 |" in results_table(
        [result], "sort"
    )
    everyone = summarize_variant("0-iters", [run, dict(run)], [0, 1])
    assert everyone["eval"] == {} and "| 0-iters | – | – | – | 2 / 2 |" in results_table(
        [everyone], "sort"
    )


def test_a_diverging_variant_does_not_stop_the_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training stops at the first non-finite loss or gradient (NonFiniteLossError); the
    ablation records that run as diverged and trains the others. A variant with τ = 1e-30
    (logits / τ overflow) makes that certain at the first step."""
    import sparse_sinkhorn.experiments.ablate as ablate_mod

    monkeypatch.setitem(ablate_mod.VARIANTS, "tau-tiny", {"temperature": 1e-30})
    out = tmp_path / "ab"
    flags = ["ablate", "--out", str(out), "--steps", "3", "--seeds", "2", "--no-progress"]
    flags += ["--length", "8", "--block-size", "4", "--n-eval", "12", "--jobs", "2"]
    assert main([*flags, "--variants", "tau-tiny,linear"]) == 0
    printed = capsys.readouterr().out
    assert "| tau-tiny | – | – | – | 2 / 2 |" in printed
    res = {r["variant"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert res["tau-tiny"]["eval"] == {} and res["tau-tiny"]["finished"] == 0
    assert all(
        run["diverged"].startswith("step 1: the training") for run in res["tau-tiny"]["runs"]
    )
    assert res["linear"]["diverged"] == 0 and res["linear"]["finished"] == 2
    assert "dev/exact_match" in res["linear"]["eval"]  # the finished runs' mean


def test_share_kv_uses_keys_as_values() -> None:
    torch.manual_seed(0)
    layer = SinkhornSelfAttention(32, 4, block_size=4, max_len=16, share_kv=True).eval()
    assert layer.qkv.out_features == 2 * 32  # no value projection
    x = torch.randn(2, 16, 32)
    q, k = layer.qkv(x).view(2, 16, 2, 4, 8).permute(2, 0, 3, 1, 4)  # (B, H, L, E) each
    expected = sinkhorn_attention(q, k, k, layer.sort_logits(x), block_size=4, gumbel_noise=False)
    got = layer(x)
    torch.testing.assert_close(got, layer.out(expected.transpose(1, 2).reshape(2, 16, 32)))
