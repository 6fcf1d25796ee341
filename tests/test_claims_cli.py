"""CLI-level proofs of claims made in ``docs/guarantees.md``: a SIGKILLed Sinkhorn run resumes
bit for bit through the console script, every experiment subcommand refuses a run directory
holding an earlier run before any training, a read-only place fails in one line and leaves the
run intact, every subcommand (``ablate`` and ``recall`` included) answers nonsense with one
line and exit status 2, and ``--jobs 2`` equals ``--jobs 1`` for Sinkhorn runs (Gumbel noise
in training)."""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers_cli import assert_one_line_error, read_only_bind_works, run_cli, run_figures
from sparse_sinkhorn.cli import build_parser, main
from sparse_sinkhorn.data import write_idx

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["the", "king", "and", "queen", "of", "fair", "verona", "speak", "to", "thee", "good"]
EXPERIMENTS = ("sort", "ablate", "lm", "image", "classify", "nli", "recall")
TOOLS = ("generate", "data")


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny stand-ins for every dataset the experiments read: a Shakespeare-layout text
    corpus, Fashion-MNIST IDX files of 6 x 6 images, IMDb and SNLI JSON lines."""
    root = tmp_path_factory.mktemp("data")
    rng = random.Random(0)

    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    for split, n in (("train", 40), ("valid", 6), ("test", 6)):
        d = root / "shakespeare" / split
        d.mkdir(parents=True)
        (d / "play.txt").write_text("\n".join(words(6) for _ in range(n)) + "\n")
    d = root / "fashion-mnist"
    d.mkdir()
    pixels = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 4)):
        write_idx(
            d / f"{prefix}-images-idx3-ubyte.gz",
            (pixels.random((n, 6, 6)) * 255).astype(np.uint8),
        )
        write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n, dtype=np.uint8) % 10)
    gold = ["entailment", "neutral", "contradiction"]
    for split, n in (("train", 32), ("test", 8)):
        _jsonl(
            root / "imdb" / f"{split}.jsonl",
            [{"text": words(8), "label": i % 2} for i in range(n)],
        )
        _jsonl(
            root / "snli" / f"snli_1.0_{split}.jsonl",
            [
                {"sentence1": words(5), "sentence2": words(3), "gold_label": gold[i % 3]}
                for i in range(n)
            ],
        )
    return root


def _experiment(name: str, data: Path, out: Path) -> list[str]:
    """The smallest Sinkhorn run of each experiment subcommand (2 steps)."""
    d = str(data)
    flags = {
        "sort": ["--attention", "sinkhorn", "--length", "8", "--block-size", "4",
                 "--n-eval", "4", "--seeds", "1"],
        "ablate": ["--variants", "linear", "--length", "8", "--block-size", "4",
                   "--n-eval", "4", "--seeds", "1"],
        "lm": ["--attention", "sinkhorn", "--level", "char", "--data-dir", d, "--length", "16",
               "--block-size", "4", "--batch-size", "4", "--eval-windows", "2"],
        "image": ["--dataset", "fashion-mnist", "--attention", "sinkhorn", "--data-dir", d,
                  "--batch-size", "4", "--eval-images", "2", "--samples", "1"],
        "classify": ["--dataset", "imdb", "--attention", "sinkhorn", "--data-dir", d,
                     "--max-tokens", "16", "--block-size", "4", "--batch-size", "4",
                     "--d-model", "16"],
        "nli": ["--dataset", "snli", "--attention", "sinkhorn", "--data-dir", d,
                "--max-tokens", "8", "--block-size", "4", "--batch-size", "4", "--d-model", "16"],
        "recall": ["--task", "passkey", "--attention", "sinkhorn", "--lengths", "64",
                   "--block-size", "16", "--batch-size", "2"],
    }[name]  # fmt: skip
    return [name, *flags, "--steps", "2", "--out", str(out), "--no-progress"]


def _subcommands() -> set[str]:
    parser = build_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(actions) == 1
    return set(actions[0].choices)


def test_the_parser_has_every_subcommand() -> None:
    """The parametrized tests below cover every subcommand the console script has (the CLI
    drops a subcommand module that fails to import, so this also catches a lost one)."""
    assert _subcommands() == set(EXPERIMENTS) | set(TOOLS)


def _files(root: Path) -> dict[Path, bytes]:
    """Every file under ``root`` with its bytes, except the ``.lock`` files (they record the
    pid of the last process that held the lock)."""
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != ".lock"}


# ---- every experiment subcommand checks its run directory first -----------------------------


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_refuses_a_run_dir_holding_an_earlier_run(
    name: str,
    data_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A second run into the same ``--out`` without ``--resume``/``--overwrite`` is one line
    (exit 2) naming the run and the flags, before any training: ``train`` is never called and
    no file of the earlier run changes."""
    from sparse_sinkhorn.experiments import driver

    out = tmp_path / "out"
    argv = _experiment(name, data_dir, out)
    code, err = run_cli(argv, capsys)
    assert code == 0, err
    runs = [p for p in out.rglob("seed0") if (p / "checkpoints").is_dir()]
    assert len(runs) == 1, runs
    before = _files(out)

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("train() was called")

    monkeypatch.setattr(driver, "train", no_training)
    line = assert_one_line_error(argv, capsys, "already holds a run", "--resume", "--overwrite")
    assert str(runs[0]) in line
    assert _files(out) == before


