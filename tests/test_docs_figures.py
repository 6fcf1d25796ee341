"""Figures in the docs' result tables are the ones in the committed result files.

A table whose header has a ``kind`` and a ``file`` column is checked row by row against the
``results.json`` the ``file`` cell names (a path under ``docs/results/``, in backticks or as a
link): the row of that ``kind`` (and of the ``length`` cell, where the table has one) must
exist, and each of these columns, where the table has it, must equal the file's figure:

- ``seeds``: the number of seeds of that row;
- ``accuracy %``: the mean over seeds, ``mean ± std`` (std over seeds) for more than one seed,
  one decimal;
- ``per seed``: each seed's accuracy, one decimal, comma separated, in seed order;
- ``routing hits %``: the first layer's routing hits, mean (± std) as ``accuracy %``; ``–``
  where the file has none (a kind without routing).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from test_docs_blocks import ROOT

DOCS = ROOT / "docs"
RESULTS = DOCS / "results"


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _tables(path: Path) -> list[tuple[int, list[str], list[list[str]]]]:
    """``(line, header, rows)`` of every markdown table of ``path`` with kind and file columns."""
    lines = path.read_text().splitlines()
    found = []
    i = 0
    while i < len(lines) - 1:
        if lines[i].startswith("|") and re.match(r"^\|[-| :]+\|$", lines[i + 1].strip()):
            header = _cells(lines[i])
            rows, j = [], i + 2
            while j < len(lines) and lines[j].startswith("|"):
                rows.append(_cells(lines[j]))
                j += 1
            if "kind" in header and "file" in header:
                found.append((i + 1, header, rows))
            i = j
        else:
            i += 1
    return found


PAGES = sorted(p for p in DOCS.rglob("*.md") if _tables(p))


def _file(cell: str) -> Path:
    match = re.search(r"\(([^)]+\.json)\)", cell) or re.search(r"`([^`]+\.json)`", cell)
    assert match, f"no result file in {cell!r}"
    name = match.group(1).removeprefix("results/")
    return RESULTS / name


def _mean(value: float, std: float | None) -> str:
    return f"{value:.1f}" if std is None else f"{value:.1f} ± {std:.1f}"


def _check_row(header: list[str], row: list[str]) -> None:
    cell = dict(zip(header, row, strict=True))
    data = json.loads(_file(cell["file"]).read_text())
    kind = cell["kind"].strip("`")
    length = int(cell["length"].replace(",", "")) if "length" in cell else None
    matches = [r for r in data["results"] if r["kind"] == kind and length in (None, r["length"])]
    assert len(matches) == 1, f"{kind} (length {length}) in {cell['file']}: {len(matches)} rows"
    result = matches[0]
    runs = result.get("runs", [result])
    many = len(runs) > 1
    if "seeds" in cell:
        assert int(cell["seeds"]) == len(runs), cell
    if "accuracy %" in cell:
        std = result["eval_std"]["accuracy"] if many else None
        assert cell["accuracy %"] == _mean(result["eval"]["accuracy"], std), cell
    if "per seed" in cell:
        shown = ", ".join(f"{r['eval']['accuracy']:.1f}" for r in runs)
        assert cell["per seed"] == shown, cell
    if "routing hits %" in cell:
        if cell["routing hits %"] == "–":  # a kind without routing: the file has none
            assert "routing_hit_layer0" not in result["eval"], cell
        else:
            std = result["eval_std"]["routing_hit_layer0"] if many else None
            hits = _mean(result["eval"]["routing_hit_layer0"], std)
            assert cell["routing hits %"] == hits, cell


def test_some_page_has_checked_tables() -> None:
    assert DOCS / "configuration.md" in PAGES


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_table_figures_are_the_result_files(page: Path) -> None:
    for line, header, rows in _tables(page):
        assert rows, f"{page.name}:{line}: an empty table"
        for row in rows:
            _check_row(header, row)


TEACHER = "teacher hits % ({})"  # a teacher-hits table's columns, "max" and "mean"


def test_teacher_hits_tables_are_their_files() -> None:
    """A table with ``teacher hits % (max)`` and ``file`` columns: each row's first-layer
    teacher hits, mean ± std over the file's seeds, and each seed's (``max per seed``,
    ``mean per seed``), are those of the ``examples/recall_checkpoints.py --json`` file."""
    found = 0
    for page in PAGES:
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            header = _cells(line)
            if TEACHER.format("max") not in header or "file" not in header:
                continue
            j = i + 2
            while j < len(lines) and lines[j].startswith("|"):
                cell = dict(zip(header, _cells(lines[j]), strict=True))
                rows = json.loads(_file(cell["file"]).read_text())["rows"]
                for reduce in ("max", "mean"):
                    hits = [r[f"teacher_hits_{reduce}"]["teacher_hit_layer0"] for r in rows]
                    mean = sum(hits) / len(hits)
                    std = (sum((h - mean) ** 2 for h in hits) / (len(hits) - 1)) ** 0.5
                    assert cell[TEACHER.format(reduce)] == _mean(mean, std), (page, cell)
                    per_seed = ", ".join(f"{h:.1f}" for h in hits)
                    assert cell[f"{reduce} per seed"] == per_seed, (page, cell)
                found += 1
                j += 1
    assert found


def test_the_sorting_table_and_the_readme_row_are_the_make_run_file() -> None:
    """docs/experiments/sorting.md's table and the README's T1 row (paper Table 1) are
    ``docs/results/sort/make-run.json``: exact match and edit distance, mean ± std."""
    data = json.loads((RESULTS / "sort" / "make-run.json").read_text())
    by_kind = {r["kind"]: r for r in data["results"]}

    def figure(kind: str, metric: str, digits: int) -> str:
        mean, std = by_kind[kind]["eval"][metric], by_kind[kind]["eval_std"][metric]
        return f"{mean:.{digits}f} ± {std:.{digits}f}"

    page = (DOCS / "experiments" / "sorting.md").read_text()
    for kind in ("sinkhorn", "dense", "local", "sparse"):
        metrics = [
            ("dev/exact_match", 1), ("dev/edit_distance", 3), ("dev_short/exact_match", 1),
            ("dev_long/exact_match", 1), ("dev_tf/exact_match", 1), ("dev_tf/edit_distance", 3),
        ]  # fmt: skip
        row = f"| {kind} | " + " | ".join(figure(kind, m, d) for m, d in metrics) + " |"
        assert row in page, row
    readme = (ROOT / "README.md").read_text()
    ours = f"{figure('sinkhorn', 'dev/exact_match', 1)} ({figure('dense', 'dev/exact_match', 1)})"
    assert f"| {ours} | 49.24 (45.69) |" in readme


def test_the_ablation_table_and_the_readme_row_are_the_ablation_file() -> None:
    """docs/experiments/ablation.md's table is ``docs/results/ablate/sort-cpu.json`` rendered
    by the command's own table code, and the README's T8 row quotes its linear and K = V
    figures and its diverged count for 0 rounds."""
    from sparse_sinkhorn.experiments.ablate import results_table

    data = json.loads((RESULTS / "ablate" / "sort-cpu.json").read_text())
    page = (DOCS / "experiments" / "ablation.md").read_text()
    assert results_table(data["results"], data["task"]) in page
    by_variant = {r["variant"]: r for r in data["results"]}

    def exact(variant: str) -> str:
        r = by_variant[variant]
        return f"{r['eval']['dev/exact_match']:.1f} ± {r['eval_std']['dev/exact_match']:.1f}"

    zero = by_variant["0-iters"]
    diverged = f"{zero['diverged']} / {len(zero['runs'])}"
    cell = f"linear {exact('linear')}, K = V {exact('kv-tied')}, 0 rounds: diverged ({diverged})"
    assert f"| {cell} |" in (ROOT / "README.md").read_text()


# A budget table: its page, its result files (budget B, 2B, ...), the metric and its digits.
BUDGET_TABLES = {
    "sort": (
        "sorting", ("sort/budget-1300.json", "sort/budget-2600.json", "sort/budget-5200.json"),
        "dev/exact_match", 1,
    ),
    "char": (
        "language-modelling",
        ("lm/char-300steps.json", "lm/char-600steps.json", "lm/char-1200steps.json"),
        "test/bits_per_char", 3,
    ),
    "subword": (
        "language-modelling",
        ("lm/subword-300steps.json", "lm/subword-600steps.json", "lm/subword-1200steps.json"),
        "test/perplexity", 2,
    ),
    "image": (
        "image",
        tuple(f"image/fashion-mnist-{n}steps.json" for n in (150, 300, 600)),
        "test/bits_per_dim", 3,
    ),
}  # fmt: skip


@pytest.mark.parametrize("table", sorted(BUDGET_TABLES))
def test_a_budget_table_is_its_result_files(table: str) -> None:
    """A page's budget table is its result files (the budget B, 2B, ...): the metric's
    mean ± std per kind at every budget, 3 seeds each, and each file's ranking, best first."""
    page_name, files, metric, digits = BUDGET_TABLES[table]
    budgets = [json.loads((RESULTS / f).read_text()) for f in files]
    page = (DOCS / "experiments" / f"{page_name}.md").read_text()
    by_kind = [{r["kind"]: r for r in data["results"]} for data in budgets]
    assert all(set(rows) == set(by_kind[0]) for rows in by_kind)
    for kind in by_kind[-1]:
        assert all(len(rows[kind]["runs"]) == 3 for rows in by_kind)
        cells = [_seeds_figure(rows[kind], metric, digits) for rows in by_kind]
        row = f"| `{kind}` | " + " | ".join(cells) + " |"
        assert row in page, row
    flat = " ".join(page.split())  # a ranking may wrap across lines
    for data in budgets:
        assert " > ".join(f"`{k}`" for k in data["ranking"]["order"]) in flat


