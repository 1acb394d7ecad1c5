"""Model selection without peeking at test data.

Validation protocol (training-domain validation, DomainBed's default):
- validation metrics come from the source domains' ``val`` split (ID accuracy, ID side of
  the detection metrics) and from the validation-only open-set classes in the source
  domains' styles (OOD side);
- test metrics come from the held-out target domain's images and the test-only open-set
  classes; they are computed and reported, never used to choose anything;
- the search objective is ``joint_objective(val_acc, val_auroc, weight)``
  = ``weight * val_acc + (1 - weight) * val_auroc``: both live in [0, 1], ``weight`` sets
  the trade-off between OOD generalisation and OOD detection (0.5 by default), and a
  multi-objective search uses the pair itself instead.

``oracle`` selection puts the test metrics into the objective instead. It exists to measure
how optimistic test-set selection is, and every result it produces records
``selection = "oracle"`` so nobody mistakes it for a result.
"""

from __future__ import annotations

from collections.abc import Mapping

from croft_search.contract import DEFAULT_OBJECTIVE_WEIGHT, SELECTION_MODES
from croft_search.errors import ConfigError
from croft_search.metrics import joint_objective


def check_selection(mode: str) -> str:
    if mode not in SELECTION_MODES:
        raise ConfigError(
            f"unknown selection mode {mode!r}; use 'val' (training-domain validation) or "
            "'oracle' (test-set selection, flagged in every result)"
        )
    return mode


def objective(
    metrics: Mapping[str, float], mode: str = "val", weight: float = DEFAULT_OBJECTIVE_WEIGHT
) -> float:
    """The scalar a search maximises, from validation metrics unless ``mode`` is oracle."""
    prefix = "test" if check_selection(mode) == "oracle" else "val"
    return joint_objective(metrics[f"{prefix}_acc"], metrics[f"{prefix}_auroc"], weight)
