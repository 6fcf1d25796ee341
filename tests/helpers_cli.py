"""Run the console script in-process and read its exit status and stderr."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from sparse_sinkhorn.cli import main


def run_cli(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``(exit status, stderr)`` of ``sparse-sinkhorn *argv`` (``SystemExit`` included)."""
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else 1
    return code, capsys.readouterr().err


def assert_one_line_error(argv: Sequence[str], capsys: pytest.CaptureFixture[str], *match: str):
    """Exit status 2, exactly one stderr line starting ``sparse-sinkhorn: error:`` (or
    argparse's usage + one error line), no traceback, and every ``match`` in it."""
    code, err = run_cli(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert code == 2, (argv, code, err)
    assert "Traceback" not in err, err
    assert len(errors) == 1, err
    assert all(not line.startswith(" ") or line.startswith("usage") for line in lines), err
    for text in match:
        assert text in errors[0], (text, errors[0])
    return errors[0]