# The paper's causal balancing taken literally (not causal) beside the causal one, per level:
# (causal result file, leaky result file, metric, decimals)
LEAK_TABLES = {
    "char": ("lm/char-300steps.json", "lm/char-300steps-leaky.json", "test/bits_per_char", 3),
    "subword": ("lm/subword-300steps.json", "lm/subword-300steps-leaky.json", "test/perplexity", 2),
}  # fmt: skip


@pytest.mark.parametrize("level", sorted(LEAK_TABLES))
def test_the_leaky_comparison_is_its_result_files(level: str) -> None:
    """docs/experiments/language-modelling.md's rows for ``sinkhorn`` and ``sinkhorn-leaky``
    are their result files: the test metric and the routing shape, mean ± std over 3 seeds."""
    causal, leaky, metric, digits = LEAK_TABLES[level]
    page = (DOCS / "experiments" / "language-modelling.md").read_text()
    for file, kind in ((causal, "sinkhorn"), (leaky, "sinkhorn-leaky")):
        data = json.loads((RESULTS / file).read_text())
        (result,) = [r for r in data["results"] if r["kind"] == kind]
        assert len(result["runs"]) == 3
        cells = [
            level,
            f"`{kind}`",
            _seeds_figure(result, metric, digits),
            _seeds_figure(result, "routing/prev_block_mass", 2),
            _seeds_figure(result, "routing/row_entropy", 2),
            f"`{file}`",
        ]
        row = "| " + " | ".join(cells) + " |"
        assert row in page, row


