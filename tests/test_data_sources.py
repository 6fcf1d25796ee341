"""The dataset builders' file handling, on crafted archives (nothing downloaded)."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest

from helpers_cli import run_cli
from sparse_sinkhorn.data.sources import _slim_nli_zip


def test_nli_zip_members_are_slimmed_under_their_own_names(tmp_path: Path) -> None:
    row = {"pairID": "1", "gold_label": "neutral", "sentence1": "a", "sentence2": "b",
           "sentence1_parse": "(ROOT (S a))", "genre": "fiction"}  # fmt: skip
    archive = tmp_path / "multinli_1.0.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for split, n in (("train", 3), ("dev_matched", 1)):
            lines = "\n".join(json.dumps(row) for _ in range(n)) + "\n\n"
            zf.writestr(f"multinli_1.0/multinli_1.0_{split}.jsonl", lines)
        zf.writestr("multinli_1.0/README.txt", "not read")
    out = tmp_path / "out"
    out.mkdir()
    counts = _slim_nli_zip(
        archive, "multinli_1.0/multinli_1.0_{}.jsonl", ("train", "dev_matched"), out
    )
    assert counts == {"train": 3, "dev_matched": 1}
    assert sorted(p.name for p in out.iterdir()) == [
        "multinli_1.0_dev_matched.jsonl",
        "multinli_1.0_train.jsonl",
    ]
    kept = json.loads((out / "multinli_1.0_train.jsonl").read_text().splitlines()[0])
    assert kept == {k: row[k] for k in ("pairID", "genre", "gold_label", "sentence1", "sentence2")}


def _cifar_archive(path: Path, *, link: str | None = None, drop: str | None = None) -> None:
    """A CIFAR-10 archive with the official member names; ``link``: data_batch_1 is a symbolic
    link to that target; ``drop``: that member is left out."""
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    with tarfile.open(path, "w:gz") as tf:
        for name in names:
            if name == drop:
                continue
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            if name == "data_batch_1" and link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tf.addfile(info)
                continue
            info.size = 4
            tf.addfile(info, io.BytesIO(b"data"))


@pytest.mark.parametrize(
    ("link", "drop", "member"),
    [
        ("/etc/passwd", None, "data_batch_1"),
        ("../../outside", None, "data_batch_1"),
        (None, "data_batch_2", "data_batch_2"),
    ],
    ids=["absolute-symlink", "dotdot-symlink", "missing-member"],
)
def test_a_cifar_archive_with_links_or_a_missing_member_is_one_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    link: str | None, drop: str | None, member: str,
) -> None:  # fmt: skip
    """`data fetch cifar10` of such an archive: one line naming the member (the fetch command's
    ``<dataset>: FAILED: ...``, exit status 1), nothing written outside the data directory."""
    from sparse_sinkhorn.data import sources

    def fake_download(urls, dest, timeout):  # type: ignore[no-untyped-def]
        _cifar_archive(dest, link=link, drop=drop)
        return True

    monkeypatch.setattr(sources, "try_urls", fake_download)
    data = tmp_path / "data"
    code, err = run_cli(["data", "fetch", "cifar10", "--data-dir", str(data)], capsys)
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("cifar10: FAILED: "), err
    assert f"member cifar-10-batches-py/{member} is missing or not a regular file" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    assert not (data / "cifar10").exists()
