"""Tables a researcher reads after a search: validation-selected versus oracle trials,
ablations over seeds, and the rendering of any table as Markdown or HTML."""

from __future__ import annotations

import html
import math
import numbers
from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis.objectives import Objective
from croft_search.contract import DEFAULT_OBJECTIVE_WEIGHT, TEST_PREFIX, config_column
from croft_search.metrics import joint_objectives

__all__ = [
    "VAL_SELECTED",
    "ORACLE",
    "ORACLE_GAP",
    "objective_weight",
    "validation_selected",
    "selection_table",
    "ablation_table",
    "to_markdown",
    "to_html",
]

VAL_SELECTED = "validation-selected"
ORACLE = "ORACLE: best on test (not a result)"
ORACLE_GAP = "oracle gap (oracle − validation-selected)"
REPORTED_TEST_METRICS = ("test_acc", "test_auroc", "test_fpr95")


def objective_weight(frame: pd.DataFrame) -> float:
    """The accuracy weight of the joint objective the search used: `config/objective_weight`
    when the trials record a single value, else joint_objective's default 0.5."""
    column = config_column("objective_weight")
    if column in frame.columns:
        values = pd.to_numeric(frame[column], errors="coerce").dropna().unique()
        if len(values) == 1:
            return float(values[0])
    return DEFAULT_OBJECTIVE_WEIGHT


def validation_selected(frame: pd.DataFrame, keys: Sequence[str] = ()) -> pd.DataFrame:
    """The trial validation selects per combination of `keys` (a single one without keys):
    the highest `objective` among the trials with selection "val", the scalar the search
    itself maximised (croft_search.selection), so no test metric takes part; the first of
    tied trials. Combinations without such a trial have no row. `frame`'s index must be
    unique (the rows are returned by index)."""
    if "objective" not in frame.columns:
        return frame.iloc[:0]
    objective = pd.to_numeric(frame["objective"], errors="coerce")
    eligible = (frame["selection"] == "val") & objective.notna()
    scores = objective[eligible]
    if scores.empty:
        return frame.iloc[:0]
    if not keys:
        return frame.loc[[scores.idxmax()]]
    by = [frame.loc[eligible, key] for key in keys]
    best = scores.groupby(by, sort=False, dropna=False).idxmax()
    return frame.loc[best.to_numpy()]


def selection_table(
    frame: pd.DataFrame,
    group_column: str = "method",
    weight: float | None = None,
    extra_metrics: Sequence[str] = (),
) -> tuple[pd.DataFrame, list[str]]:
    """Per group, three rows: the trial validation selects (highest `objective` among rows
    with selection == "val"), the ORACLE (highest `weight * test_acc + (1 - weight) *
    test_auroc` among all ok rows: what picking on the test set would claim), and the gap
    oracle − validation-selected per test metric. Returns (table, notes)."""
    notes: list[str] = []
    needed = {"test_acc", "test_auroc"} - set(frame.columns)
    if needed:
        return pd.DataFrame(), [
            f"validation-vs-oracle table skipped: the trials have no {', '.join(sorted(needed))}"
        ]
    weight = objective_weight(frame) if weight is None else weight
    test_metrics = [m for m in REPORTED_TEST_METRICS if m in frame.columns]
    test_metrics += [
        m for m in extra_metrics if m.startswith(TEST_PREFIX) and m not in test_metrics
    ]
    score_name = f"test objective ({weight:g}·acc + {1 - weight:g}·auroc)"
    rows = []
    for group, members in frame.groupby(group_column, sort=True):
        test_score = pd.Series(
            joint_objectives(members["test_acc"], members["test_auroc"], weight),
            index=members.index,
        )
        oracle_pool = test_score.dropna()
        if oracle_pool.empty:
            notes.append(f"{group}: no trial has test_acc and test_auroc; no oracle row")
            continue
        oracle = members.loc[oracle_pool.idxmax()]
        oracle_row = _describe(group, ORACLE, oracle, test_metrics)
        oracle_row[score_name] = float(oracle_pool.max())
        validated = validation_selected(members)
        if validated.empty:
            notes.append(
                f"{group}: no trial with selection 'val' and an objective, so no "
                "validation-selected trial; only the oracle is shown"
            )
            rows.append(oracle_row)
            continue
        chosen = validated.iloc[0]
        chosen_row = _describe(group, VAL_SELECTED, chosen, test_metrics)
        chosen_row[score_name] = float(test_score.loc[chosen.name])
        gap_row: dict[str, object] = {"group": group, "row": ORACLE_GAP}
        for metric in [*test_metrics, score_name]:
            gap_row[metric] = _float(oracle_row[metric]) - _float(chosen_row[metric])
        rows += [chosen_row, oracle_row, gap_row]
    table = pd.DataFrame(rows)
    if not table.empty:
        table = table.rename(columns={"group": group_column})
    return table, notes


def _describe(group: object, label: str, trial: pd.Series, test_metrics: Sequence[str]) -> dict:
    row: dict[str, object] = {
        "group": group,
        "row": label,
        "trial_id": trial["trial_id"],
        "selection": trial.get("selection", ""),
        "val objective": _float(trial.get("objective", math.nan)),
    }
    for metric in test_metrics:
        row[metric] = _float(trial.get(metric, math.nan))
    return row


