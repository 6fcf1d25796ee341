"""The retrieval tasks whose answer block depends on the question: multi-key needles, MQAR
with pairs spread over the context and the encoder lookup (layout, determinism, refused
sizes)."""

from __future__ import annotations

import pytest
import torch

from sparse_sinkhorn.data.recall import (
    IGNORE,
    PAD,
    KeyedLookup,
    KeyedNeedles,
    MultiKeyPasskey,
    Passkey,
    RecallDataset,
    ScatteredMQAR,
)
from sparse_sinkhorn.experiments.recall_tasks import TASKS, answer_sources


def _examples(task, n: int = 40) -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = RecallDataset(task, n, seed=3)
    return [data[i] for i in range(n)]


@pytest.mark.parametrize("n_digits", [1, 2])
def test_multikey_passkey_layout(n_digits: int) -> None:
    task = MultiKeyPasskey(256, n_needles=4, n_digits=n_digits, query_window=64)
    key0, value0 = task.KEY0, task.KEY0 + task.n_keys
    offsets = set()
    for ids, targets in _examples(task):
        assert ids.shape == targets.shape == (256,)
        is_key = (ids >= key0) & (ids < value0)
        keys = ids[is_key]
        assert len(keys) == task.n_needles + 1  # the needles' keys and the question's
        at = int((ids == task.QUERY).nonzero().squeeze())
        assert at >= 256 - 64 and at + task.question_length <= 256  # inside the window
        offsets.add(at % 32)
        asked = ids[at + 1]
        needle = [int(p) for p in (ids[: 256 - 64] == asked).nonzero().flatten()]
        assert len(needle) == 1  # the asked key names exactly one needle
        values = ids[needle[0] + 1 : needle[0] + 1 + n_digits]
        assert torch.all((values >= value0) & (values < value0 + task.n_values))
        scored = targets != IGNORE
        assert scored.nonzero().flatten().tolist() == list(range(at + 1, at + 1 + n_digits))
        assert torch.equal(targets[scored], values)  # the asked needle's values
        assert torch.equal(ids[at + 2 : at + 1 + n_digits], values[:-1])  # teacher forcing
        assert len(set(keys[:-1].tolist())) == task.n_needles  # distinct keys
    assert len(offsets) > 5  # the question is not aligned to a block start


