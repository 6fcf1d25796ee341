"""The experiments' subcommands: each one's flags, and the function that runs it.

Rule: this module only declares command lines (``sparse-sinkhorn sort``, ``ablate``, ``lm``,
``image``, ``classify``, ``nli``, ``recall``); what a flag does is up to the experiment's
``run``. Flags every experiment takes come from `flags`. `SUBCOMMANDS` lists them, and
`add_subparser` registers them all (see `sparse_sinkhorn.cli`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial
from types import ModuleType
from typing import Any

from . import ablate, classify, flags, image, lm, recall, recall_tasks, sorting, variants
from .classify_common import CLASSIFY_DATASETS, LEVELS, VARIANTS
from .presets import NLI_DATASETS

BY_PRESET = "3 at the cpu preset, 1 at the paper preset"  # --seeds of sort and ablate
DATA_DIR = "data directory (see `data fetch`)"


def _paper_attention(
    parser: argparse.ArgumentParser,
    kinds: tuple[str, ...],
    defaults: tuple[str, ...],
    where: str,
) -> None:
    """``--attention`` of a paper decoder experiment: its kinds and `variants.PAPER_VARIANTS`
    (``where``: the sentence that says which layers a variant changes)."""
    named = ", ".join(variants.label(n) for n in variants.PAPER_VARIANTS)
    flags.add_attention_arg(
        parser,
        kinds,
        help=f"one of {', '.join(kinds)}, or a named configuration: {named} (as in recall; "
        f"sinkhorn-targets and softmax-max are causal routing that is not the shift the "
        f"paper's sinkhorn converges to in a decoder); a comma list, or 'all' "
        f"(= {', '.join(defaults)}; default). {where}",
    )


def _runs(
    parser: argparse.ArgumentParser,
    experiment: ModuleType,
    default_out: str,
    *,
    default_seeds: int | str = 1,
    **defaults: Any,
) -> None:
    """The flags every experiment takes (its ``OVERRIDES``, `flags`' grid and common ones),
    and its ``run``, the function that runs the subcommand (``defaults``: further parsed
    values it reads)."""
    flags.add_override_flags(parser, experiment.OVERRIDES)
    flags.add_grid_args(parser, default_seeds=default_seeds)
    flags.add_common_args(parser, default_out=default_out)
    parser.set_defaults(func=experiment.run, **defaults)


def _sort(parser: argparse.ArgumentParser) -> None:
    """``sparse-sinkhorn sort`` (`sorting`)."""
    _paper_attention(
        parser,
        sorting.KINDS,
        sorting.DEFAULT_KINDS,
        "A variant's balance applies to the decoder's causal self-attention; the encoder is "
        "not causal, where sinkhorn-targets and sinkhorn-leaky balance as sinkhorn does "
        "(softmax-max routes the encoder by softmax rows too); cross-attention is dense "
        "for every kind.",
    )
    _runs(parser, sorting, "runs/sort", default_seeds=BY_PRESET)


def _ablate(parser: argparse.ArgumentParser) -> None:
    """``sparse-sinkhorn ablate`` (`ablate`)."""
    parser.add_argument(
        "--variants",
        default="all",
        help=f"comma list of {', '.join(ablate.VARIANTS)}, or 'all' (default)",
    )
    parser.add_argument(
        "--task",
        choices=("sort", "lm"),
        default=None,
        help="sort (the cpu preset's default) or lm (subword LM; the paper preset's default)",
    )
    parser.add_argument("--data-dir", default=None, help="data directory (lm task)")
    parser.add_argument(
        "--corpus", default=None, help="plain-text corpus, e.g. LM1B's shards (lm task)"
    )
    _runs(parser, ablate, "runs/ablate", default_seeds=BY_PRESET)


def _lm(parser: argparse.ArgumentParser) -> None:
    """``sparse-sinkhorn lm`` (`lm`)."""
    parser.add_argument("--level", default="char", help="char (default) or subword")
    _paper_attention(parser, lm.KINDS, lm.KINDS, "Every layer is causal self-attention.")
    parser.add_argument("--data-dir", default=None, help=DATA_DIR)
    parser.add_argument(
        "--corpus",
        default=None,
        help="plain-text file or directory (e.g. LM1B) instead of Shakespeare",
    )
    _runs(parser, lm, "runs/lm-<level>", out=None)


def _image(parser: argparse.ArgumentParser) -> None:
    """``sparse-sinkhorn image`` (`image`)."""
    datasets = ", ".join(image.DATASETS)
    parser.add_argument("--dataset", default="fashion-mnist", help=f"one of {datasets}")
    _paper_attention(
        parser,
        image.KINDS,
        image.KINDS,
        "Every layer is causal self-attention; sinkhorn-leaky samples without the decoding "
        "cache (which refuses it).",
    )
    parser.add_argument("--data-dir", default=None, help=DATA_DIR)
    parser.add_argument(
        "--train-images", type=int, default=None, help="use only the first N training images"
    )
    _runs(parser, image, "runs/image-<dataset>", out=None)


def _classify(parser: argparse.ArgumentParser, task: str, datasets: tuple[str, ...]) -> None:
    """``sparse-sinkhorn classify`` or ``nli`` (`classify`)."""
    parser.add_argument("--dataset", required=True, choices=datasets, help="dataset to train on")
    parser.add_argument(
        "--level", default="word", choices=LEVELS, help="word or character tokens (default: word)"
    )
    flags.add_attention_arg(parser, list(VARIANTS))
    parser.add_argument(
        "--data-dir",
        default=None,
        help="data directory (default: $SPARSE_SINKHORN_DATA or ~/.cache/sparse-sinkhorn/data)",
    )
    if task == "nli":
        parser.add_argument(
            "--pair",
            default="concat",
            choices=("concat", "separate"),
            help="concat: one sequence [CLS] premise [SEP] hypothesis with segment ids, as "
            "Tensor2Tensor's NLI problems encode pairs (default); separate: siamese encoder, "
            "features [u, v, |u-v|, u*v]",
        )
    no_pair = {"pair": "none"} if task != "nli" else {}
    _runs(parser, classify, f"runs/{task}/DATASET-LEVEL", task=task, **no_pair)


def _recall(parser: argparse.ArgumentParser) -> None:
    """``sparse-sinkhorn recall`` (`recall`)."""
    parser.add_argument(
        "--task",
        default="passkey",
        help=f"one of {', '.join(recall_tasks.TASKS)} (default: passkey); all but passkey and "
        "mqar ask questions whose answer block depends on the question; lookup is an "
        "encoder's (the question at position 0)",
    )
    kinds = ", ".join(variants.label(k) for k in recall.RECALL_KINDS)
    controls = ", ".join(recall.CONTROL_KINDS)
    flags.add_attention_arg(
        parser,
        list(recall.RECALL_KINDS),
        help=f"kinds from {kinds}, or the controls {controls} (oracle-hard: routing given "
        "the answer, passkey and lookup; shared-max, shared-max-shared: every decoder layer "
        f"routes as the first) (comma list); 'all' (default) = {', '.join(recall.DEFAULT_KINDS)}",
    )
    parser.add_argument("--lengths", default=None, help="comma list (default: the preset's)")
    parser.add_argument(
        "--lengths-in-training",
        choices=recall.TRAINING_LENGTHS,
        default=None,
        help="full: every example at the run's length; mixed: log-uniform lengths from the "
        "preset's min_span, padded; curriculum: one length per step, from min_span up "
        "(default: the preset's)",
    )
    parser.add_argument(
        "--init-from",
        default=None,
        metavar="KIND_DIR",
        help="start each run from the final weights of KIND_DIR/seed<s>, the same seed's run "
        "of another kind on the same task, length and model (e.g. "
        "runs/recall-lookup/lookup-512/dense); the weights the kind adds (its sort nets) "
        "start fresh; one length only",
    )
    _runs(parser, recall, "runs/recall-<task>", out=None)


# Every experiment's subcommand, in the order ``sparse-sinkhorn --help`` lists them: its
# name, its line in that list, its description and the function that declares its flags.
_CLASSIFY = (classify.__doc__ or "").split("\n\n")[1]
SUBCOMMANDS: tuple[tuple[str, str, str, Callable[[argparse.ArgumentParser], None]], ...] = (
    (
        "sort",
        "seq2seq sorting (paper Table 1)",
        "Train encoder-decoders to sort random sequences of lengths U[1, L] "
        "(Tensor2Tensor's sort problem); evaluate on dev lengths U[1, 2L].",
        _sort,
    ),
    (
        "ablate",
        "SortNet ablation (paper Table 8)",
        "Sinkhorn variants (sort net, K = V, balancing rounds, temperature), "
        "everything else equal; cpu: the sorting task, paper: LM1B subwords at b = 32.",
        _ablate,
    ),
    (
        "lm",
        "language modelling: char bits/char, subword perplexity (paper Tables 2, 4)",
        "Train decoder-only LMs per attention kind on a plain-text corpus.",
        _lm,
    ),
    (
        "image",
        "pixel-wise image generation, bits/dim (paper Table 5)",
        "Train decoder-only pixel models per attention kind; bits/dim on test.",
        _image,
    ),
    (
        "classify",
        "document classification: IMDb, MR, SST (paper Table 6)",
        _CLASSIFY,
        partial(_classify, task="classify", datasets=CLASSIFY_DATASETS),
    ),
    (
        "nli",
        "natural language inference: SNLI, MNLI (Table 7)",
        _CLASSIFY,
        partial(_classify, task="nli", datasets=NLI_DATASETS),
    ),
    (
        "recall",
        "long-context retrieval: passkey and multi-query associative recall",
        "Train causal LMs per attention kind on a synthetic retrieval task "
        "(an encoder classifier for --task lookup).",
        _recall,
    ),
)


def add_subparser(subparsers: argparse._SubParsersAction) -> None:
    """Every experiment's subcommand (`SUBCOMMANDS`), in order."""
    for name, help_, description, add_flags in SUBCOMMANDS:
        add_flags(subparsers.add_parser(name, help=help_, description=description))