def _float(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def ablation_table(
    frame: pd.DataFrame,
    metrics: Sequence[str],
    variant_column: str = config_column("variant"),
    reference_variant: str = "full",
) -> tuple[pd.DataFrame, list[str]]:
    """Mean and sample standard deviation over seeds of each metric per variant (per method
    when there are several), and the difference of the means to the `full` variant.

    When a variant has several trials for one seed (its hyper-parameters were searched too),
    the validation-selected trial of that seed stands for it, so the spread is over seeds.
    Returns (table, notes); an empty table when there is no `variant_column`."""
    if variant_column not in frame.columns:
        return pd.DataFrame(), []
    notes: list[str] = []
    rows = frame[frame[variant_column].notna()].copy()
    keys = ["method", variant_column] if rows["method"].nunique() > 1 else [variant_column]
    seed_keys = [*keys, "seed"] if "seed" in rows.columns else keys
    if "seed" in rows.columns and rows.duplicated(seed_keys).any():
        rows = _one_trial_per_seed(rows, seed_keys)
        notes.append(
            "ablation: several trials per variant and seed; each seed is represented by its "
            "validation-selected trial (highest objective among selection 'val')"
        )
    grouped = rows.groupby(keys, sort=False, dropna=False)
    table = grouped.size().rename("n seeds").to_frame()
    for metric in metrics:
        table[f"{metric} mean"] = grouped[metric].mean()
        table[f"{metric} std"] = grouped[metric].std(ddof=1)
    table = table.reset_index().rename(columns={variant_column: "variant"})
    table["variant"] = table["variant"].astype(str)
    # The reference variant first, then the others in name order (per method).
    table["_not_reference"] = table["variant"] != reference_variant
    order = [*(["method"] if len(keys) > 1 else []), "_not_reference", "variant"]
    table = table.sort_values(order, kind="stable").drop(columns="_not_reference")
    table = table.reset_index(drop=True)
    if (table["variant"] == reference_variant).any():
        for metric in metrics:
            delta = table[f"{metric} mean"] - _reference_mean(
                table, metric, keys, reference_variant
            )
            table[f"{metric} Δ vs {reference_variant}"] = delta
            # Beyond the seed spread: |Δ| above the larger of the two seed standard
            # deviations; unknown (None) where either has a single seed.
            spread = np.maximum(
                table[f"{metric} std"],
                _reference_mean(table, metric, keys, reference_variant, column="std"),
            )
            table[f"{metric} beyond spread"] = [
                None if math.isnan(s) else bool(abs(d) > s)
                for d, s in zip(delta, spread, strict=True)
            ]
    else:
        notes.append(f"ablation: no {reference_variant!r} variant, so no differences to it")
    return table, notes


def _one_trial_per_seed(rows: pd.DataFrame, seed_keys: Sequence[str]) -> pd.DataFrame:
    preferred = rows.assign(
        _is_val=rows["selection"] == "val",
        _objective=rows["objective"] if "objective" in rows.columns else 0.0,
    )
    preferred = preferred.sort_values(["_is_val", "_objective"], ascending=False, kind="stable")
    picked = preferred.drop_duplicates(list(seed_keys), keep="first")
    return picked.drop(columns=["_is_val", "_objective"]).sort_index()


def _reference_mean(
    table: pd.DataFrame,
    metric: str,
    keys: Sequence[str],
    reference_variant: str,
    column: str = "mean",
) -> pd.Series:
    """The reference variant's mean (or ``column``) for each row's method (or the single
    one)."""
    reference = table[table["variant"] == reference_variant]
    if len(keys) == 1:
        return pd.Series(float(reference[f"{metric} {column}"].iloc[0]), index=table.index)
    by_method = reference.set_index("method")[f"{metric} {column}"]
    return table["method"].map(by_method).astype(float)


# ----------------------------------------------------------------------------- rendering


def format_cell(value: object, digits: int = 4) -> str:
    """Numbers with a fixed number of decimals, missing values as an en dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        number = float(value)
        if math.isnan(number):
            return "–"
        if number != 0 and not 10 ** -(digits - 1) <= abs(number) < 1e5:
            return f"{number:.{digits}g}"  # tiny learning rates and large counts stay legible
        return f"{number:.{digits}f}"
    return str(value)


def to_markdown(table: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub-flavoured Markdown table (pipes in cells escaped)."""
    if table.empty:
        return "_(no rows)_\n"
    header = [str(column) for column in table.columns]

    def cell(value: object) -> str:
        return format_cell(value, digits).replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(cell(name) for name in header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for row in table.itertuples(index=False):
        lines.append("| " + " | ".join(cell(value) for value in row) + " |")
    return "\n".join(lines) + "\n"


def to_html(table: pd.DataFrame, digits: int = 4, highlight: str | None = None) -> str:
    """An HTML table; rows whose `row` column starts with `highlight` get class "oracle"."""
    if table.empty:
        return "<p><em>(no rows)</em></p>\n"
    head = "".join(f"<th>{html.escape(str(column))}</th>" for column in table.columns)
    body = []
    for _, row in table.iterrows():
        marked = highlight and str(row.get("row", "")).startswith(highlight)
        cells = "".join(f"<td>{html.escape(format_cell(value, digits))}</td>" for value in row)
        opening = '<tr class="oracle">' if marked else "<tr>"
        body.append(f"{opening}{cells}</tr>")
    return (
        "<table>\n<thead><tr>" + head + "</tr></thead>\n<tbody>\n" + "\n".join(body)
        + "\n</tbody>\n</table>\n"
    )  # fmt: skip


def objectives_note(objectives: Sequence[Objective]) -> str:
    return ", ".join(
        f"{o.name} ({'higher' if o.maximize else 'lower'} is better)" for o in objectives
    )
