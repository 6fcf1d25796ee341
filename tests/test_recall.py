"""The retrieval tasks (passkey, MQAR), their accuracy and the `recall` subcommand (tiny sizes)."""

from __future__ import annotations

import json
import os
import runpy
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from helpers_cli import assert_one_line_error, run_cli
from sparse_sinkhorn.data.recall import IGNORE, MQAR, Passkey, RecallDataset
from sparse_sinkhorn.experiments.recall import (
    CONTROL_KINDS,
    CONTROLS,
    DEFAULT_KINDS,
    EVAL_SEED,
    HARD,
    RECALL_KINDS,
    attention_config,
    make_task,
)
from sparse_sinkhorn.experiments.recall_controls import ORACLE_LOGIT, install_oracle_routing
from sparse_sinkhorn.experiments.recall_scoring import accuracy, hard_twin, routing_hits
from sparse_sinkhorn.experiments.recall_tasks import TASKS
from sparse_sinkhorn.models import Classifier, LanguageModel, LanguageModelConfig
from sparse_sinkhorn.nn import SinkhornSelfAttention

pytestmark = pytest.mark.usefixtures("one_thread")


def test_passkey_layout() -> None:
    task = Passkey(40, n_digits=3)
    positions = set()
    for i in range(300):
        ids, targets = RecallDataset(task, 300, seed=5)[i]
        assert ids.shape == targets.shape == (40,)
        assert int(ids.min()) >= 1 and int(ids.max()) < task.vocab_size
        (key_at,) = (ids == Passkey.KEY).nonzero()[:, 0].tolist()
        (query_at,) = (ids == Passkey.QUERY).nonzero()[:, 0].tolist()
        assert query_at == 40 - 3  # QUERY d1 d2 ends the sequence
        digits = ids[key_at + 1 : key_at + 4]
        assert ((digits >= Passkey.DIGIT0) & (digits < Passkey.DIGIT0 + 10)).all()
        assert key_at + 3 < query_at  # the needle never overlaps the query
        # the scored positions are exactly the last three and ask for the needle's digits
        assert torch.equal((targets != IGNORE).nonzero()[:, 0], torch.arange(37, 40))
        assert torch.equal(targets[37:], digits)
        assert torch.equal(ids[38:], digits[:2])
        # nothing else is a marker or a digit
        rest = torch.ones(40, dtype=torch.bool)
        rest[[key_at, key_at + 1, key_at + 2, key_at + 3, 37, 38, 39]] = False
        assert (ids[rest] >= Passkey.DIGIT0 + 10).all()
        positions.add(key_at)
    assert min(positions) == 0 and max(positions) == 40 - 3 - 3 - 1  # the whole range is used


def test_mqar_layout() -> None:
    task = MQAR(96, n_pairs=8, n_keys=16, n_values=16)
    for i in range(100):
        ids, targets = RecallDataset(task, 100, seed=1)[i]
        keys, values = ids[0:16:2], ids[1:16:2]
        assert len(set(keys.tolist())) == 8  # distinct keys
        assert ((keys >= MQAR.KEY0) & (keys < MQAR.KEY0 + 16)).all()
        assert ((values >= MQAR.KEY0 + 16) & (values < task.vocab_size)).all()
        scored = (targets != IGNORE).nonzero()[:, 0]
        assert len(scored) == 8 and int(scored.min()) >= 16
        pairs = dict(zip(keys.tolist(), values.tolist(), strict=True))
        asked = ids[scored].tolist()
        assert sorted(asked) == sorted(pairs)  # every key is asked once
        for at, key in zip(scored.tolist(), asked, strict=True):
            assert int(targets[at]) == pairs[key] == int(ids[at + 1])
        blank = torch.ones(96, dtype=torch.bool)
        blank[:16] = False
        blank[scored] = blank[scored + 1] = False
        assert (ids[blank] == MQAR.BLANK).all()


def test_examples_are_pure_functions_of_seed_and_index() -> None:
    for task in (Passkey(64), MQAR(128)):
        a, b, c = RecallDataset(task, 4, 3), RecallDataset(task, 4, 3), RecallDataset(task, 4, 4)
        assert torch.equal(a[2][0], b[2][0]) and torch.equal(a[2][1], b[2][1])
        assert not torch.equal(a[2][0], c[2][0])
        assert not torch.equal(a[1][0], a[2][0])
        with pytest.raises(IndexError):
            a[4]


def test_bad_task_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="too short"):
        Passkey(5, n_digits=2)
    with pytest.raises(ValueError, match="n_digits"):
        Passkey(64, n_digits=0)
    with pytest.raises(ValueError, match="cannot hold"):
        MQAR(40, n_pairs=16)
    with pytest.raises(ValueError, match="n_pairs"):
        MQAR(512, n_pairs=65)
    with pytest.raises(ValueError, match="size"):
        RecallDataset(Passkey(64), 0, 0)


class _Oracle(nn.Module):
    """Reads the answer from the context (off by one position when ``wrong``)."""

    def __init__(self, task: str, vocab: int, wrong: bool = False) -> None:
        super().__init__()
        self.task, self.vocab, self.wrong = task, vocab, wrong

    def forward(self, ids: Tensor) -> Tensor:
        logits = torch.zeros(*ids.shape, self.vocab)
        for b, row in enumerate(ids):
            if self.task == "passkey":
                key_at = int((row == Passkey.KEY).nonzero()[0])
                query_at = int((row == Passkey.QUERY).nonzero()[0])
                for j in range(len(row) - query_at):
                    logits[b, query_at + j, row[key_at + 1 + j + int(self.wrong)]] = 1.0
            else:
                pairs = {int(row[i]): int(row[i + 1]) for i in range(0, 32, 2)}
                for t in range(32, len(row)):
                    if int(row[t]) in pairs:
                        value = pairs[int(row[t])] + int(self.wrong and int(row[t]) % 2 == 0)
                        logits[b, t, min(value, self.vocab - 1)] = 1.0
        return logits


