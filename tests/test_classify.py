"""Classification and NLI experiments (paper Tables 6 and 7): padding invariance of the
classifier, tiny end-to-end runs on generated data, the saved tokenizer, and bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from sparse_sinkhorn.cli import main
from sparse_sinkhorn.data import Tokenizer, collate
from sparse_sinkhorn.experiments.classify_common import (
    VARIANTS,
    attention_memory,
    evaluate,
    held_out,
    load_texts,
    text_dataset,
)
from sparse_sinkhorn.models import Classifier, ClassifierConfig
from sparse_sinkhorn.nn import AttentionConfig
from sparse_sinkhorn.train import load_model_weights, read_config

SMALL = dict(vocab_size=20, d_model=16, n_heads=2, n_layers=2, d_ff=32, dropout=0.0)
KINDS = {
    "dense": dict(kind="dense"),
    "local": dict(kind="local"),
    "sinkhorn": dict(kind="sinkhorn"),
    "sortcut": dict(kind="sinkhorn", n_sortcut=2),
}


def _model(kind: str, pair: str = "none") -> Classifier:
    attention = AttentionConfig(block_size=4, max_len=64, **KINDS[kind])  # type: ignore[arg-type]
    cfg = ClassifierConfig(**SMALL, n_classes=3, pair=pair, attention=attention)  # type: ignore[arg-type]
    return Classifier(cfg).double().eval()


@pytest.mark.parametrize("length", [3, 11])  # 3 < n*b = 8: shorter than the SortCut budget
@pytest.mark.parametrize("kind", list(KINDS))
def test_padding_does_not_change_logits(kind: str, length: int) -> None:
    """One example alone == the same example padded inside a longer batch (collate)."""
    model = _model(kind)
    a = torch.randint(4, 20, (length,))
    b = torch.randint(4, 20, (29,))
    alone = model(*collate([(a, 0)])[:2])
    ids, mask, _ = collate([(a, 0), (b, 1)])
    assert ids.shape == (2, 29) and mask[0].sum() == length
    batched = model(ids, mask)
    torch.testing.assert_close(batched[:1], alone, atol=1e-10, rtol=0)
    # the padded positions' content is irrelevant too
    junk = ids.clone()
    junk[0, length:] = torch.randint(4, 20, (29 - length,))
    torch.testing.assert_close(model(junk, mask)[:1], alone, atol=1e-10, rtol=0)


@pytest.mark.parametrize("pair", ["separate", "concat"])
@pytest.mark.parametrize("kind", ["dense", "sortcut"])
def test_pair_padding_does_not_change_logits(kind: str, pair: str) -> None:
    model = _model(kind, pair)
    p, h = torch.randint(4, 20, (1, 6)), torch.randint(4, 20, (1, 3))
    pad = torch.zeros(1, 14, dtype=torch.long)
    if pair == "separate":
        alone = model(p, ids_b=h)
        padded = model(torch.cat([p, pad], 1), ids_b=torch.cat([h, pad], 1))
    else:
        ids, seg = torch.cat([p, h], 1), torch.tensor([[0] * 6 + [1] * 3])
        alone = model(ids, segment_ids=seg)
        padded = model(torch.cat([ids, pad], 1), segment_ids=torch.cat([seg, pad], 1))
    torch.testing.assert_close(padded, alone, atol=1e-10, rtol=0)


def test_sortcut_short_input_is_padded_to_the_budget() -> None:
    model = _model("sortcut")
    assert model.min_length() == 8
    one_token = model(torch.tensor([[5]]))  # one block < n_sortcut = 2: padded internally
    assert torch.isfinite(one_token).all()
    padded = model(torch.tensor([[5] + [0] * 15]))
    torch.testing.assert_close(padded, one_token, atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match=r"n_sortcut \* block_size = 2 \* 32 = 64"):
        Classifier(
            ClassifierConfig(
                **SMALL,  # type: ignore[arg-type]
                attention=AttentionConfig(block_size=32, max_len=48, n_sortcut=2),
            )
        )


def test_attention_memory_is_analytic() -> None:
    assert attention_memory(VARIANTS["dense"], 512, 32) == 512**2
    assert attention_memory(VARIANTS["local"], 512, 32) == 512 * 32
    assert attention_memory(VARIANTS["sinkhorn"], 512, 32) == 512 * 64 + 16**2
    assert attention_memory(VARIANTS["sortcut-2x8"], 512, 32) == 512 * 16 + 64**2
    assert attention_memory(VARIANTS["sortcut-2x32"], 100, 8) == 100 * 64 + 4**2  # N = ceil


# --------------------------------------------------------------------------- generated data

WORDS = [
    "the",
    "a",
    "film",
    "movie",
    "plot",
    "actor",
    "scene",
    "story",
    "it",
    "was",
    "is",
    "and",
    "of",
]


def _review(rng: random.Random, label: int) -> str:
    cue = ["bad", "awful", "boring"] if label == 0 else ["good", "great", "superb"]
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 30))]
    words.insert(rng.randrange(len(words)), rng.choice(cue))
    return " ".join(words) + "."


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _imdb_jsonl(root: Path, n_train: int = 48, n_test: int = 16) -> None:
    rng = random.Random(0)
    for split, n in (("train", n_train), ("test", n_test)):
        rows = [{"text": _review(rng, i % 2), "label": i % 2} for i in range(n)]
        _write_jsonl(root / "imdb" / f"{split}.jsonl", rows)


def _aclimdb(root: Path) -> None:
    rng = random.Random(1)
    for split in ("train", "test"):
        for label, polarity in enumerate(("neg", "pos")):
            folder = root / "imdb" / "aclImdb" / split / polarity
            folder.mkdir(parents=True)
            for i in range(12):
                (folder / f"{i}_7.txt").write_text(_review(rng, label) + " <br /><br />end")


def _snli(root: Path) -> None:
    rng = random.Random(2)
    gold = ["entailment", "neutral", "contradiction", "-"]
    for split, n in (("train", 48), ("test", 16)):
        rows = [
            {
                "sentence1": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))),
                "sentence2": f"{gold[i % 4]} " + rng.choice(WORDS),
                "gold_label": gold[i % 4],
            }
            for i in range(n)
        ]
        _write_jsonl(root / "snli" / f"snli_1.0_{split}.jsonl", rows)


TINY = ["--d-model", "16", "--block-size", "4", "--batch-size", "8", "--no-progress"]


def _run(task: str, data: Path, out: Path, *extra: str) -> dict:
    code = main([task, "--data-dir", str(data), "--out", str(out), "--steps", "3", *TINY, *extra])
    assert code == 0
    return json.loads((out / "results.json").read_text())


def test_classify_end_to_end_tokenizer_and_checkpoint_round_trip(tmp_path: Path) -> None:
    _imdb_jsonl(tmp_path / "data")
    out = tmp_path / "run"
    res = _run(
        "classify", tmp_path / "data", out, "--dataset", "imdb", "--attention",
        "dense,sortcut-2x8", "--max-tokens", "24",
    )  # fmt: skip
    assert [r["attention"] for r in res["results"]] == ["dense", "sortcut-2x8"]
    assert res["eval_split"] == "test" and res["pair_encoding"] == "none"
    assert res["results"][1]["memory"] == 24 * 16 + 3**2
    assert all(0 <= r["accuracy"] <= 100 and r["eval_examples"] == 16 for r in res["results"])
    assert (out / "accuracy_vs_memory.png").stat().st_size > 0
    assert "85.12" in (out / "results.md").read_text()  # the paper's Transformer row
    # the tokenizer saved with the run reproduces the run's vocabulary and its accuracy
    tok = Tokenizer.load(out / "tokenizer.json")
    assert (out / "sortcut-2x8" / "seed0" / "tokenizer.json").read_bytes() == (
        out / "tokenizer.json"
    ).read_bytes()
    assert tok.decode(tok.encode("the Film was GOOD .")) == "the film was good ."
    for r in res["results"]:
        saved = read_config(out / r["attention"] / "seed0")["model_config"]
        assert saved["vocab_size"] == tok.vocab_size
        cfg = ClassifierConfig.from_dict(saved)
        model = Classifier(cfg)
        load_model_weights(out / r["attention"] / "seed0", model)
        test = load_texts("imdb", "test", str(tmp_path / "data"))
        data = text_dataset(tok, test, 24, list(range(len(test))))
        again = evaluate(model, data, "none", tok.pad_id, batch_size=5)["accuracy"]
        assert again == pytest.approx(r["accuracy"])
    # a second fresh run into the same directory is refused; --resume continues
    with pytest.raises(SystemExit, match="--resume"):
        _run("classify", tmp_path / "data", out, "--dataset", "imdb", "--attention", "dense")
    again_res = _run(
        "classify", tmp_path / "data", out, "--dataset", "imdb", "--attention", "dense",
        "--max-tokens", "24", "--resume",
    )  # fmt: skip
    assert [r["attention"] for r in again_res["results"]] == ["dense", "sortcut-2x8"]
    assert again_res["results"][0]["accuracy"] == pytest.approx(res["results"][0]["accuracy"])


def test_classify_reads_aclimdb_char_level(tmp_path: Path) -> None:
    _aclimdb(tmp_path / "data")
    texts = load_texts("imdb", "train", str(tmp_path / "data"))
    assert len(texts) == 24 and texts.labels.count(1) == 12 and "<br />" not in texts.texts[0]
    out = tmp_path / "char"
    res = _run(
        "classify", tmp_path / "data", out, "--dataset", "imdb", "--level", "char",
        "--attention", "sinkhorn", "--max-tokens", "40",
    )  # fmt: skip
    assert res["level"] == "char" and res["results"][0]["eval_examples"] == 24
    tok = Tokenizer.load(out / "tokenizer.json")
    assert tok.decode(tok.encode("great film")) == "great film"  # characters round-trip


@pytest.mark.parametrize("pair", ["separate", "concat"])
def test_nli_end_to_end(tmp_path: Path, pair: str) -> None:
    _snli(tmp_path / "data")
    attention = "local,sortcut-2x8" if pair == "separate" else "sinkhorn"
    res = _run(
        "nli", tmp_path / "data", tmp_path / "run", "--dataset", "snli", "--pair", pair,
        "--attention", attention, "--max-tokens", "16",
    )  # fmt: skip
    assert res["pair_encoding"] == pair and res["eval_split"] == "test"
    assert all(r["eval_examples"] == 12 for r in res["results"])  # "-" rows dropped
    assert (
        res["results"][0]["config"]["pair"] == pair
        and res["results"][0]["config"]["n_classes"] == 3
    )
    assert res["paper"] == {"dense": 78.87, "sortcut-2x16": 80.30}
    if pair == "concat":  # [CLS] p [SEP] h: L = 2 * 16 + 2 = 34, N = 9 blocks of 4
        assert res["results"][0]["memory"] == 34 * 8 + 9**2


@pytest.mark.usefixtures("one_thread")
def test_nli_defaults_to_concatenation_and_reports_dev_and_test(tmp_path: Path) -> None:
    """Without a dev file, a fixed tenth of the training pairs is held out as dev (and not
    trained on); with one, that file is the dev split."""
    _snli(tmp_path / "data")
    res = _run(
        "nli", tmp_path / "data", tmp_path / "run", "--dataset", "snli", "--attention", "dense",
        "--max-tokens", "16",
    )  # fmt: skip
    assert res["pair_encoding"] == "concat"
    r = res["results"][0]
    n_train = 36  # 48 rows, "-" rows dropped
    assert list(r["examples_by_split"]) == ["test", "dev (held out from train)"]
    assert r["examples_by_split"]["dev (held out from train)"] == n_train // 10
    assert "dev (held out from train) accuracy %" in (tmp_path / "run" / "results.md").read_text()
    dev, train = held_out(n_train)
    assert len(dev) == n_train // 10 and not set(dev) & set(train)
    assert sorted(dev + train) == list(range(n_train)) and held_out(n_train) == (dev, train)
    # Several seeds: one run directory each, mean ± std over them in the table.
    res = _run(
        "nli", tmp_path / "data", tmp_path / "seeds", "--dataset", "snli", "--attention",
        "dense", "--max-tokens", "16", "--seeds", "2", "--seed", "5",
    )  # fmt: skip
    r = res["results"][0]
    assert [run["seed"] for run in r["runs"]] == [5, 6]
    accs = [run["accuracy_by_split"]["test"] for run in r["runs"]]
    assert r["accuracy"] == pytest.approx(sum(accs) / 2)
    assert r["accuracy_std"] == pytest.approx(abs(accs[0] - accs[1]) / 2**0.5)
    assert all((tmp_path / "seeds" / "dense" / f"seed{s}").is_dir() for s in (5, 6))
    assert " ± " in (tmp_path / "seeds" / "results.md").read_text()
    # --jobs 2 (two one-thread worker processes): the runs of one process, figure for figure.
    jobs = _run(
        "nli", tmp_path / "data", tmp_path / "jobs", "--dataset", "snli", "--attention",
        "dense", "--max-tokens", "16", "--seeds", "2", "--seed", "5", "--jobs", "2",
    )  # fmt: skip
    fields = ("seed", "accuracy_by_split", "train_loss")
    assert [{k: run[k] for k in fields} for run in jobs["results"][0]["runs"]] == [
        {k: run[k] for k in fields} for run in r["runs"]
    ]
    # An SNLI dev file is used as it is.
    root = tmp_path / "data" / "snli"
    (root / "snli_1.0_dev.jsonl").write_bytes((root / "snli_1.0_test.jsonl").read_bytes())
    res = _run(
        "nli", tmp_path / "data", tmp_path / "run2", "--dataset", "snli", "--attention", "dense",
        "--max-tokens", "16",
    )  # fmt: skip
    assert res["results"][0]["examples_by_split"] == {"test": 12, "dev": 12}


def test_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as err:
        main(["classify", "--dataset", "yelp"])
    assert err.value.code == 2 and "invalid choice: 'yelp'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(["nli", "--dataset", "imdb"])
    assert err.value.code == 2
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    with pytest.raises(SystemExit, match="unknown attention kind 'sortcut-3x8'"):
        main(["classify", "--dataset", "mr", "--attention", "sortcut-3x8", "--out", out])
    with pytest.raises(SystemExit, match="sparse-sinkhorn data fetch imdb"):
        main(["classify", "--dataset", "imdb", "--data-dir", data, "--out", out])
    with pytest.raises(SystemExit, match="sparse-sinkhorn data fetch mnli"):
        main(["nli", "--dataset", "mnli", "--data-dir", data, "--out", out])
    with pytest.raises(SystemExit, match="sparse-sinkhorn data fetch mr"):
        main(["classify", "--dataset", "sst", "--data-dir", data, "--out", out])
    with pytest.raises(SystemExit, match="--steps must be > 0"):
        main(["classify", "--dataset", "mr", "--steps", "0", "--out", out])
    with pytest.raises(SystemExit, match="no run directory"):
        main(["classify", "--dataset", "mr", "--resume", "--out", str(tmp_path / "nope")])


def test_max_len_flag_is_the_former_name_of_max_tokens(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--max-len`` sets what ``--max-tokens`` sets and says it is renamed; ``--help`` lists
    only ``--max-tokens``."""
    from sparse_sinkhorn.cli import build_parser

    parser = build_parser()
    for task, dataset in (("classify", "imdb"), ("nli", "snli")):
        args = parser.parse_args([task, "--dataset", dataset, "--max-len", "24"])
        assert args.max_tokens == 24
        assert "--max-len is renamed --max-tokens" in capsys.readouterr().err
        args = parser.parse_args([task, "--dataset", dataset, "--max-tokens", "8"])
        assert args.max_tokens == 8
    with pytest.raises(SystemExit):
        parser.parse_args(["classify", "--help"])
    help_text = capsys.readouterr().out
    assert "--max-tokens" in help_text and "--max-len" not in help_text


@pytest.mark.parametrize("preset", ["cpu", "paper"])
def test_every_preset_builds_every_variant(preset: str) -> None:
    from sparse_sinkhorn.experiments.classify import model_config
    from sparse_sinkhorn.experiments.presets import CLASSIFY_SIZES, classify_preset

    for dataset, level in CLASSIFY_SIZES:
        p = classify_preset(dataset, level, preset)
        pair = "separate" if dataset in ("snli", "mnli") else "none"
        for v in VARIANTS.values():
            cfg = model_config(p, v, vocab_size=100, n_classes=3, pair=pair, pad_id=0)
            att = cfg.attention
            assert (
                att.max_len >= p.max_tokens and att.max_len >= (att.n_sortcut or 1) * att.block_size
            )
