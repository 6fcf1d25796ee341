"""The `image` subcommand and image sampling on tiny generated IDX files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_sinkhorn.cli import main
from sparse_sinkhorn.data import ImageTokens, write_idx
from sparse_sinkhorn.experiments.image import (
    N_LEVELS,
    START_ID,
    PixelSequences,
    pixel_loss,
    pixel_nll,
)
from sparse_sinkhorn.experiments.stats import bits_per_unit

TINY = ["--steps", "2", "--batch-size", "4", "--eval-images", "3", "--samples", "2"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    d = root / "fashion-mnist"
    d.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 4)):
        images = (rng.random((n, 6, 6)) * 255).astype(np.uint8)
        write_idx(d / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n, dtype=np.uint8) % 10)
    return root


class Uniform(torch.nn.Module):
    """Equal logits everywhere: 8 bits per 256-level sub-pixel."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, N_LEVELS + 2) + self.w  # start/pad columns ignored


def test_bits_per_dim_arithmetic_and_sequences() -> None:
    images = ImageTokens(np.arange(2 * 2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 2, 3))
    data = PixelSequences(images)
    inputs, targets = data[1]
    assert inputs[0] == START_ID and torch.equal(inputs[1:], targets[:-1])
    assert targets.tolist() == list(range(12, 24))  # R G B interleaved, raster order
    nats, count = pixel_nll(Uniform(), data, batch_size=1)  # type: ignore[arg-type]
    assert count == 24
    assert bits_per_unit(nats, count) == pytest.approx(8.0)
    loss, _ = pixel_loss(Uniform(), (inputs[None], targets[None]))
    assert loss.item() / math.log(2) == pytest.approx(8.0)


def test_image_end_to_end_and_generate(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "img"
    argv = ["image", "--data-dir", str(data_dir), "--out", str(out), "--attention", "sinkhorn"]
    assert main([*argv, *TINY, "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    (r,) = results["results"]
    assert 0 < r["eval"]["test/bits_per_dim"] < 20
    assert r["block_size"] == 12  # two rows of 6 pixels
    assert (out / "sinkhorn" / "seed0" / "samples.png").is_file()
    assert main([*argv, *TINY, "--no-progress", "--overwrite"]) == 0  # starts over
    png = tmp_path / "more.png"
    run = str(out / "sinkhorn")
    assert main(["generate", "--run", run, "--samples", "2", "--out", str(png)]) == 0
    assert png.is_file()


def test_image_errors(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="unknown --dataset 'svhn'"):
        main(["image", "--dataset", "svhn"])
    with pytest.raises(SystemExit, match="sparse-sinkhorn data fetch mnist"):
        main(["image", "--dataset", "mnist", "--data-dir", str(data_dir), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="cifar-10-batches-py"):
        main(["image", "--dataset", "cifar10", "--data-dir", str(data_dir)])


def test_image_several_seeds(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "seeds"
    argv = ["image", "--dataset", "fashion-mnist", "--data-dir", str(data_dir), "--out", str(out)]
    assert main([*argv, "--attention", "local", "--seeds", "2", *TINY, "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())["results"][0]
    values = [run["eval"]["test/bits_per_dim"] for run in res["runs"]]
    assert [run["seed"] for run in res["runs"]] == [0, 1] and len(set(values)) == 2
    assert res["eval"]["test/bits_per_dim"] == pytest.approx(sum(values) / 2)
    assert " ± " in (out / "results.md").read_text()