def test_accuracy_counts_right_answers() -> None:
    passkey = RecallDataset(Passkey(48), 10, 0)
    assert accuracy(_Oracle("passkey", 70), passkey, "passkey", 4) == {"accuracy": 100.0}
    assert accuracy(_Oracle("passkey", 70, wrong=True), passkey, "passkey", 4)["accuracy"] < 20
    mqar = RecallDataset(MQAR(128, n_pairs=16), 6, 0)
    assert accuracy(_Oracle("mqar", 130), mqar, "mqar", 4) == {"accuracy": 100.0}
    # the queries of even keys (about half) are answered wrong
    assert 20 < accuracy(_Oracle("mqar", 130, wrong=True), mqar, "mqar", 4)["accuracy"] < 80


@pytest.mark.parametrize("name", sorted({*RECALL_KINDS, *CONTROL_KINDS}))
def test_every_kind_builds_and_runs(name: str) -> None:
    torch.manual_seed(0)
    config = LanguageModelConfig(
        vocab_size=66, d_model=16, n_heads=2, n_layers=1, attention=attention_config(name, 8, 64)
    )
    model = LanguageModel(config)
    logits = model(torch.randint(1, 66, (2, 64)))
    assert logits.shape == (2, 64, 66) and torch.isfinite(logits).all()
    assert set(DEFAULT_KINDS) <= set(RECALL_KINDS)
    assert all(set(spec.presets) == {"cpu", "paper"} for spec in TASKS.values())


def _control(name: str, n_layers: int) -> tuple[Passkey, LanguageModel]:
    """A passkey task at 128 tokens and a small model with the control ``name`` installed."""
    task = Passkey(128)
    att = attention_config(name, 16, 128)
    sizes = {"d_model": 16, "n_heads": 2, "n_layers": n_layers}
    config = LanguageModelConfig(vocab_size=task.vocab_size, attention=att, **sizes)
    model = LanguageModel(config)
    CONTROLS[name](model, task)
    return task, model


def _routed(model: nn.Module, task) -> tuple[Tensor, list[Tensor]]:
    """Six held-out sequences of ``task`` and the sort logits each of the model's two
    Sinkhorn layers routes them by."""
    data = RecallDataset(task, 6, 0)
    ids = torch.stack([data[i][0] for i in range(6)])
    logits: list[Tensor] = []
    for layer in model.modules():
        if isinstance(layer, SinkhornSelfAttention):
            layer.register_forward_hook(lambda m, a, o: logits.append(m.sort_logits(a[0])))
    model(ids)
    assert len(logits) == 2
    return ids, logits


def test_oracle_routing_sends_every_later_block_to_the_needle() -> None:
    task, model = _control("oracle-hard", 2)
    ids, logits = _routed(model, task)
    needle = (ids == Passkey.KEY).nonzero()[:, 1] // 16  # (B,)
    for s in logits:
        assert s.shape == (6, 2, 8, 8)
        for b in range(6):
            for row in range(8):
                want = torch.zeros(8)
                if row > needle[b]:
                    want[needle[b]] = ORACLE_LOGIT
                assert torch.equal(s[b, 0, row], want) and torch.equal(s[b, 1, row], want)


