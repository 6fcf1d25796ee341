"""Nonsense arguments and unusable paths for every subcommand: exit status 2, one line on
stderr, no traceback (see ``helpers_cli.assert_one_line_error``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers_cli import assert_one_line_error

BIG = str(10**20)


def _cases(tmp: Path) -> list[list[str]]:
    afile = tmp / "afile"
    afile.write_text("x")
    empty = tmp / "empty"
    empty.mkdir(exist_ok=True)
    out = ["--out", str(tmp / "out"), "--no-progress"]
    cases = []
    for cmd in (["sort"], ["lm", "--level", "char"], ["image", "--dataset", "mnist"],
                ["classify", "--dataset", "mr"], ["nli", "--dataset", "snli"]):  # fmt: skip
        cases += [
            [*cmd, "--seed", BIG, *out],
            [*cmd, "--seed", "-1", *out],
            [*cmd, "--steps", "0", *out],
            [*cmd, "--steps", "abc", *out],
            [*cmd, "--preset", "huge", *out],
            [*cmd, "--attention", "quantum", *out],
            [*cmd, "--resume", "--out", str(tmp / "never-ran")],
            [*cmd, "--resume", "--overwrite", *out],
        ]
        if cmd[0] != "sort":
            cases += [
                [*cmd, "--data-dir", str(afile), *out],
                [*cmd, "--data-dir", str(empty), *out],
            ]
    cases += [
        ["sort", "--out", str(afile), "--steps", "1"],
        ["sort", "--block-size", "-3", *out],
        ["generate", "--run", str(afile)],
        ["generate", "--run", str(tmp / "missing")],
        ["generate", "--run", str(empty)],
        ["generate", "--run", str(empty), "--temperature", "nan"],
        ["generate", "--run", str(empty), "--temperature", "-1"],
        ["generate", "--run", str(empty), "--top-k", "0"],
        ["generate", "--run", str(empty), "--tokens", "0"],
        ["generate", "--run", str(empty), "--samples", "0"],
        ["data", "fetch", "no-such-dataset", "--data-dir", str(empty)],
        ["data", "list", "--data-dir", str(afile)],
        ["nosuchcommand"],
    ]
    return cases


@pytest.fixture(scope="module")
def battery(tmp_path_factory: pytest.TempPathFactory) -> list[list[str]]:
    return _cases(tmp_path_factory.mktemp("cli"))


def test_every_case_is_one_line_and_exit_2(
    battery: list[list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    failures = []
    for argv in battery:
        try:
            assert_one_line_error(argv, capsys)
        except AssertionError as err:
            failures.append(f"{argv}: {err}")
    assert not failures, "\n".join(failures)
    assert len(battery) >= 60