LM_LABELS = {
    "dense": "Transformer",
    "local": "Local",
    "sparse": "Sparse Transformer",
    "sinkhorn": "Sinkhorn",
    "mixture": "Sinkhorn Mixture",
    "sinkhorn-targets": "Sinkhorn, column targets (`sinkhorn-targets`)",
    "softmax-max": "Softmax routing, max pooling (`softmax-max`)",
}


def _seeds_figure(result: dict, metric: str, digits: int) -> str:
    """``mean ± std`` of ``metric`` over a result row's seeds; ``–`` where it has none."""
    if metric not in result["eval"]:
        return "–"
    mean, std = result["eval"][metric], result["eval_std"][metric]
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _check_decoder_table(
    file: str,
    paper_key: str,
    page: str,
    metric: str,
    readme_tail: str,
    *,
    valid: bool,
    digits: int = 3,
) -> None:
    """The page's table of the seven decoder kinds is the result ``file``: (``valid/`` and)
    ``test/`` ``metric``, the routing shape and the paper's figure (or figures), mean ± std
    over 3 seeds, ``digits`` decimals; the README's row is Sinkhorn's (the Transformer's)
    test figure, then ``readme_tail``."""
    data = json.loads((RESULTS / file).read_text())
    paper = data["paper"][paper_key]
    text = (DOCS / "experiments" / page).read_text()
    by_kind = {r["kind"]: r for r in data["results"]}
    assert set(by_kind) == set(LM_LABELS)
    splits = ("valid", "test") if valid else ("test",)
    for kind, result in by_kind.items():
        figures = paper.get(kind)
        figures = figures if isinstance(figures, list) else [figures]
        cells = [
            LM_LABELS[kind],
            *(_seeds_figure(result, f"{split}/{metric}", digits) for split in splits),
            _seeds_figure(result, "routing/prev_block_mass", 2),
            _seeds_figure(result, "routing/row_entropy", 2),
            *("–" if x is None else f"{x:.{digits}f}" for x in figures),
        ]
        row = "| " + " | ".join(cells) + " |"
        assert row in text, row
        assert len(result["runs"]) == 3
    readme = (ROOT / "README.md").read_text()
    test = "test/" + metric
    sinkhorn = _seeds_figure(by_kind["sinkhorn"], test, digits)
    ours = f"{sinkhorn} ({_seeds_figure(by_kind['dense'], test, digits)})"
    assert f"| {ours}, {readme_tail}" in readme


