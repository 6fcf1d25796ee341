"""Does a results table's ranking survive doubling the training budget?

Train the same grid twice, with ``--steps B`` and ``--steps 2B`` (same seeds, separate
``--out``), then compare the two ``results.json`` files: the ranking each records (its
headline metric, best first), whether the order is the same, each name's mean ± std over seeds
at both budgets and whether those intervals overlap, and which neighbours of the ``2B`` order
the seeds do not separate::

    sparse-sinkhorn lm --level char --attention sinkhorn,sinkhorn-targets --seeds 3 \\
        --steps 1000 --out runs/lm-B
    sparse-sinkhorn lm --level char --attention sinkhorn,sinkhorn-targets --seeds 3 \\
        --steps 2000 --out runs/lm-2B
    python examples/compare_budgets.py runs/lm-B runs/lm-2B

Exit status 0 when the ranking is the same, 1 when it changed (2: unreadable input).
"""

from __future__ import annotations

import argparse
import sys

from sparse_sinkhorn.experiments.ranking import compare, load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("budget", help="results.json (or its directory) trained with budget B")
    parser.add_argument("doubled", help="results.json (or its directory) trained with 2B")
    args = parser.parse_args(argv)
    try:
        comparison = compare(load(args.budget), load(args.doubled))
    except (OSError, ValueError, KeyError) as err:
        print(f"compare_budgets: {err}", file=sys.stderr)
        return 2
    print(comparison.report())
    return 0 if comparison.same_ranking else 1


if __name__ == "__main__":
    sys.exit(main())
