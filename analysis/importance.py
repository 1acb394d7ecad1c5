"""Hyper-parameter importance per objective, from Optuna's importance evaluators.

The finished trials are turned back into an in-memory Optuna study (one per method and
metric) with distributions inferred from the values the search tried, so the evaluators see
what they would see on the live study, whether the rows came from trials.parquet or MLflow.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence

import numpy as np
import optuna
import pandas as pd
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from analysis.objectives import Objective
from croft_search.contract import config_key

__all__ = [
    "EVALUATORS",
    "MIN_TRIALS",
    "infer_distribution",
    "study_from_trials",
    "param_importances",
    "importance_table",
]

MIN_TRIALS = 4  # fewer than this and any importance is noise
LOG_SCALE_SPAN = 100.0  # positive values spanning more than two decades are log-scaled
EVALUATORS = ("fanova", "ped-anova")


def infer_distribution(values: pd.Series) -> BaseDistribution | None:
    """The distribution a search would have sampled these values from; None when the values
    cannot form one (missing values, non-finite numbers) or do not vary."""
    if values.isna().any() or values.nunique() < 2:
        return None
    if pd.api.types.is_bool_dtype(values) or not pd.api.types.is_numeric_dtype(values):
        return CategoricalDistribution(sorted({_plain(v) for v in values}, key=str))
    numbers = values.to_numpy(dtype=np.float64)
    if not np.isfinite(numbers).all():
        return None
    low, high = float(numbers.min()), float(numbers.max())
    log = low > 0 and high / low > LOG_SCALE_SPAN
    if pd.api.types.is_integer_dtype(values):
        return IntDistribution(int(low), int(high), log=log)
    return FloatDistribution(low, high, log=log)


def _plain(value: object) -> object:
    """numpy scalars -> Python scalars (Optuna's categorical choices must be plain)."""
    return value.item() if isinstance(value, np.generic) else value


def study_from_trials(
    trials: pd.DataFrame, metric: str, maximize: bool, params: Sequence[str]
) -> optuna.Study:
    """An in-memory study holding one completed trial per row with a finite `metric`;
    `params` are columns (their `config/` prefix dropped in the study)."""
    distributions: dict[str, BaseDistribution] = {}
    column_of: dict[str, str] = {}
    for column in params:
        distribution = infer_distribution(trials[column])
        if distribution is not None:
            name = config_key(column) or column
            distributions[name] = distribution
            column_of[name] = column
    study = optuna.create_study(direction="maximize" if maximize else "minimize")
    for _, row in trials.iterrows():
        value = float(row[metric])
        if not math.isfinite(value):
            continue
        values = {name: _cast(row[column_of[name]], dist) for name, dist in distributions.items()}
        study.add_trial(
            optuna.trial.create_trial(params=values, distributions=distributions, value=value)
        )
    return study


def _cast(value: object, distribution: BaseDistribution) -> object:
    if isinstance(distribution, IntDistribution):
        return int(value)  # type: ignore[call-overload]
    if isinstance(distribution, FloatDistribution):
        return float(value)  # type: ignore[arg-type]
    return _plain(value)


def varying_params(trials: pd.DataFrame) -> list[str]:
    """`config/` columns that take more than one value and are set in every row."""
    return [
        column
        for column in trials.columns
        if config_key(column) and infer_distribution(trials[column]) is not None
    ]


def _evaluator(name: str, seed: int) -> optuna.importance.BaseImportanceEvaluator:
    if name == "fanova":
        return optuna.importance.FanovaImportanceEvaluator(seed=seed)
    if name == "ped-anova":
        return optuna.importance.PedAnovaImportanceEvaluator()
    raise ValueError(f"unknown importance evaluator {name!r}; known: {', '.join(EVALUATORS)}")


def param_importances(
    trials: pd.DataFrame,
    objective: Objective,
    evaluator: str = "fanova",
    seed: int = 0,
) -> dict[str, float] | str:
    """{parameter: importance} (normalised to sum to 1, most important first), or a string
    saying why it was skipped (too few trials, nothing varies)."""
    rows = trials[np.isfinite(pd.to_numeric(trials[objective.name], errors="coerce"))]
    if len(rows) < MIN_TRIALS:
        return f"skipped: {len(rows)} trial(s) with {objective.name}, needs at least {MIN_TRIALS}"
    params = varying_params(rows)
    if not params:
        return "skipped: no hyper-parameter varies across these trials"
    study = study_from_trials(rows, objective.name, objective.maximize, params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental-feature warnings, not actionable here
        importances = optuna.importance.get_param_importances(
            study, evaluator=_evaluator(evaluator, seed)
        )
    return dict(sorted(importances.items(), key=lambda item: -item[1]))


def importance_table(
    trials: pd.DataFrame,
    objectives: Sequence[Objective],
    group_column: str = "method",
    evaluator: str = "fanova",
    seed: int = 0,
) -> tuple[pd.DataFrame, list[str]]:
    """Importance of every varying hyper-parameter, per group and objective (long form:
    group, metric, parameter, importance, rank). Returns (table, notes on skipped cases)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna").setLevel(logging.WARNING)
    rows, notes = [], []
    for group, members in trials.groupby(group_column, sort=True):
        for objective in objectives:
            result = param_importances(members, objective, evaluator, seed)
            if isinstance(result, str):
                notes.append(f"importance for {group}, {objective.name}: {result}")
                continue
            for rank, (name, value) in enumerate(result.items(), start=1):
                rows.append(
                    {
                        group_column: group,
                        "metric": objective.name,
                        "parameter": name,
                        "importance": value,
                        "rank": rank,
                    }
                )
    return pd.DataFrame(rows), notes
