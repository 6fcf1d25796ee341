"""Shared test set-up: markers that skip cleanly (gpu, slow, compile)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")
    parser.addoption("--skip-compile", action="store_true", help="skip tests marked compile")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_slow = pytest.mark.skip(reason="slow: pass --runslow")
    no_compiler = shutil.which("cc") is None and shutil.which("gcc") is None
    skip_compile = pytest.mark.skip(reason="torch.compile needs a C compiler (or --skip-compile)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "compile" in item.keywords and (no_compiler or config.getoption("--skip-compile")):
            item.add_marker(skip_compile)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module: tiny tensors run ~10x faster on a shared CPU, and it is
    what ``--jobs`` worker processes use, so in-process runs compare bit for bit with theirs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
