"""The Pareto plot: every finished trial coloured by group, each group's front and the
combined front drawn as staircases, the knee marked, axis labels that say which way is
better. Rendered with the Agg backend through a bare Figure (no pyplot global state)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on search machines or in CI

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from analysis.model import front_title, is_oracle, test_companions  # noqa: E402
from analysis.objectives import Objective  # noqa: E402
from croft_search.fronts import oriented  # noqa: E402

__all__ = ["staircase", "pareto_figure", "plot_fronts"]

ORACLE_COLOUR = "#c0392b"  # the report's oracle red
TEST_LABEL = "combined front on test ({}, {})"  # the legend entry of the test points


def staircase(front: np.ndarray, maximize: Sequence[bool]) -> np.ndarray:
    """Vertices of the boundary of the region a 2-D front dominates, in the metrics' own
    units: the step line from the front's best-in-y point to its best-in-x point."""
    signs = np.where(np.asarray(maximize, dtype=bool), 1.0, -1.0)
    points = oriented(front, maximize)
    points = np.unique(points, axis=0)  # sorted by x ascending, so y descends on a front
    vertices = [points[0]]
    for previous, current in zip(points[:-1], points[1:], strict=True):
        vertices.append(np.array([previous[0], current[1]]))  # down, then across
        vertices.append(current)
    # Negating an axis mirrors the picture, so the steps stay steps in the metrics' units.
    return np.asarray(vertices) * signs


def plot_fronts(
    trials: pd.DataFrame,
    objectives: Sequence[Objective],
    path: str | Path,
    group_column: str = "group",
    knee_trial: object | None = None,
    title: str = "",
) -> Path:
    """Save `pareto_figure` of these arguments to `path` (PNG) and return the path."""
    path = Path(path)
    pareto_figure(trials, objectives, group_column, knee_trial, title).savefig(path)
    return path


def pareto_figure(
    trials: pd.DataFrame,
    objectives: Sequence[Objective],
    group_column: str = "group",
    knee_trial: object | None = None,
    title: str = "",
) -> Figure:
    """The plot of the first two objectives.

    `trials` holds the ranked rows: columns `rank` (combined) and `group_rank` (within the
    group), as written by analysis.pareto. With more than two objectives the fronts are
    over all of them, so they are marked as points instead of drawn as staircases. An
    oracle's plot (fronts over test metrics) says so in red in its title and front; a
    validation front's trials are also drawn at their test metrics, joined to their
    validation points, so the plot shows what the front is worth on test."""
    oracle = is_oracle(objectives)
    x_objective, y_objective = objectives[0], objectives[1]
    directions = [x_objective.maximize, y_objective.maximize]
    two_objectives = len(objectives) == 2
    figure = Figure(figsize=(8.0, 6.0), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    groups = list(dict.fromkeys(sorted(trials[group_column].astype(str))))
    colours = matplotlib.colormaps["tab10" if len(groups) <= 10 else "tab20"]

    for index, group in enumerate(groups):
        members = trials[trials[group_column].astype(str) == group]
        colour = colours(index % colours.N)
        axes.scatter(
            members[x_objective.name], members[y_objective.name],
            s=18, alpha=0.45, color=colour, edgecolors="none", label=f"{group} ({len(members)})",
        )  # fmt: skip
        front = members[members["group_rank"] == 0][[x_objective.name, y_objective.name]]
        if two_objectives:
            line = staircase(front.to_numpy(), directions)
            axes.plot(line[:, 0], line[:, 1], color=colour, linewidth=1.6, alpha=0.9)
        axes.scatter(
            front[x_objective.name], front[y_objective.name],
            s=34, color=colour, edgecolors="black", linewidths=0.6, zorder=3,
        )  # fmt: skip

    combined = trials[trials["rank"] == 0][[x_objective.name, y_objective.name]]
    front_colour = ORACLE_COLOUR if oracle else "black"
    if two_objectives:
        line = staircase(combined.to_numpy(), directions)
        axes.plot(
            line[:, 0], line[:, 1], color=front_colour, linestyle="--", linewidth=1.4,
            label="combined front (ORACLE)" if oracle else "combined front", zorder=4,
        )  # fmt: skip
    else:
        axes.scatter(
            combined[x_objective.name], combined[y_objective.name], s=80,
            facecolors="none", edgecolors="black", linewidths=1.0, zorder=4,
            label=f"front over all {len(objectives)} metrics",
        )  # fmt: skip
    if knee_trial is not None:
        knee = trials[trials["trial_id"] == knee_trial]
        axes.scatter(
            knee[x_objective.name], knee[y_objective.name], marker="*", s=260,
            color="gold", edgecolors="black", linewidths=0.8, zorder=5, label="knee",
        )  # fmt: skip

    twins = _test_twins(trials, [x_objective.name, y_objective.name]) if not oracle else []
    if twins:
        _draw_on_test(axes, trials[trials["rank"] == 0], [x_objective.name, y_objective.name],
                      twins)  # fmt: skip
    axes.set_xlabel(x_objective.axis_label("x") + (f"\n(◇: {twins[0]})" if twins else ""))
    axes.set_ylabel(y_objective.axis_label("y") + (f"\n(◇: {twins[1]})" if twins else ""))
    shown = f"{x_objective.name} vs {y_objective.name}"
    if not two_objectives:
        shown += f" (fronts over {', '.join(o.name for o in objectives)})"
    axes.set_title(
        "\n".join(part for part in (front_title(objectives), title, shown) if part), fontsize=11,
        color=front_colour,
    )  # fmt: skip
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8, loc="best", title="colour = " + group_column, title_fontsize=8)
    return figure


def _test_twins(trials: pd.DataFrame, names: Sequence[str]) -> list[str]:
    """The test metric of each axis's validation metric, or [] when either axis has none
    (a front over val_acc and the objective has no test point to draw)."""
    twins = [test_companions([name]) for name in names]
    if all(len(twin) == 1 and twin[0] in trials.columns for twin in twins):
        return [twin[0] for twin in twins]
    return []


def _draw_on_test(
    axes: Axes, front: pd.DataFrame, names: Sequence[str], twins: Sequence[str]
) -> None:
    """Each front trial's test point (open diamond), joined to its validation point: the
    distance is what choosing on validation costs on test."""
    front = front[[*names, *twins]].apply(pd.to_numeric, errors="coerce").dropna()
    if front.empty:  # no front trial was tested: no legend entry for points not drawn
        return
    for _, row in front.iterrows():
        axes.plot([row[names[0]], row[twins[0]]], [row[names[1]], row[twins[1]]],
                  color="grey", linestyle=":", linewidth=0.9, zorder=3)  # fmt: skip
    axes.scatter(
        front[twins[0]], front[twins[1]], marker="D", s=30, facecolors="none",
        edgecolors="black", linewidths=0.9, zorder=4, label=TEST_LABEL.format(*twins),
    )  # fmt: skip
