"""What an analysis of search results is: every front, table and note that the report
renders. `analysis.pareto.analyse` builds it; `analysis.report` renders it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.load import SearchSource
from analysis.objectives import Objective


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
