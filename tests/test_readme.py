"""Every code block of the README runs or names something that exists.

Python blocks are executed as printed (each in a fresh namespace, in a temporary directory);
shell blocks are checked command by command (make targets, ``sparse-sinkhorn`` subcommands and
flags, modules, files, extras: see ``tests/test_docs_blocks.py``). BibTeX is parsed for its
fields. The README stays a front door: at most 200 lines.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from test_docs_blocks import ROOT, Block, blocks, check_command, shell_commands

README = ROOT / "README.md"
PYTHON_BLOCKS = blocks(README, ("python",))
SHELL_BLOCKS = blocks(README, ("bash", "sh", "shell", "console"))


def test_readme_is_short_and_has_its_sections_in_order() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    order = ["## Status", "## Install", "## Quick start", "## Which configuration?",
             "## The paper's tables",
             "## Performance", "## Development", "## Citation", "## License"]  # fmt: skip
    positions = [text.index(h) for h in order]
    assert positions == sorted(positions)
    assert "https://arxiv.org/abs/2002.11296" in text
    assert "make run" in text and "make test" in text and "make gpu-check" in text


def test_every_code_block_is_covered() -> None:
    """Every fenced block has a language this test knows how to check."""
    fences = re.findall(r"^```(\w*)\s*$", README.read_text(), flags=re.M)
    opening = fences[::2]
    assert set(opening) <= {"python", "bash", "bibtex"}, opening
    assert len(PYTHON_BLOCKS) >= 3 and SHELL_BLOCKS


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda b: b.id)
def test_python_block_runs(
    block: Block,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)  # a block may write files (save_pretrained)
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(block.code, f"README.md:{block.line}", "exec"), namespace)
    if "sinkhorn_attention_with_plan" in block.code:
        assert tuple(namespace["out"].shape) == (2, 8, 1024, 64)
        assert tuple(namespace["y"].shape) == (2, 1000, 512)
        printed = capsys.readouterr().out
        assert printed.startswith(
            "SinkhornPlan(batch=2, heads=8, rows=16, blocks=16, block_size=64, causal=True"
        )
    if "LanguageModel(" in block.code:
        assert tuple(namespace["logits"].shape) == (2, 1000, 256)
        assert tuple(namespace["sample"].shape) == (2, 96)
        assert (namespace["tokens"] != namespace["cfg"].pad_id).all()
    if "hf.convert" in block.code:
        options = namespace["model"].config.sinkhorn_attention
        assert options["sort_net"] == "bilinear" and options["block_size"] == 64


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=lambda b: b.id)
def test_shell_commands_exist(block: Block) -> None:
    commands = shell_commands(block.code)
    assert commands
    for cmd in commands:
        check_command(cmd)


def test_table_commands_exist() -> None:
    """The paper-table commands (``sub --flag``, in backticks) name real subcommands and flags."""
    text = README.read_text().split("## The paper's tables", 1)[1].split("## Performance", 1)[0]
    shown = re.findall(r"`((?:sort|ablate|lm|image|classify|nli|recall)\b[^`]*)`", text)
    assert len(shown) >= 10
    for cmd in shown:
        check_command(f"sparse-sinkhorn {cmd}")
    check_command("sparse-sinkhorn sort --overwrite --jobs 2")


def test_bibtex_names_the_paper() -> None:
    (bib,) = blocks(README, ("bibtex",))
    for needle in ("Sparse {S}inkhorn Attention", "Tay, Yi", "Bahri, Dara", "Yang, Liu",
                   "Metzler, Donald", "Juan, Da-Cheng", "year      = {2020}"):  # fmt: skip
        assert needle in bib.code
    assert bib.code.count("{") == bib.code.count("}")