# ---- every subcommand answers nonsense with one line and exit status 2 ----------------------


def _nonsense(name: str, tmp: Path, data: Path) -> list[list[str]]:
    """Nonsense arguments and unusable paths for subcommand ``name``."""
    afile = tmp / "afile"
    afile.write_text("x")
    empty = tmp / "empty"
    empty.mkdir(exist_ok=True)
    cases = [[name, "--no-such-flag"]]
    if name == "generate":
        return [
            *cases,
            ["generate", "--run", str(afile)],
            ["generate", "--run", str(tmp / "missing")],
            ["generate", "--run", str(empty), "--temperature", "nan"],
            ["generate", "--run", str(empty), "--top-k", "0"],
        ]
    if name == "data":
        return [
            *cases,
            ["data", "fetch", "no-such-dataset", "--data-dir", str(empty)],
            ["data", "list", "--data-dir", str(afile)],
        ]
    base = _experiment(name, data, tmp / "out")
    kind = "--variants" if name == "ablate" else "--attention"
    cases += [
        [*base, "--seed", str(10**20)],
        [*base, "--seed", "-1"],
        [*base, "--steps", "0"],
        [*base, "--steps", "abc"],
        [*base, "--seeds", "0"],
        [*base, "--jobs", "0"],
        [*base, "--preset", "huge"],
        [*base, kind, "quantum"],
        [*base, "--resume", "--out", str(tmp / "never-ran")],
        [*base, "--resume", "--overwrite"],
        [*base, "--out", str(afile)],
        [*base, "--out", str(afile / "sub")],
    ]
    if "--block-size" in base:
        cases.append([*base, "--block-size", "-3"])
    if "--data-dir" in base:
        cases += [[*base, "--data-dir", str(afile)], [*base, "--data-dir", str(empty)]]
    if name == "ablate":  # its lm task reads a corpus
        cases += [[*base, "--task", "lm", "--data-dir", str(empty)]]
    return cases