def test_the_char_lm_table_and_the_readme_row_are_the_result_file() -> None:
    """docs/experiments/language-modelling.md's char table (paper Table 4) and the README's
    T4 row are ``docs/results/lm/char-300steps.json``: bits/char and routing shape, mean ±
    std over its seeds."""
    _check_decoder_table(
        "lm/char-300steps.json", "char_bits_per_char_big", "language-modelling.md",
        "bits_per_char", "Shakespeare | 1.132 (1.121), LM1B |", valid=True,
    )  # fmt: skip


def test_the_subword_lm_table_and_the_readme_row_are_the_result_file() -> None:
    """docs/experiments/language-modelling.md's subword table (paper Table 2) and the README's
    T2 row are ``docs/results/lm/subword-300steps.json``: perplexity and routing shape, mean
    ± std over its seeds."""
    _check_decoder_table(
        "lm/subword-300steps.json", "subword_ppl_base_big", "language-modelling.md",
        "perplexity", "Shakespeare | 40.79 (41.57), LM1B |", valid=True, digits=2,
    )  # fmt: skip


def test_the_image_table_and_the_readme_row_are_the_result_file() -> None:
    """docs/experiments/image.md's Fashion-MNIST table (paper Table 5) and the README's T5 row
    are ``docs/results/image/fashion-mnist-150steps.json``: bits/dim and routing shape, mean ±
    std over its seeds."""
    _check_decoder_table(
        "image/fashion-mnist-150steps.json", "cifar10_bits_per_dim", "image.md",
        "bits_per_dim", "Fashion-MNIST | 3.197 (3.198), CIFAR-10 |", valid=False,
    )  # fmt: skip


# The classification and NLI pages' row labels, in the order of the commands' results
ENCODER_LABELS = [
    "Transformer",
    "Local (b=16 IMDb, 8 MR/SNLI)",
    "Sinkhorn (same b)",
    "SortCut 2×8",
    "SortCut 2×16",
    "SortCut 2×32",
]


def _accuracy(result: dict, split: str) -> str:
    mean, std = result["accuracy_by_split"][split], result["accuracy_by_split_std"][split]
    return f"{mean:.2f} ± {std:.2f}"


