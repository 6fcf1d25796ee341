"""The `lm` and `generate` subcommands on tiny generated corpora (never the real data)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from helpers_cli import run_figures
from sparse_sinkhorn.cli import main
from sparse_sinkhorn.data import Tokenizer
from sparse_sinkhorn.data.corpus import load_corpus
from sparse_sinkhorn.errors import UsageError
from sparse_sinkhorn.experiments.lm import build_tokenizer, total_nll
from sparse_sinkhorn.experiments.stats import bits_per_unit, perplexity

WORDS = [
    "the",
    "king",
    "and",
    "queen",
    "of",
    "fair",
    "verona",
    "speak",
    "to",
    "thee",
    "my",
    "lord",
    "good",
    "night",
    "sweet",
    "prince",
]
TINY = ["--length", "16", "--block-size", "4", "--batch-size", "4", "--eval-windows", "2"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _text(n_lines: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(n_lines):
        idx = torch.randint(0, len(WORDS), (6,), generator=g).tolist()
        lines.append(" ".join(WORDS[i] for i in idx).capitalize() + ".")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for i, split in enumerate(("train", "valid", "test")):
        d = root / "shakespeare" / split
        d.mkdir(parents=True)
        (d / "play.txt").write_text(_text(60 if split == "train" else 8, i))
    return root


def test_bits_and_perplexity_arithmetic() -> None:
    # Uniform over 4 symbols: 2 bits, perplexity 4.
    assert bits_per_unit(10 * math.log(4), 10) == pytest.approx(2.0)
    assert perplexity(10 * math.log(4), 10) == pytest.approx(4.0)
    assert bits_per_unit(0.0, 3) == 0.0
    with pytest.raises(ValueError, match="count"):
        bits_per_unit(1.0, 0)


def test_total_nll_counts_every_target() -> None:
    class Uniform(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return torch.zeros(*ids.shape, 8) + self.w  # (B, L, 8): uniform over 8

    data = [(torch.zeros(5, dtype=torch.long), torch.ones(5, dtype=torch.long))] * 3
    nats, count = total_nll(Uniform(), data, batch_size=2)  # type: ignore[arg-type]
    assert count == 15
    assert bits_per_unit(nats, count) == pytest.approx(3.0)


@pytest.mark.parametrize("level", ["char", "subword"])
def test_tokenizer_save_load_round_trip(level: str, tmp_path: Path) -> None:
    text = _text(40, 0)
    tok = build_tokenizer(level, text, 300)
    tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path / "tokenizer.json")
    sample = "Good night sweet prince.\nThe king"  # characters of the training text
    assert again.encode(sample) == tok.encode(sample)
    assert again.decode(again.encode(sample)) == sample


def test_corpus_line_split(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"line {i}\n" for i in range(100)))
    corpus = load_corpus(path)
    assert corpus.train.count("\n") == 90 and corpus.valid.count("\n") == 5
    assert corpus.test.startswith("line 95")
    with pytest.raises(UsageError, match="does not exist"):
        load_corpus(tmp_path / "nope")


def test_corpus_lm1b_and_named_layouts(tmp_path: Path) -> None:
    root = tmp_path / "1-billion-word-language-modeling-benchmark-r13output"
    train_dir = root / "training-monolingual.tokenized.shuffled"
    held = root / "heldout-monolingual.tokenized.shuffled"
    train_dir.mkdir(parents=True)
    held.mkdir()
    (train_dir / "news.en-00001-of-00100").write_text("a train sentence .\n")
    (held / "news.en.heldout-00000-of-00050").write_text("the test shard .\n")
    (held / "news.en.heldout-00001-of-00050").write_text("the valid shard .\n")
    corpus = load_corpus(tmp_path)
    assert (corpus.name, corpus.train, corpus.test) == (
        "lm1b",
        "a train sentence .\n",
        "the test shard .\n",
    )
    assert corpus.valid == "the valid shard .\n"
    named = tmp_path / "named"
    named.mkdir()
    for split in ("train", "valid", "test"):
        (named / f"{split}.txt").write_text(f"{split} text\n")
    corpus = load_corpus(named, max_chars=3)
    assert (corpus.train, corpus.valid, corpus.test) == ("tra", "valid text\n", "test text\n")


def test_lm_char_end_to_end_resume_and_generate(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = ["lm", "--level", "char", "--data-dir", str(data_dir), "--out", str(out)]
    assert main([*args, "--attention", "sinkhorn", "--steps", "2", *TINY, "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    (r,) = results["results"]
    assert r["kind"] == "sinkhorn" and 0 < r["eval"]["test/bits_per_char"] < 10
    assert (out / "loss_curves.png").is_file() and (
        out / "sinkhorn" / "seed0" / "loss.png"
    ).is_file()
    tok_file = out / "sinkhorn" / "seed0" / "tokenizer.json"
    before = tok_file.read_bytes()
    assert "Sinkhorn" in capsys.readouterr().out
    resume = [*args, "--attention", "sinkhorn", "--steps", "3", *TINY, "--no-progress"]
    assert main([*resume, "--resume"]) == 0
    assert tok_file.read_bytes() == before  # the saved tokenizer is reused
    with pytest.raises(SystemExit, match="already holds a run"):
        main(resume)
    rows = [
        json.loads(x)
        for x in (out / "sinkhorn" / "seed0" / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows[-1]["step"] == 3
    capsys.readouterr()
    run = str(out / "sinkhorn")
    gen = ["generate", "--run", run, "--prompt", "The king", "--tokens", "10", "--temperature", "0"]
    assert main(gen) == 0
    cached = capsys.readouterr().out
    assert main([*gen, "--no-cache"]) == 0
    plain = capsys.readouterr().out
    assert cached.startswith("The king") and "tokens/s" in cached
    assert cached.split("\n[")[0] == plain.split("\n[")[0]  # same greedy text either way
    with pytest.raises(SystemExit, match="not in this model's vocabulary"):
        main(["generate", "--run", run, "--prompt", "Zebra€"])
    with pytest.raises(SystemExit, match="max_len"):
        main(["generate", "--run", run, "--tokens", "100000"])
    with pytest.raises(SystemExit, match=r"no run\.json"):
        main(["generate", "--run", str(tmp_path)])


def test_lm_subword_end_to_end(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sub"
    argv = ["lm", "--level", "subword", "--data-dir", str(data_dir), "--out", str(out)]
    argv += ["--attention", "dense,mixture", "--steps", "2", "--vocab-size", "300", *TINY]
    assert main([*argv, "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["kind"] for r in results["results"]] == ["dense", "mixture"]
    for r in results["results"]:
        assert r["eval"]["test/perplexity"] > 1
        assert Tokenizer.load(out / r["kind"] / "seed0" / "tokenizer.json").vocab_size <= 300
    assert (
        main(["generate", "--run", str(out / "mixture"), "--prompt", "Good", "--tokens", "5"]) == 0
    )


def test_lm_errors(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="unknown --level 'word'"):
        main(["lm", "--level", "word", "--data-dir", str(data_dir)])
    with pytest.raises(SystemExit, match="sparse-sinkhorn data fetch shakespeare"):
        main(["lm", "--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="unknown attention kind"):
        main(["lm", "--attention", "fancy", "--data-dir", str(data_dir)])
    with pytest.raises(SystemExit, match="--resume: no run directory"):
        main(["lm", "--resume", "--out", str(tmp_path / "missing"), "--data-dir", str(data_dir)])
    with pytest.raises(SystemExit, match="--corpus"):
        main(["lm", "--corpus", str(tmp_path / "nothing.txt"), "--out", str(tmp_path / "o")])


def test_lm_several_seeds(data_dir: Path, tmp_path: Path) -> None:
    """--seeds 2: one run directory per seed, the table's mean ± std over them."""
    out = tmp_path / "seeds"
    argv = ["lm", "--data-dir", str(data_dir), "--out", str(out), "--attention", "dense"]
    assert main([*argv, "--steps", "2", "--seeds", "2", "--seed", "3", *TINY, "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())["results"][0]
    assert [run["seed"] for run in res["runs"]] == [3, 4]
    values = [run["eval"]["test/bits_per_char"] for run in res["runs"]]
    assert values[0] != values[1]  # different seeds, different models
    assert res["eval"]["test/bits_per_char"] == pytest.approx(sum(values) / 2)
    assert res["eval_std"]["test/bits_per_char"] == pytest.approx(
        abs(values[0] - values[1]) / 2**0.5
    )
    assert all((out / "dense" / f"seed{s}" / "checkpoints").is_dir() for s in (3, 4))
    assert " ± " in (out / "results.md").read_text()
    # --jobs 2: the same runs in two one-thread worker processes give the same figures.
    jobs = tmp_path / "jobs"
    argv[argv.index(str(out))] = str(jobs)
    assert main([*argv, "--steps", "2", "--seeds", "2", "--seed", "3", *TINY, "--jobs", "2"]) == 0
    jobs_runs = json.loads((jobs / "results.json").read_text())["results"][0]["runs"]
    assert run_figures(jobs_runs) == run_figures(res["runs"])