@pytest.mark.parametrize("name", EXPERIMENTS + TOOLS)
def test_every_subcommand_answers_nonsense_with_one_line_and_exit_2(
    name: str, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/guarantees.md: "every subcommand answers nonsense arguments and unusable paths with
    exit status 2 and one line on stderr, no traceback" (``ablate`` and ``recall`` are not in
    ``test_cli_battery.py``). No case trains: nothing is written under ``--out``."""
    failures = []
    for argv in _nonsense(name, tmp_path, data_dir):
        try:
            assert_one_line_error(argv, capsys)
        except AssertionError as err:
            failures.append(f"{argv[1:]}: {err}")
    assert not failures, "\n".join(failures)
    assert not (tmp_path / "out" / "results.json").exists()


# ---- a read-only place fails cleanly --------------------------------------------------------


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SPARSE_SINKHORN_DEBUG"}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cli_process(argv: list[str], prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*(prefix or []), sys.executable, "-m", "sparse_sinkhorn.cli", *argv],
        capture_output=True, text=True, timeout=120, env=_env(),
    )  # fmt: skip


SORT = ["sort", "--attention", "sinkhorn", "--length", "8", "--block-size", "4", "--n-eval", "4"]


def test_a_read_only_checkpoints_dir_is_one_line_and_leaves_the_run_intact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/guarantees.md: a read-only place "leaves the previous state intact and is reported
    in one line naming the file". The place is really read-only: the run's ``checkpoints``
    directory is bind-mounted read-only in a private mount namespace (``unshare -rm``; root
    ignores permission bits), while ``--out`` stays writable, so the failure comes at the
    checkpoint write itself, not from the up-front ``--out`` check. Then, writable again, the
    run resumes."""
    out = tmp_path / "out"
    argv = [*SORT, "--seeds", "1", "--out", str(out), "--no-progress"]
    # In subprocesses: a command holds its --out's lock until its process exits.
    first = _cli_process([*argv, "--steps", "4"])
    assert first.returncode == 0, first.stderr
    ckpts = out / "sinkhorn" / "seed0" / "checkpoints"
    if not read_only_bind_works(ckpts):
        pytest.skip("no read-only bind mounts here (unshare -rm not permitted)")
    before = _files(out)
    mount = f'mount --bind {ckpts} {ckpts} && mount -o remount,bind,ro {ckpts} && exec "$@"'
    done = _cli_process(
        [*argv, "--steps", "8", "--resume"], ["unshare", "-rm", "sh", "-c", mount, "sh"]
    )
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(errors) == 1, done.stderr
    assert errors[0].startswith("sparse-sinkhorn: error: Read-only file system: "), errors[0]
    assert str(ckpts) in errors[0], errors[0]
    assert _files(out) == before
    assert run_cli([*argv, "--steps", "8", "--resume"], capsys)[0] == 0
    assert (ckpts / "step_0000008").is_dir()


# ---- SIGKILL and --resume of a Sinkhorn run through the console script ----------------------

SCRIPT = Path(sys.executable).parent / "sparse-sinkhorn"
KILL_STEPS = 40  # sort checkpoints every steps // 4 = 10 steps


def _launch(out: Path, *extra: str) -> subprocess.Popen[str]:
    argv = [*SORT, "--seeds", "1", "--steps", str(KILL_STEPS), "--out", str(out)]
    return subprocess.Popen(
        [str(SCRIPT), *argv, "--no-progress", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )  # fmt: skip


def _final(out: Path) -> tuple[dict[str, torch.Tensor], list[tuple[int, float]], dict]:
    from safetensors.torch import load_file

    run = out / "sinkhorn" / "seed0"
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())["checkpoint"]
    assert latest == f"step_{KILL_STEPS:07d}"
    weights = load_file(run / "checkpoints" / latest / "model.safetensors")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    result = json.loads((out / "results.json").read_text())["results"][0]
    return weights, losses, result


