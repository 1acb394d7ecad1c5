"""Which metric columns can be objectives, which way each one is better, and the hypervolume
reference point (stated, parsed or derived from the data)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from croft_search.contract import config_key, metric_direction
from croft_search.errors import ConfigError

__all__ = [
    "Objective",
    "metric_direction",
    "metric_columns",
    "parse_objectives",
    "default_reference_point",
    "parse_reference_point",
]

# Metrics that are fractions in [0, 1]: their natural worst value is a fixed bound.
FRACTION_METRICS = re.compile(r"(^|_)(fpr\d*|acc|accuracy|auroc|aupr(_in|_out)?|objective)$")

# Numeric columns that describe a trial rather than measure it.
NOT_METRICS = frozenset({"seed"})


@dataclass(frozen=True)
class Objective:
    """A metric column and whether larger values are better."""

    name: str
    maximize: bool

    @property
    def direction(self) -> str:
        return "max" if self.maximize else "min"

    def axis_label(self, axis: str) -> str:
        """Axis label with an arrow pointing the way the plot improves."""
        if axis == "x":
            hint = "better →" if self.maximize else "← better"
        else:
            hint = "better ↑" if self.maximize else "better ↓"
        wording = "higher" if self.maximize else "lower"
        return f"{self.name}  ({wording} is better, {hint})"


def metric_columns(frame: pd.DataFrame) -> list[str]:
    """Numeric columns that can serve as objectives (not configuration, not the seed)."""
    return [
        column
        for column in frame.columns
        if config_key(column) is None
        and column not in NOT_METRICS
        and pd.api.types.is_numeric_dtype(frame[column])
        and not pd.api.types.is_bool_dtype(frame[column])
    ]


def parse_objectives(spec: str | Sequence[str], available: Sequence[str]) -> list[Objective]:
    """`"test_acc,test_fpr95"` (or a list) -> objectives; `name:max` / `name:min` override
    the direction table. Unknown names raise a ConfigError listing the metric columns."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [item.strip() for item in items if item.strip()]
    if len(items) < 2:
        raise ConfigError(
            f"name at least two metrics to build a Pareto front, got {items or 'none'}"
        )
    objectives: list[Objective] = []
    for item in items:
        name, _, direction = item.rpartition(":") if ":" in item else (item, "", "")
        name = name.strip()
        if name not in available:
            raise ConfigError(
                f"unknown metric {name!r}; metric columns in these trials: "
                f"{', '.join(available) or 'none'}"
            )
        if direction:
            if direction.strip().lower() not in ("max", "min"):
                raise ConfigError(
                    f"direction of {name!r} must be 'max' or 'min', got {direction!r}"
                )
            maximize = direction.strip().lower() == "max"
        else:
            known = metric_direction(name)
            if known is None:
                raise ConfigError(
                    f"no known direction for metric {name!r}; write {name}:max or {name}:min"
                )
            maximize = known
        if any(objective.name == name for objective in objectives):
            raise ConfigError(f"metric {name!r} is named twice")
        objectives.append(Objective(name, maximize))
    return objectives


def default_reference_point(values: np.ndarray, objectives: Sequence[Objective]) -> np.ndarray:
    """A point worse than every trial, in the metrics' own units.

    Fractions in [0, 1] (accuracy, AUROC, AUPR, objective, FPR) use their worst possible
    value (0 when maximised, 1 when minimised), so hypervolumes stay comparable between
    searches. Anything else (or a "fraction" with values outside [0, 1], e.g. percent) uses
    the worst observed value pushed out by 10% of the observed range (or 1 when constant)."""
    reference = []
    for column, objective in zip(np.asarray(values, dtype=np.float64).T, objectives, strict=True):
        finite = column[np.isfinite(column)]
        if FRACTION_METRICS.search(objective.name.rsplit("/", 1)[-1].lower()) and (
            finite.size == 0 or (finite.min() >= 0.0 and finite.max() <= 1.0)
        ):
            reference.append(0.0 if objective.maximize else 1.0)
            continue
        if finite.size == 0:
            raise ConfigError(f"metric {objective.name!r} has no finite values")
        spread = float(finite.max() - finite.min())
        margin = 0.1 * spread if spread > 0 else 1.0
        reference.append(
            float(finite.min()) - margin if objective.maximize else float(finite.max()) + margin
        )
    return np.asarray(reference, dtype=np.float64)


def parse_reference_point(text: str, objectives: Sequence[Objective]) -> np.ndarray:
    """`"0,1"` (comma or space separated, one value per metric) -> a float array."""
    parts = [part for part in re.split(r"[,\s]+", text.strip()) if part]
    names = ", ".join(objective.name for objective in objectives)
    if len(parts) != len(objectives):
        raise ConfigError(
            f"the reference point needs {len(objectives)} values ({names}), got {text!r}"
        )
    try:
        point = np.asarray([float(part) for part in parts], dtype=np.float64)
    except ValueError:
        raise ConfigError(f"the reference point must be numbers ({names}), got {text!r}") from None
    if not np.isfinite(point).all():
        raise ConfigError(f"the reference point must be finite, got {text!r}")
    return point
