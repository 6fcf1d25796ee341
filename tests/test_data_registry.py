"""Data directory, missing-dataset errors, the fetch driver (offline) and ``data list``."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_sinkhorn.data import (
    DatasetNotFoundError,
    dataset_dir,
    load_images,
    load_text_classification,
    resolve_data_dir,
)
from sparse_sinkhorn.data import cli as data_cli
from sparse_sinkhorn.data import fetch as fetch_mod
from sparse_sinkhorn.data.fetch import Built, FetchError
from sparse_sinkhorn.data.sources import balanced_split, markdown_play_to_text


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sparse-sinkhorn")
    data_cli.add_subparser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_resolve_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPARSE_SINKHORN_DATA", raising=False)
    assert resolve_data_dir().parts[-3:] == (".cache", "sparse-sinkhorn", "data")
    monkeypatch.setenv("SPARSE_SINKHORN_DATA", str(tmp_path / "env"))
    assert resolve_data_dir() == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"


def test_missing_dataset_names_fetch_command(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run: sparse-sinkhorn data fetch imdb") as info:
        load_text_classification("imdb", "train", data_dir=tmp_path)
    assert isinstance(info.value, DatasetNotFoundError)
    assert "dataset 'imdb' not found in" in str(info.value) and str(tmp_path) in str(info.value)
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        load_images("cifar10", "train", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        dataset_dir("imagenet", tmp_path)


def test_data_list_on_empty_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _parse(["data", "list", "--data-dir", str(tmp_path / "empty")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    for name in ("shakespeare", "fashion-mnist", "mnist", "cifar10", "imdb", "mr", "snli", "mnli"):
        assert name in out
    assert "present" not in out and out.count("missing") == 8


def test_data_without_subcommand_prints_usage(capsys: pytest.CaptureFixture[str]) -> None:
    args = _parse(["data"])
    assert args.func(args) == 2


def _fake_builder(scratch: Path, out: Path, timeout: float) -> Built:
    (out / "train.jsonl").write_text('{"text": "good", "label": 1}\n', encoding="utf-8")
    (out / "test.jsonl").write_text('{"text": "bad", "label": 0}\n', encoding="utf-8")
    return Built("test:fake", {"train": 1, "test": 1}, "generated in a test")


def test_fetch_driver_writes_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from sparse_sinkhorn.data import checksums, sources

    monkeypatch.setitem(sources.BUILDERS, "mr", _fake_builder)
    manifest = fetch_mod.fetch("mr", tmp_path)
    assert manifest["counts"] == {"train": 1, "test": 1}
    on_disk = json.loads((tmp_path / "mr" / "manifest.json").read_text())
    assert set(on_disk["files"]) == {"train.jsonl", "test.jsonl"}
    assert load_text_classification("mr", "train", tmp_path).texts == ["good"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # staging removed
    args = _parse(["data", "list", "--data-dir", str(tmp_path)])
    assert args.func(args) == 0
    assert "train=1, test=1" in capsys.readouterr().out

    monkeypatch.setitem(checksums.EXPECTED, ("mr", "test:fake"), {"counts": {"train": 2}})
    with pytest.raises(FetchError, match="differ from the expected"):
        fetch_mod.fetch("mr", tmp_path, force=True)
    assert (tmp_path / "mr" / "train.jsonl").exists()  # the old copy survives a failed fetch


def test_unfetchable_dataset_explains_where_to_put_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sparse_sinkhorn.data import sources

    monkeypatch.setattr(sources, "try_urls", lambda urls, dest, timeout: False)
    with pytest.raises(FetchError, match="not fetchable here") as info:
        fetch_mod.fetch("cifar10", tmp_path)
    assert str(tmp_path / "cifar10" / "cifar-10-batches-py") in str(info.value)
    monkeypatch.setattr(sources, "try_urls", lambda urls, dest, timeout: False)
    args = _parse(["data", "fetch", "mnli", "--data-dir", str(tmp_path)])
    assert args.func(args) == 1


def test_markdown_play_to_text() -> None:
    md = (
        "# Macbeth\n\n## ACT I\n\n### SCENE I. A desert place.\n\n"
        "_Thunder and lightning. Enter three Witches_\n\n"
        "**First Witch**  \nWhen shall we three meet again  \n\\[Aside] I come\\--\n\n"
        "*Exeunt.*\n"
    )
    assert markdown_play_to_text(md) == (
        "Macbeth\n\nACT I\n\nSCENE I. A desert place.\n\n"
        "Thunder and lightning. Enter three Witches\n\n"
        "First Witch:\nWhen shall we three meet again\n[Aside] I come--\n\nExeunt.\n"
    )


def test_balanced_split_is_fixed_and_balanced() -> None:
    labels = [0] * 50 + [1] * 50
    train, test = balanced_split(labels, 0.2)
    assert len(test) == 20 and len(train) == 80
    assert sum(labels[i] for i in test) == 10
    assert set(train).isdisjoint(test) and set(train) | set(test) == set(range(100))
    assert balanced_split(labels, 0.2) == (train, test)
    with pytest.raises(ValueError, match=r"got 1\.5"):
        balanced_split(labels, 1.5)


def test_import_does_not_need_tokenizers() -> None:
    code = "import sys, sparse_sinkhorn.data; sys.exit('tokenizers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