def test_oracle_routing_of_the_lookup_sends_every_other_block_to_the_asked_needle() -> None:
    """In the encoder (`Classifier`), every block but the asked needle's own routes to the
    block holding the needle whose key stands at position 0, in every layer; the question
    block's routing hits are 100 %."""
    from sparse_sinkhorn.data.recall import KeyedLookup
    from sparse_sinkhorn.models import ClassifierConfig

    task = KeyedLookup(128, reserved=32)
    att = attention_config("oracle-hard", 16, 128)
    config = ClassifierConfig(
        vocab_size=task.vocab_size, d_model=16, n_heads=2, n_layers=2, attention=att,
        n_classes=task.n_classes, pooling="first",
    )  # fmt: skip
    model = Classifier(config).eval()
    CONTROLS["oracle-hard"](model, task)
    ids, logits = _routed(model, task)
    for b in range(6):
        asked = int(ids[b, 0]) - task.KEY0
        at = [p for p, t in enumerate(ids[b].tolist()) if t >= task.needle0 and
              (t - task.needle0) // task.n_values == asked and t < task.needle0 + 256]  # fmt: skip
        assert len(at) == 1 and at[0] >= 32
        needle = at[0] // 16
        for s in logits:
            for row in range(8):
                want = torch.zeros(8)
                if row != needle:
                    want[needle] = ORACLE_LOGIT
                assert torch.equal(s[b, 0, row], want) and torch.equal(s[b, 1, row], want)
    assert routing_hits(model, RecallDataset(task, 16, 1), 8) == {
        "routing_hit_layer0": 100.0,
        "routing_hit_layer1": 100.0,
    }


def test_routing_hits_count_last_blocks_routed_to_the_needle() -> None:
    """The oracle routes to the needle in every layer (100 %); a fresh sort net's last block
    routes by chance; kinds that do not route have no such score."""
    task = Passkey(128)
    data = RecallDataset(task, 24, 0)
    make = partial(LanguageModelConfig, vocab_size=task.vocab_size, d_model=16, n_heads=2)
    oracle = LanguageModel(make(attention=attention_config("oracle-hard", 16, 128))).eval()
    install_oracle_routing(oracle, task)
    assert routing_hits(oracle, data, 8) == {
        "routing_hit_layer0": 100.0,
        "routing_hit_layer1": 100.0,
    }
    fresh = LanguageModel(make(attention=attention_config("softmax-max", 16, 128))).eval()
    hits = routing_hits(fresh, data, 8)
    assert set(hits) == {"routing_hit_layer0", "routing_hit_layer1"}
    assert all(0.0 <= h < 100.0 for h in hits.values())
    heads = routing_hits(fresh, data, 8, per_head=True)  # the layer's figure is their mean
    for i in (0, 1):
        per = [heads[f"routing_hit_layer{i}_head{h}"] for h in (0, 1)]
        assert hits[f"routing_hit_layer{i}"] == pytest.approx(sum(per) / 2, abs=1e-9)
    for length in (32, 16):  # two blocks: one earlier block to route to; one block: none
        short = RecallDataset(Passkey(length), 8, 0)
        model = LanguageModel(make(attention=attention_config("softmax-max", 16, length)))
        assert routing_hits(model.eval(), short, 8) == dict.fromkeys(hits)  # n/a, not 100 or 0
    one = LanguageModel(make(attention=attention_config("softmax-max-layers", 16, 128))).eval()
    assert set(routing_hits(one, data, 8)) == {"routing_hit_layer0"}  # one routing
    assert (
        routing_hits(LanguageModel(make(attention=attention_config("dense", 16, 128))), data, 8)
        == {}
    )


def test_recall_cli_writes_results_and_plots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "recall"
    argv = ["recall", "--task", "mqar", "--lengths", "96,128", "--block-size", "16"]
    argv += ["--steps", "2", "--batch-size", "2", "--attention", "dense,topk,softmax-max"]
    argv += ["--d-model", "24", "--n-heads", "3", "--token-conv", "3"]
    argv += ["--seeds", "2", "--out", str(out), "--no-progress"]
    code, err = run_cli(argv, capsys)
    assert code == 0, err
    payload = json.loads((out / "results.json").read_text())
    assert payload["experiment"] == "recall-mqar"
    assert payload["settings"]["lengths"] == [96, 128] and payload["settings"]["steps"] == 2
    sizes = {k: payload["settings"][k] for k in ("d_model", "n_heads", "d_ff")}
    assert sizes == {"d_model": 24, "n_heads": 3, "d_ff": 96}
    assert all(r["config"]["d_model"] == 24 for r in payload["results"])
    assert payload["settings"]["token_conv"] == 3
    assert all(r["config"]["token_conv"] == 3 for r in payload["results"])
    got = {(r["kind"], r["length"]) for r in payload["results"]}
    assert got == {(k, n) for k in ("dense", "topk", "softmax-max") for n in (96, 128)}
    for record in payload["results"]:
        assert len(record["runs"]) == 2
        assert 0.0 <= record["eval"]["accuracy"] <= 100.0
        # soft routing is also scored with hard routing; the other kinds have no such score
        assert (HARD in record["eval"]) == (record["kind"] == "softmax-max")
        steps = [run["seconds_per_step"] for run in record["runs"]]
        assert all(t > 0 for t in steps)
        assert record["seconds_per_step"] == sum(steps) / len(steps)  # the mean, as the table
        peaks = [run["peak_mem_mb"] for run in record["runs"]]
        assert all(p >= 0 for p in peaks) and record["peak_mem_mb"] == min(peaks)
    for name in ("accuracy.png", "cost.png", "results.md"):
        assert (out / name).stat().st_size > 0
    table = (out / "results.md").read_text()
    assert "accuracy % at 128" in table and "softmax-max" in table
    assert "hard routing at eval, % at 128" in table and "peak MiB at 128" in table


def test_the_lookup_trains_an_encoder_classifier_reading_position_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "lookup"
    argv = ["recall", "--task", "lookup", "--lengths", "128", "--block-size", "16"]
    argv += ["--steps", "2", "--batch-size", "2", "--attention", "dense,softmax-max,topk-bound"]
    argv += ["--d-model", "16", "--out", str(out), "--no-progress"]
    code, err = run_cli(argv, capsys)
    assert code == 0, err
    payload = json.loads((out / "results.json").read_text())
    by_kind = {r["kind"]: r for r in payload["results"]}
    for record in by_kind.values():
        config = record["config"]
        assert config["type"] == "ClassifierConfig" and config["pooling"] == "first"
        assert config["n_classes"] == 16
    hits = {"routing_hit_layer0", "routing_hit_layer1"}
    assert set(by_kind["dense"]["eval"]) == {"accuracy"}
    assert set(by_kind["softmax-max"]["eval"]) == {"accuracy", HARD, *hits}
    assert set(by_kind["topk-bound"]["eval"]) == {"accuracy", *hits}


def test_the_lookup_never_puts_a_needle_in_the_questions_block() -> None:
    """The lookup's needles start at the block size or 64, whichever is larger (the cpu
    preset's b = 32: 64 as before; the paper's b = 128: 128)."""
    from dataclasses import replace

    from sparse_sinkhorn.experiments.recall import make_task

    for preset in TASKS["lookup"].presets.values():
        for block in (32, preset.block_size, 256):
            task = make_task("lookup", 1024, replace(preset, block_size=block))
            assert task.reserved == max(64, block)
            data = RecallDataset(task, 32, 0)
            ids = torch.stack([data[i][0] for i in range(32)])
            needles = (ids >= task.needle0) & (ids < task.needle0 + task.n_keys * task.n_values)
            assert not needles[:, :block].any()


def test_an_encoder_lookup_is_scored_on_its_class() -> None:
    """`accuracy` of a classifier on the lookup: an oracle reading the needles scores 100 %,
    one that answers a wrong value for even keys about half."""
    from sparse_sinkhorn.data.recall import KeyedLookup

    task = KeyedLookup(128, reserved=32)
    data = RecallDataset(task, 40, 0)

    class Lookup(Classifier):
        def __init__(self, wrong: bool) -> None:
            nn.Module.__init__(self)
            self.wrong = wrong

        def forward(self, ids: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
            logits = torch.zeros(ids.shape[0], task.n_values)
            for b, row in enumerate(ids):
                asked = int(row[0]) - task.KEY0
                needles = row[(row >= task.needle0) & (row < task.needle0 + 256)] - task.needle0
                value = int(needles[needles // task.n_values == asked][0]) % task.n_values
                shift = int(self.wrong and asked % 2 == 0)
                logits[b, (value + shift) % task.n_values] = 1.0
            return logits

    assert accuracy(Lookup(False), data, "lookup", 8) == {"accuracy": 100.0}
    assert 20 < accuracy(Lookup(True), data, "lookup", 8)["accuracy"] < 80


def test_hard_twin_shares_the_weights_and_routes_by_argmax() -> None:
    """A soft-routing kind's hard twin takes its weights and routes by argmax (one-hot plan
    rows where the soft model's are not); other kinds have no twin."""
    make = partial(LanguageModelConfig, vocab_size=20, d_model=16, n_heads=2, n_layers=1, d_ff=32)
    for name in ("dense", "topk", "softmax-hard", "softmax-max"):
        config = make(attention=attention_config(name, 8, 64))
        twin = hard_twin(config)
        assert (twin is None) == (name != "softmax-max")
    config = make(attention=attention_config("softmax-max", 8, 64))
    model, twin = LanguageModel(config).eval(), hard_twin(config)
    assert twin is not None and twin.config.attention.hard
    twin.load_state_dict(model.state_dict())
    ids = torch.randint(1, 20, (2, 64))
    block = twin.decoder.layers[0]
    _, plan = block.attn(block.norm1(twin.embed(ids)), return_plan=True)
    assert plan is not None
    top = plan.P[:, :, 1:].amax(-1)  # block 0 has no earlier block to take
    assert torch.equal(top, torch.ones_like(top))
    _, soft = model.decoder.layers[0].attn(block.norm1(model.embed(ids)), return_plan=True)
    assert soft is not None and bool((soft.P[:, :, 1:].amax(-1) < 1).any())


def test_recall_cli_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = ["--out", str(tmp_path / "r"), "--no-progress"]
    assert_one_line_error(["recall", "--task", "needle", *out], capsys, "--task")
    assert_one_line_error(["recall", "--lengths", "64,x", *out], capsys, "--lengths")
    assert_one_line_error(["recall", "--lengths", "5", *out], capsys, "too short")
    assert_one_line_error(["recall", "--attention", "flash", *out], capsys, "flash")
    assert_one_line_error(["recall", "--steps", "0", *out], capsys, "--steps")
    assert_one_line_error(["recall", "--d-model", "0", *out], capsys, "--d-model")
    heads = ["recall", "--d-model", "48", "--n-heads", "5", *out]
    assert_one_line_error(heads, capsys, "not a multiple of 5 heads")
    assert_one_line_error(["recall", "--token-conv", "1", *out], capsys, "--token-conv")
    assert_one_line_error(["recall", "--token-conv", "-2", *out], capsys, "--token-conv")
    oracle = ["recall", "--task", "mqar", "--attention", "oracle-hard", *out]
    assert_one_line_error(oracle, capsys, "passkey or lookup")
    assert_one_line_error(["recall", "--lengths", "64,64", *out], capsys, "twice")
    lookup = ["recall", "--task", "lookup", *out]
    assert_one_line_error([*lookup, "--token-conv", "3"], capsys, "encoder")
    assert_one_line_error([*lookup, "--attention", "shared-max"], capsys, "decoder")
    huge = ["recall", "--lengths", "64,99999999999", *out]
    assert_one_line_error(huge, capsys, "99,999,999,999 is longer than 1,048,576")
    assert not (tmp_path / "r").exists()  # refused before any run directory is made


def test_recall_help_shows_the_default_out(capsys: pytest.CaptureFixture[str]) -> None:
    from sparse_sinkhorn.cli import main

    with pytest.raises(SystemExit) as done:
        main(["recall", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: runs/recall-<task>)" in text and "default: None" not in text


def test_ctrl_c_on_recall_is_one_line(tmp_path: Path) -> None:
    """Ctrl-C in the middle of a recall run: one line saying how to continue, no traceback."""
    out = tmp_path / "r"
    child = _recall_process(out, "--steps", "100000")
    metrics = out / "passkey-64" / "softmax-max" / "seed0" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not metrics.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    last = err.strip().splitlines()[-1]
    assert (
        last == "sparse-sinkhorn: interrupted; pass --resume to continue from the latest "
        "checkpoints"
    ), err


def test_recall_checkpoints_example_rescores_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``examples/recall_checkpoints.py`` reads a run's checkpoints back: its accuracy with
    the trained routing is the one the run recorded."""
    out = tmp_path / "recall"
    argv = ["recall", "--task", "passkey", "--lengths", "64", "--block-size", "16", "--steps"]
    argv += ["2", "--batch-size", "2", "--attention", "softmax-max", "--out", str(out)]
    code, err = run_cli([*argv, "--no-progress"], capsys)
    assert code == 0, err
    recorded = json.loads((out / "results.json").read_text())["results"][0]["eval"]
    script = Path(__file__).parents[1] / "examples" / "recall_checkpoints.py"
    monkeypatch.setattr("sys.argv", [str(script), str(out / "passkey-64" / "softmax-max")])
    runpy.run_path(str(script), run_name="__main__")
    row = capsys.readouterr().out.strip().splitlines()[-1].split("|")
    assert row[1].strip() == "seed0"
    assert float(row[2]) == pytest.approx(recorded["accuracy"], abs=0.05)
    assert float(row[3]) == pytest.approx(recorded["accuracy_hard_routing"], abs=0.05)
    hits = [float(x) for x in row[4].split(",")]
    want = [recorded["routing_hit_layer0"], recorded["routing_hit_layer1"]]
    assert hits == pytest.approx(want, abs=0.05)


def test_recall_checkpoints_example_scores_an_mqar_run_as_mqar(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On an MQAR run the example scores MQAR: the accuracy and the routing hits per layer
    (to the queried pair's block) that the run recorded."""
    out = tmp_path / "recall"
    argv = ["recall", "--task", "mqar", "--lengths", "96", "--block-size", "16", "--steps"]
    argv += ["2", "--batch-size", "2", "--attention", "softmax-max", "--out", str(out)]
    code, err = run_cli([*argv, "--no-progress"], capsys)
    assert code == 0, err
    recorded = json.loads((out / "results.json").read_text())["results"][0]["eval"]
    script = Path(__file__).parents[1] / "examples" / "recall_checkpoints.py"
    monkeypatch.setattr("sys.argv", [str(script), str(out / "mqar-96" / "softmax-max")])
    runpy.run_path(str(script), run_name="__main__")
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "mqar at 96 tokens"
    row = lines[-1].split("|")
    assert float(row[2]) == pytest.approx(recorded["accuracy"], abs=0.05)
    hits = [recorded[f"routing_hit_layer{i}"] for i in range(2)]
    assert [float(x) for x in row[4].split(",")] == pytest.approx(hits, abs=0.05)


def test_shared_routing_routes_every_layer_as_the_first() -> None:
    """``shared-max``: every layer routes by the first layer's sort logits (only the first
    sort net runs, once per forward), the later layers keep their sort nets, and only the
    first sort net learns (the later ones get no gradient)."""
    task, model = _control("shared-max", 3)
    layers = [m for m in model.modules() if isinstance(m, SinkhornSelfAttention)]
    calls: list[int] = []
    for i, layer in enumerate(layers):
        assert layer.sort_net is not None
        layer.sort_net.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    data = RecallDataset(task, 4, 0)
    ids = torch.stack([data[i][0] for i in range(4)])
    model(ids).sum().backward()
    assert calls == [0]
    first = layers[0].sort_net
    assert first is not None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in first.parameters())
    for layer in layers[1:]:
        assert layer.sort_net is not None
        assert all(p.grad is None for p in layer.sort_net.parameters())


def _recall_process(out: Path, *extra: str) -> subprocess.Popen[str]:
    argv = ["recall", "--lengths", "64", "--block-size", "16", "--steps", "40", "--batch-size"]
    argv += ["2", "--d-model", "16", "--attention", "softmax-max", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "SPARSE_SINKHORN_DEBUG"}
    return subprocess.Popen(
        [sys.executable, "-m", "sparse_sinkhorn.cli", *argv, "--no-progress", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


def test_a_killed_recall_run_resumes_from_its_latest_checkpoint(tmp_path: Path) -> None:
    """``recall`` checkpoints every quarter of its steps, as the other experiments do: a run
    killed with SIGKILL after its first checkpoint continues from it with ``--resume`` (not
    from step 0) and ends with the results of an uninterrupted run."""
    reference = _recall_process(tmp_path / "reference")
    out = tmp_path / "killed"
    child = _recall_process(out)
    latest = out / "passkey-64" / "softmax-max" / "seed0" / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 120
    while not latest.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    _, err = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, err
    step = json.loads(latest.read_text())["checkpoint"]
    assert step < "step_0000040", step  # killed in the middle of training
    resumed = _recall_process(out, "--resume")
    _, err = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, err
    assert f"resumed from {latest.parent / step}" in err
    _, err = reference.communicate(timeout=180)
    assert reference.returncode == 0, err
    want, got = (json.loads((d / "results.json").read_text())["results"][0] for d in (
        tmp_path / "reference", out))  # fmt: skip
    assert got["eval"] == want["eval"] and got["train_loss"] == want["train_loss"]


def test_the_shortest_training_span_holds_the_task() -> None:
    """Mixed lengths and curricula start at the preset's min_span, raised (doubling) to a
    length that holds the task's pairs: scattered MQAR's 8 pairs need 32 tokens; needle
    tasks keep 16."""
    from sparse_sinkhorn.data.recall import KeyedNeedles, ScatteredMQAR, shortest_length

    assert shortest_length(ScatteredMQAR(512, n_pairs=8), 16) == 32
    assert shortest_length(KeyedNeedles(512, n_needles=4, n_filler=1), 16) == 16
    assert shortest_length(ScatteredMQAR(40, n_pairs=9), 16) == 40  # 32 is short, 64 too long
    with pytest.raises(ValueError, match="shortest span must be > 0"):
        shortest_length(ScatteredMQAR(512, n_pairs=8), 0)  # doubling 0 would never end


def test_scattered_mqar_trains_with_the_query_presets_curriculum(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r"
    argv = ["recall", "--task", "mqar-scattered", "--lengths", "128", "--steps", "4"]
    argv += ["--batch-size", "2", "--attention", "dense", "--out", str(out), "--no-progress"]
    code, err = run_cli(argv, capsys)
    assert code == 0, err
    assert json.loads((out / "results.json").read_text())["settings"]["min_span"] == 16


def test_a_results_file_from_before_token_conv_merges(tmp_path: Path) -> None:
    """An earlier results.json whose settings lack ``token_conv`` ran without one: a run with
    the same settings (``token_conv`` 0) keeps its rows; one with a convolution does not."""
    from sparse_sinkhorn.experiments.results import merge_results

    settings = {"lengths": [64], "d_model": 32, "token_conv": 0}
    old = {"experiment": "recall", "settings": {k: v for k, v in settings.items()
                                                if k != "token_conv"},
           "results": [{"kind": "dense", "seed": 0, "length": 64}]}  # fmt: skip
    payload = {"experiment": "recall", "settings": settings,
               "results": [{"kind": "local", "seed": 0, "length": 64}]}  # fmt: skip
    merged, kept = merge_results(old, payload)
    assert kept == ["dense"] and [r["kind"] for r in merged["results"]] == ["dense", "local"]
    with pytest.raises(ValueError, match="settings"):
        merge_results(old, {**payload, "settings": {**settings, "token_conv": 3}})


def test_resuming_with_another_token_conv_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A resumed run keeps a saved configuration only when it is the same model: a run
    trained without a convolution does not resume with one."""
    out = tmp_path / "r"
    argv = ["recall", "--task", "mqar", "--lengths", "64", "--block-size", "16", "--steps", "2"]
    argv += ["--batch-size", "2", "--attention", "dense", "--out", str(out), "--no-progress"]
    code, err = run_cli(argv, capsys)
    assert code == 0, err
    code, err = run_cli([*argv, "--resume", "--steps", "3", "--token-conv", "3"], capsys)
    assert code != 0 and "token_conv: saved 0, current 3" in err, err


def _lookup_argv(out: Path, *extra: str) -> list[str]:
    argv = ["recall", "--task", "lookup", "--lengths", "128", "--block-size", "16"]
    argv += ["--steps", "2", "--batch-size", "2", "--d-model", "16", "--no-progress"]
    return [*argv, "--out", str(out), *extra]


def test_init_from_starts_each_run_from_the_same_seeds_weights_of_another_kind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    from sparse_sinkhorn.cli import main
    from sparse_sinkhorn.errors import UsageError
    from sparse_sinkhorn.experiments import recall as recall_mod
    from sparse_sinkhorn.experiments.recall_init import INIT_FILE, start_from
    from sparse_sinkhorn.train import read_config, resolve_checkpoint

    code, err = run_cli(_lookup_argv(tmp_path / "dense", "--attention", "dense", "--seeds", "2"),
                        capsys)  # fmt: skip
    assert code == 0, err
    source = tmp_path / "dense" / "lookup-128" / "dense"
    started: list[tuple[Path, dict[str, Tensor]]] = []

    def recording(model: nn.Module, run_dir: Path) -> None:
        start_from(model, run_dir)
        started.append((run_dir, {k: v.clone() for k, v in model.state_dict().items()}))

    monkeypatch.setattr(recall_mod, "start_from", recording)
    out = tmp_path / "routed"
    argv = _lookup_argv(out, "--attention", "softmax-max-distill-max", "--seeds", "2")
    capsys.readouterr()
    assert main([*argv, "--init-from", str(source)]) == 0  # --jobs 1: runs in this process
    assert f"started from the weights of {source}/seed<s>" in capsys.readouterr().out  # title
    payload = json.loads((out / "results.json").read_text())
    assert payload["settings"]["init_from"] == str(source)
    # each seed from its own seed's final weights; the sort nets are the kind's own
    assert [d for d, _ in started] == [source / "seed0", source / "seed1"]
    for seed, (run_dir, weights) in enumerate(started):
        stored = load_file(resolve_checkpoint(run_dir) / "model.safetensors")
        assert {k for k in weights if ".sort_net." not in f".{k}"} == set(stored)
        for name, value in stored.items():
            assert torch.equal(weights[name], value), name
        run = out / "lookup-128" / "softmax-max-distill-max" / f"seed{seed}"
        assert (run / INIT_FILE).read_text() == str(source)
    other = load_file(resolve_checkpoint(source / "seed0") / "model.safetensors")
    assert any(not torch.equal(other[k], started[1][1][k]) for k in other)  # seeds differ
    # a model with a weight the source lacks (not a sort net's) is refused, untouched
    config = recall_mod.ClassifierConfig.from_dict(read_config(source / "seed0")["model_config"])
    model = recall_mod.Classifier(config)
    model.register_parameter("extra", nn.Parameter(torch.zeros(1)))
    with pytest.raises(UsageError, match="holds no extra"):
        start_from(model, source / "seed0")
    # weights of another shape: refused before any weight changes
    from dataclasses import replace

    from sparse_sinkhorn.train import CheckpointError, warm_start

    wide = recall_mod.Classifier(replace(config, d_model=32, d_ff=128))
    before = {k: v.clone() for k, v in wide.state_dict().items()}
    with pytest.raises(CheckpointError, match="weights of another shape"):
        warm_start(source / "seed0", wide)
    assert all(torch.equal(v, before[k]) for k, v in wide.state_dict().items())


def test_init_from_refuses_what_it_cannot_start_from(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    code, err = run_cli(_lookup_argv(tmp_path / "dense", "--attention", "dense"), capsys)
    assert code == 0, err
    source = str(tmp_path / "dense" / "lookup-128" / "dense")
    routed = _lookup_argv(tmp_path / "r", "--attention", "softmax-max", "--init-from", source)
    assert_one_line_error([*routed, "--seeds", "2"], capsys, "no run for seed 1")
    two = [*routed[:4], "128,256", *routed[5:]]
    assert_one_line_error(two, capsys, "one --lengths")
    longer = [*routed[:4], "256", *routed[5:]]
    assert_one_line_error(longer, capsys, "not a kind directory of a lookup-256 grid")
    moved = tmp_path / "moved" / "lookup-256" / "dense"
    shutil.copytree(source, moved)
    longer = [*longer[:-1], str(moved)]
    assert_one_line_error(longer, capsys, "another model", "attention.max_len")
    wider = [*routed[:-2], "--d-model", "32", "--init-from", source]
    assert_one_line_error(wider, capsys, "another model", "d_model")
    itself = [*routed[:-3], "dense", "--out", str(tmp_path / "dense"), "--overwrite",
              "--init-from", source]  # fmt: skip
    assert_one_line_error(itself, capsys, "this grid writes that directory")
    # --resume continues only runs that started the same way
    code, err = run_cli(routed, capsys)
    assert code == 0, err
    cold = [*routed[:-2], "--resume"]
    assert_one_line_error(
        cold, capsys, "started from " + source, "this command starts from scratch"
    )
    # a run stopped before its last step is not "its final weights"
    from sparse_sinkhorn.experiments import recall_init

    monkeypatch.setattr(
        recall_init, "read_config", lambda _: {"step": 1, "train_config": {"steps": 2}}
    )
    assert_one_line_error(routed, capsys, "has not finished (step 1 of 2)")


@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_teacher_hits_is_a_loop_over_questions_heads_and_queries(reduce: str) -> None:
    """`teacher_hits` against a plain loop: for each question and head, the dense attention
    of every query of the question's block, summed per key block, maxed or meaned over the
    queries; a hit when its largest block holds the answer."""
    from sparse_sinkhorn.data.recall import KeyedLookup
    from sparse_sinkhorn.experiments.recall_scoring import teacher_hits
    from sparse_sinkhorn.models import Classifier, ClassifierConfig
    from sparse_sinkhorn.nn import AttentionConfig
    from sparse_sinkhorn.ops.blocks import num_blocks

    torch.manual_seed(0)
    task = KeyedLookup(length=96, reserved=16)
    att = AttentionConfig(kind="sinkhorn", block_size=16, max_len=96)
    model = Classifier(ClassifierConfig(vocab_size=task.vocab_size, d_model=16, n_heads=2,
                                        n_layers=2, d_ff=32, attention=att, n_classes=16,
                                        pooling="first")).eval()  # fmt: skip
    data = RecallDataset(task, 12, seed=3)
    got = teacher_hits(model, data, 5, reduce=reduce, per_head=True)
    inputs: dict[int, Tensor] = {}
    layers = model.encoder.layers.attentions()
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda _m, a, i=i: inputs.__setitem__(i, a[0]))
    hits = torch.zeros(2, 2)
    ids = torch.stack([data[j][0] for j in range(len(data))])
    targets = torch.stack([data[j][1] for j in range(len(data))])
    with torch.no_grad():
        model(ids)
        for i, layer in enumerate(layers):
            q, k, _ = layer.qkv(inputs[i]).chunk(3, dim=-1)
            for b in range(len(data)):
                needle = int(((ids[b] - task.needle0) // task.n_values == ids[b, 0] - task.KEY0)
                             .logical_and(ids[b] >= task.needle0).nonzero()[0])  # fmt: skip
                assert targets[b, 0] >= 0
                for h in range(2):
                    qh, kh = q[b, :, 8 * h : 8 * h + 8], k[b, :, 8 * h : 8 * h + 8]
                    rows = []
                    for t in range(16):  # block 0: the question's
                        w = torch.softmax(qh[t] @ kh.T / 8**0.5, 0)
                        rows.append(torch.stack([w[16 * j : 16 * j + 16].sum() for j in range(6)]))
                    mass = torch.stack(rows)
                    row = mass.amax(0) if reduce == "max" else mass.mean(0)
                    hits[i, h] += float(int(row.argmax()) in (needle // 16, (needle + 1) // 16))
    assert num_blocks(96, 16) == 6
    for i in range(2):
        for h in range(2):
            assert got[f"teacher_hit_layer{i}_head{h}"] == pytest.approx(100 * hits[i, h] / 12)


def test_recall_checkpoints_example_writes_the_teacher_hits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--teacher --json``: each seed's teacher hits (max and mean) are `teacher_hits` of
    its checkpoint, written with the command and commit."""
    from sparse_sinkhorn.experiments.recall_scoring import teacher_hits

    out = tmp_path / "recall"
    argv = _lookup_argv(out, "--attention", "softmax-max-distill-max,dense,oracle-hard")
    code, err = run_cli(argv, capsys)
    assert code == 0, err
    kind_dir = out / "lookup-128" / "softmax-max-distill-max"
    script = Path(__file__).parents[1] / "examples" / "recall_checkpoints.py"
    file = tmp_path / "teacher.json"
    argv = [str(script), str(kind_dir), "--teacher", "--json", str(file)]
    monkeypatch.setattr("sys.argv", argv)
    runpy.run_path(str(script), run_name="__main__")
    assert "teacher hits %, max (per layer)" in capsys.readouterr().out
    written = json.loads(file.read_text())
    assert written["provenance"]["command"].endswith(f"--teacher --json {file}")
    (row,) = written["rows"]
    model = runpy.run_path(str(script))["load"](kind_dir / "seed0")
    payload = json.loads((out / "results.json").read_text())
    from sparse_sinkhorn.experiments.presets import RecallPreset

    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in payload["settings"].items()}
    preset = RecallPreset(**settings)
    held_out = RecallDataset(make_task("lookup", 128, preset), preset.n_eval, EVAL_SEED)
    for reduce in ("max", "mean"):
        assert row[f"teacher_hits_{reduce}"] == teacher_hits(model, held_out, 16, reduce=reduce)
    # dense attention: no routing to set hard, no routing hits; its teacher hits all the same
    dense = [str(script), str(out / "lookup-128" / "dense"), "--teacher"]
    monkeypatch.setattr("sys.argv", dense)
    runpy.run_path(str(script), run_name="__main__")
    cells = [c.strip() for c in capsys.readouterr().out.strip().splitlines()[-1].split("|")]
    assert cells[1] == "seed0" and cells[3:5] == ["–", "–"] and len(cells[5].split(",")) == 2
    # a control is scored with its control installed: the accuracy its run recorded
    oracle = [str(script), str(out / "lookup-128" / "oracle-hard")]
    monkeypatch.setattr("sys.argv", oracle)
    runpy.run_path(str(script), run_name="__main__")
    cells = [c.strip() for c in capsys.readouterr().out.strip().splitlines()[-1].split("|")]
    recorded = next(r for r in payload["results"] if r["kind"] == "oracle-hard")["eval"]
    assert float(cells[2]) == pytest.approx(recorded["accuracy"], abs=0.05)
    hits = [float(x) for x in cells[4].split(",")]
    assert hits[0] == pytest.approx(recorded["routing_hit_layer0"], abs=0.05)


def test_teacher_hits_of_a_decoder_reads_strictly_earlier_blocks() -> None:
    """In a decoder, `teacher_hits` is the loop over questions and heads of the causal dense
    attention of the question block's queries (keys up to each query), summed per key block
    and maxed over the queries, its largest block among the strictly earlier ones; questions
    with fewer than two earlier blocks, or whose needle is in their own block, left out."""
    from sparse_sinkhorn.data.recall import KeyedNeedles
    from sparse_sinkhorn.experiments.recall_scoring import teacher_hits
    from sparse_sinkhorn.experiments.recall_tasks import answer_sources
    from sparse_sinkhorn.nn import AttentionConfig

    torch.manual_seed(0)
    task = KeyedNeedles(length=96, query_window=32)
    att = AttentionConfig(kind="sinkhorn", block_size=16, max_len=96)
    config = LanguageModelConfig(
        vocab_size=task.vocab_size, d_model=16, n_heads=2, n_layers=2, d_ff=32, attention=att
    )
    model = LanguageModel(config).eval()
    layers = model.decoder.layers.attentions()
    with torch.no_grad():  # queries = 3 x keys: each query reads itself most, in its own block
        for layer in layers:
            layer.qkv.weight[:16] = 3 * layer.qkv.weight[16:32]
            if layer.qkv.bias is not None:
                layer.qkv.bias[:16] = 3 * layer.qkv.bias[16:32]
    data = RecallDataset(task, 16, seed=5)
    got = teacher_hits(model, data, 6, per_head=True)
    inputs: dict[int, Tensor] = {}
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda _m, a, i=i: inputs.__setitem__(i, a[0]))
    ids = torch.stack([data[j][0] for j in range(len(data))])
    targets = torch.stack([data[j][1] for j in range(len(data))])
    rows, positions, sources = answer_sources(task, ids, targets)
    hits, total = torch.zeros(2, 2), 0
    with torch.no_grad():
        model(ids)
        for b, t, src in zip(rows.tolist(), positions.tolist(), sources.tolist(), strict=True):
            a = t // 16
            if not (src // 16 < a and a >= 2):
                continue
            total += 1
            for i, layer in enumerate(layers):
                q, k, _ = layer.qkv(inputs[i][b]).chunk(3, dim=-1)
                for h in range(2):
                    qh, kh = q[:, 8 * h : 8 * h + 8], k[:, 8 * h : 8 * h + 8]
                    best = torch.zeros(6)
                    for u in range(16 * a, min(16 * a + 16, 96)):
                        w = torch.softmax(qh[u] @ kh[: u + 1].T / 8**0.5, 0)
                        mass = torch.stack([w[16 * j : 16 * j + 16].sum() for j in range(6)])
                        best = torch.maximum(best, mass)
                    top = int(best[:a].argmax())  # strictly earlier blocks only
                    hits[i, h] += float(top in (src // 16, (src + 1) // 16))
    assert total > 0
    for i in range(2):
        for h in range(2):
            want = 100 * float(hits[i, h]) / total
            assert got[f"teacher_hit_layer{i}_head{h}"] == pytest.approx(want)