def test_sigkill_after_a_checkpoint_then_resume_equals_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    """``sparse-sinkhorn sort --attention sinkhorn`` (Gumbel noise in training) killed with
    SIGKILL once its first checkpoint is published, then rerun with ``--resume``: the final
    weights are ``torch.equal`` to an uninterrupted run's, the logged losses and the reported
    metrics are the same."""
    if not SCRIPT.is_file():
        pytest.skip(f"no console script at {SCRIPT}")
    reference = _launch(tmp_path / "reference")
    killed_out = tmp_path / "killed"
    child = _launch(killed_out)
    latest = killed_out / "sinkhorn" / "seed0" / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 120
    while not latest.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    _, err = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, err
    step = json.loads(latest.read_text())["checkpoint"]
    assert step < f"step_{KILL_STEPS:07d}", step  # killed in the middle of training
    assert not (killed_out / "results.json").exists()

    resumed = _launch(killed_out, "--resume")
    _, err = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, err
    assert f"resumed from {latest.parent / step}" in err
    _, err = reference.communicate(timeout=180)
    assert reference.returncode == 0, err

    want, got = _final(tmp_path / "reference"), _final(killed_out)
    assert want[0].keys() == got[0].keys()
    for key in want[0]:
        assert torch.equal(got[0][key], want[0][key]), key
    assert got[1] == want[1] and len(want[1]) >= 2  # every logged loss, bitwise
    assert got[2]["eval"] == want[2]["eval"] and want[2]["eval"]
    assert run_figures(got[2]["runs"]) == run_figures(want[2]["runs"])


# ---- --jobs 2 equals --jobs 1 for Sinkhorn runs ---------------------------------------------


def test_jobs_2_gives_the_sinkhorn_runs_of_one_process(tmp_path: Path) -> None:
    """docs/guarantees.md: "``--jobs N`` gives the runs of one process: ``sort`` bit for bit".
    With Sinkhorn attention (Gumbel noise drawn in training): two seeds in two one-thread
    worker processes end with the weights, logged losses and results of the serial run in
    this one-thread process."""
    from safetensors.torch import load_file

    flags = [*SORT, "--steps", "10", "--seeds", "2", "--no-progress"]
    assert main([*flags, "--out", str(tmp_path / "serial")]) == 0
    assert main([*flags, "--out", str(tmp_path / "jobs"), "--jobs", "2"]) == 0
    results = [
        json.loads((tmp_path / d / "results.json").read_text())["results"]
        for d in ("serial", "jobs")
    ]
    assert results[0][0]["eval"] == results[1][0]["eval"]
    assert run_figures(results[0][0]["runs"]) == run_figures(results[1][0]["runs"])
    weights = {}
    for seed in (0, 1):
        runs = [tmp_path / d / "sinkhorn" / f"seed{seed}" for d in ("serial", "jobs")]
        last = [sorted((r / "checkpoints").glob("step_*"))[-1] for r in runs]
        assert [p.name for p in last] == ["step_0000010"] * 2
        pair = [load_file(p / "model.safetensors") for p in last]
        assert pair[0].keys() == pair[1].keys()
        for key in pair[0]:
            assert torch.equal(pair[0][key], pair[1][key]), (seed, key)
        metrics = [(r / "metrics.jsonl").read_text().splitlines() for r in runs]
        losses = [[json.loads(line).get("loss") for line in m] for m in metrics]
        assert losses[0] == losses[1] and None not in losses[0] and losses[0]
        weights[seed] = pair[0]
    # The two seeds are different runs (so the comparison above is not of one run twice).
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_jobs_2_gives_the_lm_figures_of_one_process(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``lm`` "figure for figure": the Sinkhorn LM over two seeds reports the same results with
    ``--jobs 2`` as one after another."""
    base = _experiment("lm", data_dir, tmp_path / "unused")[:-5]  # no --steps/--out/progress
    flags = [*base, "--steps", "4", "--seeds", "2", "--no-progress"]
    for d, extra in (("serial", []), ("jobs", ["--jobs", "2"])):
        code, err = run_cli([*flags, "--out", str(tmp_path / d), *extra], capsys)
        assert code == 0, err
    results = [
        json.loads((tmp_path / d / "results.json").read_text())["results"]
        for d in ("serial", "jobs")
    ]
    assert [r["kind"] for r in results[0]] == ["sinkhorn"]
    assert results[0][0]["eval"] == results[1][0]["eval"] and results[0][0]["eval"]
    assert run_figures(results[0][0]["runs"]) == run_figures(results[1][0]["runs"])
