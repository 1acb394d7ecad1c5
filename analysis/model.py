"""What an analysis of search results is: every front, table and note that the report
renders. `analysis.pareto.analyse` builds it; `analysis.report` renders it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.load import SearchSource
from analysis.objectives import Objective
from croft_search.contract import METRICS, TEST_PREFIX, VAL_PREFIX, metric_split

# The front a result can quote is chosen on validation metrics: the joint objective's.
VALIDATION_METRICS = tuple(
    name for name, spec in METRICS.items() if spec.split == "val" and "joint" in spec.objectives
)
ORACLE_TITLE = "ORACLE front: chosen on test metrics, not a result to quote"
VALIDATION_TITLE = "Validation front: chosen on validation metrics, test metrics beside"


def is_oracle(objectives: Sequence[Objective]) -> bool:
    """Whether a front over ``objectives`` is selected on test data: an oracle, labelled so
    wherever it appears."""
    return any(metric_split(o.name) == "test" for o in objectives)


def front_title(objectives: Sequence[Objective]) -> str:
    if is_oracle(objectives):
        return ORACLE_TITLE
    if all(metric_split(o.name) == "val" for o in objectives):
        return VALIDATION_TITLE
    return "Pareto front over " + ", ".join(o.name for o in objectives)


def test_companions(names: Sequence[str]) -> list[str]:
    """The test metric of each validation metric in ``names`` (val_acc -> test_acc) that the
    metric schema knows: what a validation front's trials score where it counts."""
    twins = [TEST_PREFIX + n[len(VAL_PREFIX) :] for n in names if n.startswith(VAL_PREFIX)]
    return [twin for twin in twins if twin in METRICS]


@dataclass
class FrontSummary:
    """One front: its rows (best in the first objective first), hypervolume and knee."""

    group: str
    front: pd.DataFrame
    hypervolume: float
    knee_trial: str | None
    n_ranked: int


@dataclass
class Analysis:
    """Everything `write_outputs` renders; `trials` holds every input row plus the columns
    rank / on_front (combined) and group_rank / on_group_front (within the row's group),
    missing (<NA>) for rows that were not ranked (failed, or a metric missing)."""

    trials: pd.DataFrame
    objectives: list[Objective]
    group_column: str
    reference_point: np.ndarray
    reference_origin: str
    combined: FrontSummary
    groups: list[FrontSummary]
    selection: pd.DataFrame
    ablation: pd.DataFrame
    importance: pd.DataFrame
    importance_evaluator: str | None
    counts: dict[str, int]
    statuses: str
    sources: list[SearchSource] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    protocols: list[str] = field(default_factory=list)
    # The paper-shaped table (analysis.paper_table); empty when the trials make none.
    paper: pd.DataFrame = field(default_factory=pd.DataFrame)
    # Per-epoch validation curves of the combined front's trials, by trial id (from MLflow;
    # `analysis.load.load_epoch_curves`), empty when none were read, and the one sentence
    # the report shows in their place then.
    curves: dict[str, pd.DataFrame] = field(default_factory=dict)
    curves_note: str = "No per-epoch validation curves were read for the front's trials."

    @property
    def oracle(self) -> bool:
        return is_oracle(self.objectives)

    @property
    def front_title(self) -> str:
        return front_title(self.objectives)