def test_keyed_needles_layout() -> None:
    task = KeyedNeedles(256, n_needles=4, query_window=64)
    for ids, targets in _examples(task):
        needles = ids[(ids >= task.needle0) & (ids < task.needle0 + 16 * 16)]
        assert len(needles) == 4
        keys = (needles - task.needle0) // task.n_values
        assert len(set(keys.tolist())) == 4  # distinct keys
        at = int((ids == task.QUERY).nonzero().squeeze())
        assert 256 - 64 <= at < 255
        asked = int(ids[at + 1]) - task.KEY0
        (needle,) = [int(n) for n in needles if (int(n) - task.needle0) // task.n_values == asked]
        scored = (targets != IGNORE).nonzero().flatten().tolist()
        assert scored == [at + 1]
        assert targets[at + 1] == task.KEY0 + task.n_keys + (needle - task.needle0) % 16
        assert int((ids[: 256 - 64] >= task.needle0).sum()) >= 4  # needles before the window


def test_mixed_spans_are_left_padded_examples_of_the_task() -> None:
    task = KeyedNeedles(512, query_window=64)
    data = RecallDataset(task, 200, seed=0, min_span=32)  # windows of 8 below 256 tokens
    spans = []
    for i in range(200):
        ids, targets = data[i]
        assert ids.shape == targets.shape == (512,)
        real = ids != PAD
        span = int(real.sum())
        assert torch.all(real[512 - span :]) and not torch.any(real[: 512 - span])  # left pad
        assert torch.all(targets[: 512 - span] == IGNORE)
        assert int((targets != IGNORE).sum()) == 1 and 32 <= span <= 512
        spans.append(span)
    assert min(spans) < 64 and max(spans) > 256  # log-uniform over [32, 512]
    again = RecallDataset(task, 200, seed=0, min_span=32)
    assert all(torch.equal(data[i][0], again[i][0]) for i in range(5))
    with pytest.raises(ValueError, match=r"spans must be in \[1, 512\]"):
        RecallDataset(task, 10, seed=0, min_span=0)
    with pytest.raises(ValueError, match="not both"):
        RecallDataset(task, 10, seed=0, min_span=32, spans=torch.full((10,), 64))
    with pytest.raises(ValueError, match="cannot hold"):
        RecallDataset(task, 10, seed=0, min_span=5)  # no room for needles before the window


@pytest.mark.parametrize("n_distractors", [0, 16])
def test_scattered_mqar_layout(n_distractors: int) -> None:
    task = ScatteredMQAR(512, n_pairs=8, n_distractors=n_distractors, context_share=0.5)
    key0, value0 = task.KEY0, task.KEY0 + task.n_keys
    blocks_with_pairs = []
    for ids, targets in _examples(task):
        scored = (targets != IGNORE).nonzero().flatten()
        assert len(scored) == 8 and torch.all(scored >= 256)  # queries after the context
        context = ids[:256]
        for t in scored.tolist():
            key = ids[t]
            assert key0 <= key < value0
            where = (context == key).nonzero().flatten()
            assert len(where) == 1  # one pair per key
            assert targets[t] == context[where[0] + 1]  # its value,
            assert ids[t + 1] == task.BLANK  # never shown after the query
        pair_keys = context[(context >= key0) & (context < value0)]
        assert len(pair_keys) == 8 + n_distractors
        assert len(set(pair_keys.tolist())) == len(pair_keys)  # distinct keys
        starts = ((context >= key0) & (context < value0)).nonzero().flatten() // 32
        blocks_with_pairs.append(len(set(starts.tolist())))
    if n_distractors:  # one distractor per 16 tokens: every context block holds pairs
        assert min(blocks_with_pairs) == 256 // 32
    else:  # eight pairs fall in several blocks, so the block to read depends on the key
        assert sum(blocks_with_pairs) / len(blocks_with_pairs) > 5


def test_keyed_lookup_layout() -> None:
    task = KeyedLookup(256, n_needles=4, reserved=64)
    filler0 = task.needle0 + task.n_keys * task.n_values
    answers = set()
    for ids, targets in _examples(task):
        assert ids.shape == targets.shape == (256,)
        asked = int(ids[0]) - task.KEY0  # the question: a key at position 0
        assert 0 <= asked < task.n_keys
        is_needle = (ids >= task.needle0) & (ids < filler0)
        where = is_needle.nonzero().flatten()
        assert len(where) == 4 and int(where.min()) >= 64  # none in the first 64 positions
        assert torch.all(ids[1:][~is_needle[1:]] >= filler0)  # filler elsewhere
        keys = (ids[where] - task.needle0) // task.n_values
        assert len(set(keys.tolist())) == 4  # distinct keys
        assert int((keys == asked).sum()) == 1  # the asked key names one needle
        value = int((ids[where][keys == asked] - task.needle0) % task.n_values)
        assert (targets != IGNORE).nonzero().flatten().tolist() == [0]
        assert int(targets[0]) == value  # a class: the asked needle's value
        answers.add(value)
    assert len(answers) > 5
    assert task.n_classes == task.n_values and task.chance == 1 / 16


def test_keyed_lookup_is_padded_on_the_right() -> None:
    """Mixed lengths pad after the example, so the question stays at position 0."""
    task = KeyedLookup(512, n_needles=4)
    data = RecallDataset(task, 30, seed=0, min_span=128)
    padded = 0
    for i in range(30):
        ids, targets = data[i]
        real = ids != PAD
        n = int(real.sum())
        assert torch.all(real[:n]) and not torch.any(real[n:])  # real tokens first
        assert int(ids[0]) - task.KEY0 < task.n_keys and targets[0] != IGNORE
        padded += n < 512
    assert padded > 10


@pytest.mark.parametrize(
    "task",
    [
        MultiKeyPasskey(300),
        KeyedNeedles(300),
        ScatteredMQAR(300, n_distractors=4),
        KeyedLookup(300),
    ],
    ids=["mk", "keyed", "mqar", "lookup"],
)
def test_new_tasks_are_pure_functions_of_seed_and_index(task) -> None:
    a, b = RecallDataset(task, 5, seed=1), RecallDataset(task, 5, seed=1)
    assert all(torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1]) for i in range(5))
    assert not torch.equal(a[0][0], RecallDataset(task, 5, seed=2)[0][0])
    assert all(int(a[i][0].max()) < task.vocab_size for i in range(5))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: MultiKeyPasskey(64, n_needles=17), "n_needles"),
        (lambda: MultiKeyPasskey(64, query_window=2), "query_window"),
        (lambda: MultiKeyPasskey(70, n_needles=4, query_window=64), "cannot hold"),
        (lambda: KeyedNeedles(64, n_needles=17), "n_needles"),
        (lambda: KeyedNeedles(66, n_needles=4, query_window=64), "cannot hold"),
        (lambda: ScatteredMQAR(512, n_pairs=40, n_distractors=30), "distinct keys"),
        (lambda: ScatteredMQAR(512, context_share=1.0), "context_share"),
        (lambda: ScatteredMQAR(40, n_pairs=8, n_distractors=8), "cannot hold"),
        (lambda: KeyedLookup(64, n_needles=17), "n_needles"),
        (lambda: KeyedLookup(67, n_needles=4, reserved=64), "cannot hold"),
        (lambda: KeyedLookup(128, reserved=0), "reserved"),
        (lambda: KeyedLookup(128, n_filler=0), "n_filler"),
    ],
)
def test_new_task_sizes_are_refused(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize("name", list(TASKS))
def test_answer_sources_point_at_the_asked_needle(name: str) -> None:
    spec = TASKS[name]
    task = spec.build(256, spec.presets["cpu"])
    data = RecallDataset(task, 8, seed=0)
    ids = torch.stack([data[i][0] for i in range(8)])
    targets = torch.stack([data[i][1] for i in range(8)])
    row, pos, source = answer_sources(task, ids, targets)
    questions = int(((targets != IGNORE) & ~torch.roll(targets != IGNORE, 1, -1)).sum())
    assert len(row) == questions > 0
    if isinstance(task, KeyedLookup):  # the question at position 0, its needle later
        assert torch.all(pos == 0) and torch.all(source >= task.reserved)
        needle = ids[row, source] - task.needle0
        assert torch.all(needle // task.n_values == ids[row, 0] - task.KEY0)
        assert torch.all(targets[row, 0] == needle % task.n_values)
        return
    assert torch.all(source < pos)
    if isinstance(task, Passkey):
        assert torch.all(ids[row, source] == Passkey.KEY)
    elif isinstance(task, KeyedNeedles):
        needle = ids[row, source] - task.needle0
        assert torch.all(needle // task.n_values == ids[row, pos] - task.KEY0)  # the asked key
        assert torch.all(targets[row, pos] - task.KEY0 - task.n_keys == needle % task.n_values)
    else:  # the asked key's first occurrence, followed by its answer
        assert torch.all(ids[row, source] == ids[row, pos])
        assert torch.all(ids[row, source + 1] == targets[row, pos])


def test_length_curriculum_gives_each_step_one_growing_span() -> None:
    from sparse_sinkhorn.data.recall import length_curriculum
    from sparse_sinkhorn.train.sampling import first_epoch_steps, global_batch_indices

    steps = first_epoch_steps(160, 16, seed=3)  # 10 steps of 16
    for step in (0, 4, 9):  # the sampler's batch of a step is the examples given that step
        batch = global_batch_indices(step, num_examples=160, batch_size=16, seed=3)
        assert torch.all(steps[batch] == step)
    spans = length_curriculum(steps, 10, 16, 512, hold=0.3, reach=0.7)
    per_step = [set(spans[steps == s].tolist()) for s in range(10)]
    assert all(len(x) == 1 for x in per_step)  # one span per step: batches stack
    flat = [x.pop() for x in per_step]
    assert flat[:3] == [16, 16, 16] and flat[7:] == [512, 512, 512]
    assert flat == sorted(flat) and 16 < flat[5] < 512
    task = KeyedNeedles(512, query_window=64)
    data = RecallDataset(task, 160, seed=3, spans=spans)
    for i in (0, 50, 159):
        ids, targets = data[i]
        assert ids.shape == targets.shape == (int(spans[i]),) and torch.all(ids != PAD)
        assert int((targets != IGNORE).sum()) == 1


@pytest.mark.parametrize(
    ("choice", "min_span", "curriculum"),
    [("full", None, None), ("mixed", 16, None), ("curriculum", 16, [0.3, 0.7])],
)
def test_recall_cli_trains_at_the_lengths_asked(
    choice: str, min_span, curriculum, tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from helpers_cli import run_cli

    out = tmp_path / "out"
    argv = ["recall", "--task", "keyed-needles", "--lengths", "96", "--steps", "4"]
    argv += ["--batch-size", "2", "--attention", "dense,topk-compressed", "--out", str(out)]
    code, err = run_cli([*argv, "--lengths-in-training", choice, "--no-progress"], capsys)
    assert code == 0, err
    payload = json.loads((out / "results.json").read_text())
    assert payload["settings"]["min_span"] == min_span
    assert payload["settings"]["curriculum"] == curriculum
    kinds = {r["kind"]: r["eval"] for r in payload["results"]}
    assert set(kinds) == {"dense", "topk-compressed"}
    assert 0.0 <= kinds["dense"]["accuracy"] <= 100.0
    assert "routing_hit_layer0" in kinds["topk-compressed"]  # the gate's hits are scored
