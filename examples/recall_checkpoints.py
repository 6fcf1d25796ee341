"""Score the trained models of a `sparse-sinkhorn recall` run again from their checkpoints:
accuracy with the routing they were trained with, accuracy with hard (argmax) routing (the same
for a kind trained with it), and per routing layer how often a question's routing reads its
answer's block (`sparse_sinkhorn.experiments.recall_scoring.routing_hits`; n/a
where no question qualifies), on the run's held-out examples. The
task and length come from the directory's name (``<task>-<length>``), the task's sizes from
the run's ``results.json`` (the cpu preset's when there is none).

    python examples/recall_checkpoints.py runs/recall-passkey/passkey-512/softmax-max
    python examples/recall_checkpoints.py runs/recall-passkey/passkey-512/softmax-max --per-head
    python examples/recall_checkpoints.py runs/recall-mqar/mqar-512/softmax-max
    python examples/recall_checkpoints.py runs/lookup-distill/lookup-512/softmax-max-distill-max \
        --teacher --json teacher.json

``--teacher`` adds, per layer, how often the layer's own dense attention (the routing
distillation's teacher, `recall_scoring.teacher_hits`, with the largest and with the mean mass
of a block's queries) puts its largest block mass on the answer's block; ``--json FILE`` also
writes the rows with the command, commit, machine and wall time.

Runs made since the `recall` experiment records these scores itself need no second pass; this
reads older run directories (one `seed*/checkpoints` per seed).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from sparse_sinkhorn.data.recall import RecallDataset
from sparse_sinkhorn.experiments import recall, recall_scoring
from sparse_sinkhorn.experiments.presets import RecallPreset
from sparse_sinkhorn.experiments.provenance import begin_invocation, provenance
from sparse_sinkhorn.experiments.recall_controls import CONTROLS
from sparse_sinkhorn.experiments.recall_tasks import TASKS
from sparse_sinkhorn.experiments.results import machine_info
from sparse_sinkhorn.models import Classifier, LanguageModel, build_model, config_from_dict
from sparse_sinkhorn.ops.plan import TEACHERS
from sparse_sinkhorn.train import load_model_weights, read_config, resolve_checkpoint


def load(seed_dir: Path, hard: bool | None = None) -> nn.Module | None:
    """The seed's latest verified checkpoint (a `LanguageModel`, or the lookup's `Classifier`);
    ``hard``: its routing set hard or soft (None: as trained; a kind without block routing
    has none to set: None)."""
    ckpt = resolve_checkpoint(seed_dir)
    config = config_from_dict(read_config(ckpt / "config.json")["model_config"])
    if hard is not None:
        if not config.attention.uses_sorting:
            return None
        config = replace(config, attention=replace(config.attention, hard=hard))
    model = build_model(config)
    load_model_weights(ckpt, model)
    return model.eval()


def run_preset(kind_dir: Path, task: str) -> RecallPreset:
    """The preset the run trained with: ``settings`` of its ``results.json`` (the task's cpu
    preset's sizes when the run has none yet)."""
    preset = TASKS[task].presets["cpu"]
    results = kind_dir.parent.parent / "results.json"
    if results.is_file():
        settings = json.loads(results.read_text())["settings"]
        sizes = ("n_eval", "n_pairs", "n_digits", "n_needles")
        preset = replace(preset, **{k: settings[k] for k in sizes if k in settings})
    return preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind_dir", type=Path, help="a run's <task>-<length>/<kind> directory")
    parser.add_argument(
        "--per-head", action="store_true", help="routing hits per layer and head (% of sequences)"
    )
    parser.add_argument(
        "--teacher", action="store_true", help="also the teacher hits per layer (max, mean)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the rows to this file")
    args = parser.parse_args()
    task, _, length = args.kind_dir.resolve().parent.name.rpartition("-")
    if task not in TASKS or not length.isdigit():
        parser.error(f"{args.kind_dir} is not a recall run's <task>-<length>/<kind> directory")
    preset = run_preset(args.kind_dir, task)
    spec = recall.make_task(task, int(length), preset)
    held_out = RecallDataset(spec, preset.n_eval, recall.EVAL_SEED)
    per = "per layer, head" if args.per_head else "per layer"
    columns = ["seed", "accuracy %", "with hard routing %", f"routing hits % ({per})"]
    if args.teacher:
        columns += [f"teacher hits %, {r} ({per})" for r in TEACHERS]
    print(f"{task} at {int(length):,} tokens")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    rows = []
    for seed_dir in sorted(args.kind_dir.glob("seed*")):
        trained, hard = load(seed_dir), load(seed_dir, hard=True)
        if args.kind_dir.name in CONTROLS:  # a control's routing, as the run scored it
            for model in (trained, hard):
                if isinstance(model, (LanguageModel, Classifier)):
                    CONTROLS[args.kind_dir.name](model, spec)
        assert isinstance(trained, (LanguageModel, Classifier))
        scores: dict[str, object] = {
            "seed": seed_dir.name,
            "accuracy": recall_scoring.accuracy(trained, held_out, task, 16)["accuracy"],
            "accuracy_hard_routing": None
            if hard is None
            else recall_scoring.accuracy(hard, held_out, task, 16)["accuracy"],
            "routing_hits": recall_scoring.routing_hits(
                trained, held_out, 16, per_head=args.per_head
            ),
        }
        if args.teacher:
            for r in TEACHERS:
                scores[f"teacher_hits_{r}"] = recall_scoring.teacher_hits(
                    trained, held_out, 16, reduce=r, per_head=args.per_head
                )
        rows.append(scores)
        cells = [
            seed_dir.name,
            f"{scores['accuracy']:.1f}",
            "–" if hard is None else f"{scores['accuracy_hard_routing']:.1f}",
        ]
        for key in ("routing_hits", *(f"teacher_hits_{r}" for r in TEACHERS if args.teacher)):
            values = scores[key]
            assert isinstance(values, dict)
            cells.append(
                ", ".join("n/a" if v is None else f"{v:.1f}" for v in values.values()) or "–"
            )
        print("| " + " | ".join(cells) + " |")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "kind_dir": str(args.kind_dir),
                    "rows": rows,
                    "machine": machine_info(),
                    "provenance": provenance(),
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    torch.set_num_threads(1)
    begin_invocation(sys.argv[1:], program=("python", sys.argv[0]))
    main()
