"""The README's first example runs as printed (the API it shows exists and behaves so)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.usefixtures("one_thread")
def test_the_op_in_ten_lines_runs(capsys: pytest.CaptureFixture[str]) -> None:
    section = README.read_text().split("## The op in ten lines", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert code is not None
    namespace: dict = {}
    exec(compile(code.group(1), "README.md", "exec"), namespace)
    assert tuple(namespace["out"].shape) == (2, 8, 1024, 64)
    assert tuple(namespace["y"].shape) == (2, 1000, 512)
    printed = capsys.readouterr().out
    assert printed.startswith(
        "SinkhornPlan(batch=2, heads=8, rows=16, blocks=16, block_size=64, causal=True"
    )