def test_the_classification_and_nli_tables_and_the_readme_rows_are_the_result_files() -> None:
    """docs/experiments/classification.md (IMDb and MR, paper Table 6) and nli.md (SNLI, Table
    7), and the README's T6 and T7 rows, are ``docs/results/classify/*.json``: accuracy mean ±
    std over 3 seeds per variant, and the paper's figure."""
    imdb, mr, snli = (
        json.loads((RESULTS / "classify" / name).read_text())
        for name in ("imdb-word.json", "mr-word.json", "snli-word.json")
    )
    classify_page = (DOCS / "experiments" / "classification.md").read_text()
    nli_page = (DOCS / "experiments" / "nli.md").read_text()

    def paper(data: dict, attention: str) -> str:
        value = data["paper"].get(attention)
        return "–" if value is None else f"{value:.2f}"

    rows = zip(ENCODER_LABELS, imdb["results"], mr["results"], snli["results"], strict=True)
    for label, a, b, c in rows:
        assert a["attention"] == b["attention"] == c["attention"]
        assert len(a["runs"]) == len(b["runs"]) == len(c["runs"]) == 3
        cells = [label, _accuracy(a, "test"), _accuracy(b, "test"), paper(imdb, a["attention"])]
        assert "| " + " | ".join(cells) + " |" in classify_page, cells
        held_out = _accuracy(c, "dev (held out from train)")
        cells = [label, _accuracy(c, "test"), held_out, paper(snli, c["attention"])]
        assert "| " + " | ".join(cells) + " |" in nli_page, cells

    def pair(data: dict, routed: str) -> str:
        by = {r["attention"]: r for r in data["results"]}
        return f"{_accuracy(by[routed], 'test')} ({_accuracy(by['dense'], 'test')})"

    readme = (ROOT / "README.md").read_text()
    assert f"| SortCut 2×32: {pair(imdb, 'sortcut-2x32')} |" in readme
    assert f"| SortCut 2×16: {pair(snli, 'sortcut-2x16')} |" in readme


STEP_FILE = ROOT / "benchmarks" / "results" / "recall_step.json"


def _recall_step_paragraphs() -> list[tuple[str, str]]:
    """``(page, paragraph)`` of every docs paragraph that cites the retrieval step benchmark,
    whitespace collapsed."""
    found = []
    for page in [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]:
        for para in re.split(r"\n\s*\n", page.read_text()):
            if "recall_step" in para:
                found.append((page.name, " ".join(para.split())))
    return found


def test_the_recall_step_ratios_in_the_docs_are_the_benchmark_file() -> None:
    """Each ``0.67×`` in a paragraph citing ``benchmarks.recall_step`` is a step-time ratio
    to dense of the committed benchmark file, and those that follow a kind's name are that
    kind's, in the order of the file's lengths."""
    data = json.loads(STEP_FILE.read_text())
    dense = {r["length"]: r["time_s"] for r in data["results"] if r["kind"] == "dense"}
    ratios: dict[str, list[str]] = {}
    for r in sorted(data["results"], key=lambda r: r["length"]):
        ratios.setdefault(r["kind"], []).append(f"{r['time_s'] / dense[r['length']]:.2f}")
    every = {x for xs in ratios.values() for x in xs}
    checked = 0
    for page, para in _recall_step_paragraphs():
        kind, seen = None, {}  # kind -> the ratios that follow its name
        for name, plain, ratio in re.findall(r"`([\w-]+)`|\b(local)\b|(\d\.\d\d)×", para):
            if name or plain:
                kind = name or plain
            else:
                assert ratio in every, f"{page}: {ratio}× is no ratio of {STEP_FILE.name}"
                checked += 1
                if kind in ratios:
                    seen.setdefault(kind, []).append(ratio)
        for k, shown in seen.items():  # the kind's own ratios, in length order
            rest = iter(ratios[k])
            assert all(x in rest for x in shown), f"{page}: {k} {shown} not in {ratios[k]}"
    assert checked >= 10  # the paragraphs that cite the file were found


