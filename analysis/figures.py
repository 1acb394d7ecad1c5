"""The figures researchers expect beside the Pareto plot, as Optuna, W&B and
optuna-dashboard draw them: optimisation history, parallel coordinates, hyper-parameter
importance bars and the front's per-epoch validation curves. Each function returns a
matplotlib Figure (Agg, no pyplot state) or None when the trials cannot make it, with the
reason in `why_not`; `analysis.pareto.write_outputs` saves each as a PNG and the report
embeds them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: no display on search machines or in CI

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from analysis.importance import infer_distribution  # noqa: E402
from croft_search.contract import config_key, metric_direction  # noqa: E402

__all__ = [
    "OBJECTIVE",
    "history_figure",
    "running_best",
    "parallel_coordinates_figure",
    "importance_figure",
    "curves_figure",
]

OBJECTIVE = "objective"  # the search's scalar objective, as each trial recorded it
CURVE_PREFIX = "epoch_"  # per-epoch metrics as MLflow holds them (croft_search.tracking)
MAX_CURVE_PANELS = 3


def _figure(width: float = 8.0, height: float = 5.0) -> Figure:
    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def running_best(values: Sequence[float], maximize: bool = True) -> np.ndarray:
    """The best value seen so far at each position."""
    array = np.asarray(values, dtype=np.float64)
    return np.maximum.accumulate(array) if maximize else np.minimum.accumulate(array)


def _scored(trials: pd.DataFrame) -> pd.DataFrame:
    """Trials that finished or were stopped with a finite objective, in completion order."""
    if OBJECTIVE not in trials.columns:
        return trials.iloc[0:0]
    rows = trials[trials["status"].isin(["ok", "stopped"])].copy()
    rows[OBJECTIVE] = pd.to_numeric(rows[OBJECTIVE], errors="coerce")
    rows = rows[np.isfinite(rows[OBJECTIVE].astype(float))]
    if "finished_at" in rows.columns and rows["finished_at"].notna().all():
        rows = rows.sort_values("finished_at", kind="stable")
    return rows.reset_index(drop=True)


def history_figure(trials: pd.DataFrame) -> Figure | None:
    """The objective of every trial in the order trials finished, and the running best
    (Optuna's plot_optimization_history)."""
    rows = _scored(trials)
    if rows.empty:
        return None
    maximize = metric_direction(OBJECTIVE) is not False
    figure = _figure()
    axes = figure.add_subplot()
    order = np.arange(1, len(rows) + 1)
    for status, marker in (("ok", "o"), ("stopped", "x")):
        chosen = rows["status"] == status
        if chosen.any():
            axes.scatter(order[chosen], rows.loc[chosen, OBJECTIVE], marker=marker, s=22,
                         label=f"{status} ({int(chosen.sum())})", alpha=0.8)  # fmt: skip
    axes.step(order, running_best(rows[OBJECTIVE], maximize), where="post", color="black",
              label="best so far")  # fmt: skip
    axes.set_xlabel("trial, in the order trials finished")
    axes.set_ylabel(f"{OBJECTIVE} (validation; {'higher' if maximize else 'lower'} is better)")
    axes.set_title("Optimisation history")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    return figure


def searched_parameters(trials: pd.DataFrame) -> list[str]:
    """The config columns whose values vary: the searched hyper-parameters."""
    return [c for c in trials.columns if config_key(c) and trials[c].nunique(dropna=True) > 1]


def parallel_coordinates_figure(
    trials: pd.DataFrame, front_ids: Sequence[str] = ()
) -> Figure | None:
    """One line per trial across its searched hyper-parameters (each axis scaled to its
    range, log where the values span decades, categories spaced evenly) to its objective,
    coloured by the objective; the front's trials drawn on top in black."""
    rows = _scored(trials)
    columns = searched_parameters(rows)
    if rows.empty or not columns:
        return None
    axes_values, ticks = [], []
    for column in [*columns, OBJECTIVE]:
        scaled, labels = _unit_scale(rows[column])
        axes_values.append(scaled)
        ticks.append(labels)
    matrix = np.column_stack(axes_values)
    objective = rows[OBJECTIVE].to_numpy(dtype=np.float64)
    span = np.ptp(objective) or 1.0
    colours = matplotlib.colormaps["viridis"]((objective - objective.min()) / span)
    figure = _figure(max(6.0, 1.6 * matrix.shape[1]), 5.0)
    axes = figure.add_subplot()
    x = np.arange(matrix.shape[1])
    on_front = rows["trial_id"].astype(str).isin({str(t) for t in front_ids}).to_numpy()
    for row, colour, front in zip(matrix, colours, on_front, strict=True):
        if not front:
            axes.plot(x, row, color=colour, alpha=0.55, linewidth=1.0)
    for row in matrix[on_front]:
        axes.plot(x, row, color="black", linewidth=1.8, alpha=0.9)
    names = [config_key(c) for c in columns] + [OBJECTIVE]
    axes.set_xticks(x, [f"{n}\n{lo} … {hi}" for n, (lo, hi) in zip(names, ticks, strict=True)],
                    fontsize=8)  # fmt: skip
    axes.set_yticks([0, 1], ["min", "max"])
    for position in x:
        axes.axvline(position, color="#999", linewidth=0.8)
    axes.set_title("Parallel coordinates (colour: objective; black: the front's trials)")
    return figure


def _unit_scale(values: pd.Series) -> tuple[np.ndarray, tuple[str, str]]:
    """``values`` mapped to [0, 1] for one axis, and the labels of its ends."""
    distribution = infer_distribution(values)
    if distribution is not None and hasattr(distribution, "choices"):
        order = {v: i for i, v in enumerate(sorted({str(v) for v in values}))}
        codes = values.astype(str).map(order).to_numpy(dtype=np.float64)
        top = max(len(order) - 1, 1)
        return codes / top, (min(order), max(order))
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    shown = (f"{np.nanmin(numbers):.3g}", f"{np.nanmax(numbers):.3g}")
    if distribution is not None and getattr(distribution, "log", False):
        numbers = np.log10(numbers)
    low, high = np.nanmin(numbers), np.nanmax(numbers)
    return (numbers - low) / ((high - low) or 1.0), shown


def importance_figure(importance: pd.DataFrame, group_column: str) -> Figure | None:
    """Hyper-parameter importance as horizontal bars: a panel per metric, a bar per
    parameter and group."""
    if importance.empty:
        return None
    metrics = list(dict.fromkeys(importance["metric"]))
    groups = list(dict.fromkeys(importance[group_column].astype(str)))
    parameters = list(dict.fromkeys(importance["parameter"]))
    figure = _figure(4.5 * len(metrics), 1.2 + 0.45 * len(parameters) * max(1, len(groups) / 2))
    height = 0.8 / len(groups)
    for index, metric in enumerate(metrics):
        axes = figure.add_subplot(1, len(metrics), index + 1)
        chosen = importance[importance["metric"] == metric]
        for offset, group in enumerate(groups):
            values = chosen[chosen[group_column].astype(str) == group].set_index("parameter")
            widths = [float(values["importance"].get(p, 0.0)) for p in parameters]
            positions = np.arange(len(parameters)) + offset * height
            axes.barh(positions, widths, height=height, label=group)
        axes.set_yticks(np.arange(len(parameters)) + height * (len(groups) - 1) / 2, parameters)
        axes.invert_yaxis()
        axes.set_xlabel("importance (sums to 1)")
        axes.set_title(metric)
        axes.grid(True, axis="x", alpha=0.3)
        if len(groups) > 1 and index == 0:
            axes.legend(fontsize=8, title=group_column, title_fontsize=8)
    figure.suptitle("Hyper-parameter importance")
    return figure


def curves_figure(curves: Mapping[str, pd.DataFrame]) -> Figure | None:
    """Per-epoch validation curves of the given trials (columns ``epoch_<metric>`` by
    ``step``): a panel per metric, the objective first."""
    curves = {trial: frame for trial, frame in curves.items() if not frame.empty}
    if not curves:
        return None
    found = list(dict.fromkeys(c for frame in curves.values() for c in frame.columns))
    metrics = [c for c in found if c == CURVE_PREFIX + OBJECTIVE]
    metrics += [c for c in found if c.startswith(CURVE_PREFIX) and c not in metrics]
    metrics = metrics[:MAX_CURVE_PANELS]
    if not metrics:
        return None
    figure = _figure(4.2 * len(metrics), 4.2)
    for index, metric in enumerate(metrics):
        axes = figure.add_subplot(1, len(metrics), index + 1)
        for trial, frame in curves.items():
            if metric in frame.columns:
                data = frame[["step", metric]].dropna().sort_values("step")
                axes.plot(data["step"], data[metric], marker=".", linewidth=1.2, label=trial)
        axes.set_xlabel("epoch")
        axes.set_title(metric[len(CURVE_PREFIX) :])
        axes.grid(True, alpha=0.3)
        if index == 0 and len(curves) <= 12:
            axes.legend(fontsize=7, title="trial", title_fontsize=7)
    figure.suptitle("Validation curves of the front's trials")
    return figure
