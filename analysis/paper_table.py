"""The results table in the shape of the CRoFT paper's: OOD generalisation (the test
accuracy of each target domain and their average) beside OOD detection (AUROC and FPR95 of
each test open set and their mean), one row per method, or per ablation variant; every cell
the mean ± sample standard deviation over seeds, in %, of each seed's validation-selected
trial. Rendered as Markdown (`paper_markdown`) and as a booktabs LaTeX tabular (`to_latex`).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from analysis.load import COLUMN_DEFAULTS, ok_trials
from analysis.result_tables import to_markdown, validation_selected
from croft_search.contract import DOMAIN_SEPARATOR, config_column, config_key
from croft_search.errors import ConfigError

__all__ = [
    "LABELS",
    "ACCURACY",
    "AVERAGE",
    "OPEN_SET_MEAN",
    "ONE_OPEN_SET",
    "AUROC",
    "FPR95",
    "SEEDS",
    "paper_table",
    "paper_markdown",
    "to_latex",
]

# The first level of the table's columns: a paper's header row spans each group's columns.
LABELS = ""  # the row labels (method and/or variant, number of seeds) have no group title
ACCURACY = "accuracy"
AVERAGE = "avg"
OPEN_SET_MEAN = "open-set mean"
ONE_OPEN_SET = "OOD detection"  # the group of the single pair when a trial tests one set
AUROC = "AUROC ↑"
FPR95 = "FPR95 ↓"
SEEDS = "seeds"
MISSING = "–"

REQUIRED_METRICS = ("objective", "test_acc", "test_auroc", "test_fpr95")
DOMAIN_ACCURACY = "test_acc"  # "<target>/test_acc", one per target domain of a trial
SET_AUROC, SET_FPR95 = "test_auroc_", "test_fpr95_"  # + open-set name, with several sets
VARIANT = config_column("variant")
EXPLANATION = (
    "Mean ± sample standard deviation over seeds, in %. Each seed's trial is the one with "
    "the highest validation objective (selection 'val'), as the search chose; never the "
    "best on test."
)
LATEX_SPECIALS = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}  # fmt: skip
LATEX_SYMBOLS = {"±": r"$\pm$", "↑": r"$\uparrow$", "↓": r"$\downarrow$", MISSING: "--"}


def paper_table(
    trials: pd.DataFrame | Sequence[pd.DataFrame],
    rows: str | Sequence[str] | None = None,
    digits: int = 1,
) -> pd.DataFrame:
    """The paper's table of `trials` (the trials.parquet layout; several frames, e.g. one
    search per method, are concatenated): one row per value of the `rows` column(s), by
    default per method, and per `config/variant` where the trials have variants (the method
    is left out when there is one). Its columns are two-level, (group, name): the labels
    under LABELS, then ACCURACY with one column per target domain and AVERAGE (the trials'
    test_acc, the mean over their domains), then AUROC and FPR95 per test open set and
    their OPEN_SET_MEAN (the trials' test_auroc / test_fpr95), or a single ONE_OPEN_SET pair.

    Per row and seed, the finished trial with the highest validation objective
    (`validation_selected`) stands for the seed; oracle-selected trials never take part.
    Each cell is "mean ± std" (sample std) of those trials' values times 100 with `digits`
    decimals, the mean alone for a single seed, MISSING where none has a value. Rows keep
    the order of their first trial; a row without a validation-selected trial is absent.
    A ConfigError when there is no finished, validation-selected trial, no per-domain
    accuracy, a metric column missing, or no such `rows` column."""
    frame = _combined(trials)
    for column in ("status", "error", "selection"):
        if column not in frame.columns:
            frame[column] = COLUMN_DEFAULTS[column]
    finished = ok_trials(frame, "the paper table's input")
    keys = _row_keys(finished, rows)
    missing = [column for column in REQUIRED_METRICS if column not in finished.columns]
    if missing:
        raise ConfigError(f"paper table: the trials lack the column(s) {', '.join(missing)}")
    domains = _target_domains(finished)
    open_sets = [c[len(SET_AUROC) :] for c in finished.columns if c.startswith(SET_AUROC)]

    if "seed" not in finished.columns:
        finished = finished.assign(seed=pd.NA)  # one unnamed seed: every trial competes
    selected = validation_selected(finished, [*keys, "seed"])
    if selected.empty:
        raise ConfigError(
            "paper table: no finished trial has selection 'val' and an objective, so none "
            "is validation-selected (an oracle-selected search is no result)"
        )

    # (the table's column, the trials' column it summarises)
    metric_columns = [
        ((ACCURACY, domain), f"{domain}{DOMAIN_SEPARATOR}{DOMAIN_ACCURACY}") for domain in domains
    ]
    metric_columns.append(((ACCURACY, AVERAGE), "test_acc"))
    for name in open_sets:
        metric_columns += [((name, AUROC), SET_AUROC + name), ((name, FPR95), SET_FPR95 + name)]
    detection = OPEN_SET_MEAN if open_sets else ONE_OPEN_SET
    metric_columns += [((detection, AUROC), "test_auroc"), ((detection, FPR95), "test_fpr95")]

    header = [(LABELS, config_key(key) or key) for key in keys] + [(LABELS, SEEDS)]
    header += [name for name, _ in metric_columns]
    table_rows = []
    for label, members in selected.groupby(keys, sort=False, dropna=False):
        labels = [_label(value) for value in label]
        cells = [
            _mean_std(members[column] if column in members.columns else None, digits)
            for _, column in metric_columns
        ]
        table_rows.append([*labels, len(members), *cells])
    return pd.DataFrame(table_rows, columns=pd.MultiIndex.from_tuples(header))


def _combined(trials: pd.DataFrame | Sequence[pd.DataFrame]) -> pd.DataFrame:
    if isinstance(trials, pd.DataFrame):
        return trials.reset_index(drop=True)
    frames = list(trials)
    if not frames:
        raise ConfigError("paper table: no trials given")
    return pd.concat(frames, ignore_index=True)


def _row_keys(frame: pd.DataFrame, rows: str | Sequence[str] | None) -> list[str]:
    if rows is None:
        has_variants = VARIANT in frame.columns and frame[VARIANT].notna().any()
        if not has_variants:
            keys = ["method"]
        elif "method" in frame.columns and frame["method"].nunique() > 1:
            keys = ["method", VARIANT]
        else:
            keys = [VARIANT]
    else:
        keys = [part.strip() for part in rows.split(",")] if isinstance(rows, str) else list(rows)
    missing = [key for key in keys if key not in frame.columns]
    if missing or not keys:
        raise ConfigError(
            f"paper table: no column {', '.join(missing) or '(none named)'} to make the rows "
            "of; use method, source or a config/<key> column"
        )
    return keys


def _target_domains(frame: pd.DataFrame) -> list[str]:
    """The target domains with a per-domain accuracy column, in the order the trials
    trained them (their `target_domains` label: the dataset's order), then column order."""
    by_column = [
        column.rsplit(DOMAIN_SEPARATOR, 1)[0]
        for column in frame.columns
        if not config_key(column)
        and DOMAIN_SEPARATOR in column
        and column.rsplit(DOMAIN_SEPARATOR, 1)[1] == DOMAIN_ACCURACY
    ]
    if not by_column:
        raise ConfigError(
            f"paper table: the trials have no per-target-domain accuracy "
            f"(<target>{DOMAIN_SEPARATOR}{DOMAIN_ACCURACY} columns), which trials training "
            "several target domains record (target_domains: all, or a list)"
        )
    trained: list[str] = []
    if "target_domains" in frame.columns:
        for value in frame["target_domains"].dropna().unique():
            trained += str(value).split(",")
    return [domain for domain in dict.fromkeys([*trained, *by_column]) if domain in by_column]


def _label(value: object) -> str:
    return MISSING if value is None or pd.isna(value) else str(value)


def _mean_std(values: pd.Series | None, digits: int) -> str:
    if values is None:
        return MISSING
    percent = pd.to_numeric(values, errors="coerce").dropna() * 100
    if percent.empty:
        return MISSING
    mean = f"{percent.mean():.{digits}f}"
    if len(percent) == 1:
        return mean
    return f"{mean} ± {percent.std(ddof=1):.{digits}f}"


# ----------------------------------------------------------------------------- rendering


def paper_markdown(table: pd.DataFrame) -> str:
    """The table as GitHub Markdown (one header row: "group: name"), then how the cells
    were computed."""
    flat = table.copy()
    flat.columns = [
        name if group == LABELS else f"{group}: {name}" for group, name in table.columns
    ]
    return to_markdown(flat) + "\n" + EXPLANATION + "\n"


def to_latex(table: pd.DataFrame) -> str:
    """The table as a booktabs `tabular` (needs \\usepackage{booktabs}): a header row of the
    column groups, each over its columns with a \\cmidrule, a row of column names, then
    the rows; LaTeX's special characters escaped, ±, ↑, ↓ in math mode."""
    groups, names = zip(*table.columns, strict=True)
    spec = "".join(
        ("r" if name == SEEDS else "l") if group == LABELS else "c" for group, name in table.columns
    )
    spans: list[tuple[str, int, int]] = []  # (group, first column, last column), 1-based
    for position, group in enumerate(groups, start=1):
        if spans and spans[-1][0] == group:
            spans[-1] = (group, spans[-1][1], position)
        else:
            spans.append((group, position, position))
    group_cells, rules = [], []
    for group, first, last in spans:
        if group == LABELS:
            group_cells += [""] * (last - first + 1)
            continue
        group_cells.append(rf"\multicolumn{{{last - first + 1}}}{{c}}{{{_latex(group)}}}")
        rules.append(rf"\cmidrule(lr){{{first}-{last}}}")
    lines = [
        f"% {_latex(EXPLANATION)}",
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(group_cells) + r" \\",
        " ".join(rules),
        " & ".join(_latex(name) for name in names) + r" \\",
        r"\midrule",
        *(_latex_row(row) for row in table.itertuples(index=False)),
        r"\bottomrule",
        r"\end{tabular}",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def _latex_row(cells: Sequence[object]) -> str:
    return " & ".join(_latex(str(cell)) for cell in cells) + r" \\"


def _latex(text: str) -> str:
    escaped = "".join(LATEX_SPECIALS.get(character, character) for character in text)
    for symbol, replacement in LATEX_SYMBOLS.items():
        escaped = escaped.replace(symbol, replacement)
    return escaped
