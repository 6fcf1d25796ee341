"""The dataset builders' file handling, on crafted archives (nothing downloaded)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

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