def test_the_long_context_kinds_table_names_every_recall_kind() -> None:
    """Every name ``recall --attention`` takes has a row in the long-context page's kinds
    table."""
    from sparse_sinkhorn.experiments.recall_kinds import CONTROL_KINDS, RECALL_KINDS

    text = (DOCS / "long-context.md").read_text()
    table = text[text.index("## Kinds") : text.index("## What the measurements say")]
    cells = re.findall(r"^\| ([^|]+) \|", table, re.M)
    listed = set(re.findall(r"`([\w-]+)`", " ".join(cells)))
    assert not ({*RECALL_KINDS, *CONTROL_KINDS} - listed)


def test_the_long_context_cost_at_length_sentence_is_the_benchmark_file() -> None:
    """The long-context page's sentence on the op at 1M tokens quotes
    ``benchmarks/results/long.json``: hard routing's time and peak memory at 1M with 8 heads,
    and the growth exponents of hard routing (16K to 1M, 256K to 1M) and of local attention."""
    data = json.loads((ROOT / "benchmarks" / "results" / "long.json").read_text())
    (row,) = [
        r
        for r in data["results"]
        if r["level"] == "op" and r["contender"] == "sinkhorn_hard" and r["length"] == 1048576
    ]
    assert row["heads"] == 8 and row["status"] == "ok"
    hard, local = data["exponents"]["op/sinkhorn_hard"], data["exponents"]["op/local"]
    text = " ".join((DOCS / "long-context.md").read_text().split())
    expected = (
        f"8 heads on this 2-core, 24 GiB machine: {row['time_s']:.0f} s and "
        f"{row['peak_mem_mb']:,.0f} MiB above its inputs. Its time grows as "
        f"L^{hard['overall']['exponent']:.2f} from 16K to 1M tokens "
        f"(L^{hard['pairs'][-1]['exponent']:.2f} from 256K to 1M"
    )
    assert expected in text, expected
    assert f"local attention's as L^{local['overall']['exponent']:.2f}" in text


def test_the_static_cache_decoding_figures_are_the_generate_file() -> None:
    """docs/huggingface.md's static-cache table and the README's per-token growth are
    ``benchmarks/results/generate_static.json``: per length, prefill, per-token time and its
    ratio, block-start / median token and peak memory with its ratio."""
    meta = json.loads((ROOT / "benchmarks" / "results" / "generate_static.json").read_text())
    rows = {(r["impl"], r["length"]): r for r in meta["rows"]}
    page = (DOCS / "huggingface.md").read_text()
    for n, name in ((1024, "1K"), (4096, "4K"), (16384, "16K")):
        a, b = rows[("sdpa", n)], rows[("sinkhorn", n)]
        cells = [
            f"{a['prefill_s']:.2f} s / {b['prefill_s']:.2f} s",
            f"{1e3 * a['per_token_s']:.1f} ms / {1e3 * b['per_token_s']:.1f} ms "
            f"({b['per_token_s'] / a['per_token_s']:.2f}×)",
            f"{a['block_start_s'] / a['per_token_s']:.1f} / "
            f"{b['block_start_s'] / b['per_token_s']:.1f}",
            f"{a['peak_mem_mb']:.0f} / {b['peak_mem_mb']:.0f} MiB "
            f"({b['peak_mem_mb'] / a['peak_mem_mb']:.2f}×)",
        ]
        row = f"| {name} | " + " | ".join(cells) + " |"
        assert row in page, row
    growth = [
        rows[(i, 16384)]["per_token_s"] / rows[(i, 1024)]["per_token_s"]
        for i in ("sinkhorn", "sdpa")
    ]
    flat = " ".join(page.split())
    assert f"Per-token time at 16K is {growth[0]:.2f}× that at 1K" in flat
    assert f"({growth[1]:.2f}× with `sdpa`" in flat
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"({growth[0]:.2f}× from 1K to 16K tokens, `sdpa` {growth[1]:.2f}×" in readme
