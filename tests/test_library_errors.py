"""Bad library input is one ValueError/TypeError naming the argument, never a deep failure."""

from __future__ import annotations

import pytest
import torch

from sparse_sinkhorn import SinkhornSelfAttention, sinkhorn_attention
from sparse_sinkhorn.models import LanguageModel, LanguageModelConfig
from sparse_sinkhorn.nn import AttentionConfig
from sparse_sinkhorn.ops import dense_attention, local_attention

Q = torch.randn(2, 2, 8, 4)
LOGITS = torch.randn(2, 2, 2, 2)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: sinkhorn_attention(Q[:, :, :0], Q[:, :, :0], Q[:, :, :0], LOGITS[..., :0, :0],
                                    block_size=4), ValueError, "empty dimension"),
        (lambda: dense_attention(Q[:0], Q[:0], Q[:0]), ValueError, "empty dimension"),
        (lambda: local_attention(Q[..., :0], Q[..., :0], Q[..., :0], block_size=4),
         ValueError, "empty dimension"),
        (lambda: sinkhorn_attention(Q, Q, Q, LOGITS, block_size=4, key_padding_mask=[[True] * 8]),
         TypeError, "key_padding_mask must be a torch.Tensor"),
        (lambda: sinkhorn_attention(Q, Q, Q, LOGITS.to("meta"), block_size=4),
         ValueError, "sort_logits is on meta"),
        (lambda: dense_attention(Q, Q, Q, key_padding_mask=torch.ones(2, 8, dtype=torch.bool,
                                                                      device="meta")),
         ValueError, "key_padding_mask is on meta"),
        (lambda: sinkhorn_attention(Q, Q, Q, LOGITS, block_size=4, scale=float("inf")),
         ValueError, "scale must be > 0"),
        (lambda: sinkhorn_attention(Q, Q, Q, LOGITS, block_size=4, temperature=float("nan")),
         ValueError, "temperature must be > 0"),
        (lambda: sinkhorn_attention(Q, Q, Q, LOGITS, block_size=4, temperature="hot"),
         TypeError, "temperature must be a real number"),
        (lambda: dense_attention(Q, Q, Q, dropout_p=-0.1), ValueError, "dropout_p must be >= 0"),
        (lambda: SinkhornSelfAttention(8, 0), ValueError, "n_heads must be a positive int"),
        (lambda: SinkhornSelfAttention(0, 2), ValueError, "d_model must be a positive int"),
        (lambda: SinkhornSelfAttention(8, 2, dropout=-0.5), ValueError, "dropout must be"),
        (lambda: AttentionConfig(block_size="8"), TypeError, "block_size must be int"),
        (lambda: AttentionConfig(temperature=float("inf")), ValueError,
         "temperature must be a finite number, got inf"),
        (lambda: AttentionConfig(routing_loss=float("nan")), ValueError,
         "routing_loss must be a finite number, got nan"),
        (lambda: LanguageModelConfig(vocab_size=10, d_model=2.5), TypeError, "d_model must be int"),
        (lambda: LanguageModelConfig(vocab_size=10, attention={"bogus": 1}), TypeError, "bogus"),
    ],
)  # fmt: skip
def test_bad_argument_is_one_clear_error(call, error, match) -> None:
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("ids", [[[0, 10]], [[-1, 2]], [[]]])
def test_token_ids_out_of_range_or_empty(ids) -> None:
    att = AttentionConfig(kind="dense", block_size=4, max_len=16)
    model = LanguageModel(LanguageModelConfig(vocab_size=10, d_model=8, n_heads=2, attention=att))
    with pytest.raises(ValueError, match=r"outside the vocabulary|empty"):
        model(torch.tensor(ids, dtype=torch.long).reshape(1, -1))


def test_every_library_error_type_derives_from_one_base() -> None:
    """The command catches one type: every exception class the package defines is a
    ``SparseSinkhornError`` (the CLI's own exit, ExitWithError, and its SIGTERM interrupt,
    Terminated, excepted)."""
    import importlib
    import inspect
    import pkgutil

    import sparse_sinkhorn
    from sparse_sinkhorn.errors import SparseSinkhornError

    found = []
    for info in pkgutil.walk_packages(sparse_sinkhorn.__path__, "sparse_sinkhorn."):
        try:
            module = importlib.import_module(info.name)
        except ImportError:  # an extra this build lacks
            continue
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == info.name:
                found.append(cls)
    assert len(found) >= 7
    stray = [c.__qualname__ for c in found if not issubclass(c, SparseSinkhornError)]
    assert sorted(stray) == ["ExitWithError", "Terminated"]


def test_a_missing_extra_is_one_line_naming_the_install() -> None:
    """A core-only install (no numpy: the train/data extras missing) running the command gets
    one line saying what to install, not a traceback."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['numpy'] = None\n"  # what an install without numpy sees
        "from sparse_sinkhorn.cli import main\n"
        "sys.exit(main(['sort', '--help']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.startswith("sparse-sinkhorn:")]
    assert lines == [
        "sparse-sinkhorn: error: the command needs the 'numpy' package, which is not "
        "installed; install the extras it comes with: pip install 'sparse-sinkhorn[train,data]'"
    ]
    assert "Traceback" not in done.stderr
