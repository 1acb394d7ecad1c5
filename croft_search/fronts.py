"""Pareto ranks, hypervolume and knee point for any number of objectives (pure numpy).

Conventions used by every function here:
- `values` is an (n, k) array, one row per trial and one column per objective;
- `maximize` says per column whether larger is better (default: all maximised); minimised
  columns are negated internally, so "a dominates b" always reads "a >= b everywhere and
  a > b somewhere" (weak Pareto dominance). Identical points never dominate each other, so
  they share a rank;
- rank 0 is the non-dominated front, rank r the front left after peeling ranks 0..r-1.

How `pareto_ranks` stays fast. The rank of a point equals the length of the longest chain of
points dominating it (peeling fronts and longest chains give the same numbers). The points
are de-duplicated and visited in descending lexicographic order, so every dominator of a
point is visited before it; a point's rank is then the number of existing fronts that hold a
dominator, and those fronts always form a prefix 0..r-1 (a dominator in front j is itself
dominated by a point of front j-1), so a binary search over the fronts finds it:
- 2 objectives: each front is represented by its last point and the search is a single
  `bisect` over one integer per front (patience sorting), O(n log n) in total;
- 3 objectives: every earlier point is already at least as good in the first objective, so a
  front only needs the 2-D staircase of its points in the other two; a query is one `bisect`
  in that staircase, so O(n log n log F) comparisons for F fronts (plus list inserts);
- k >= 4: the same binary search, with the staircase replaced by a numpy array of the
  front's points (minus any made redundant), checked in one vectorised comparison.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from croft_search.errors import ConfigError

__all__ = [
    "oriented",
    "pareto_ranks",
    "pareto_ranks_bruteforce",
    "hypervolume",
    "knee_point",
]


def oriented(values: ArrayLike, maximize: Sequence[bool] | None = None) -> np.ndarray:
    """`values` as a float (n, k) array in which larger is better in every column."""
    points = np.asarray(values, dtype=np.float64)
    if points.ndim == 1:
        points = points[:, None]
    if points.ndim != 2 or points.shape[1] == 0:
        raise ConfigError(
            f"objective values must be an (n, k) array with k >= 1, got {points.shape}"
        )
    if np.isnan(points).any():
        raise ConfigError("objective values contain NaN; drop those trials before ranking")
    signs = _signs(maximize, points.shape[1])
    # `+ 0.0` turns -0.0 into 0.0 so that the two compare (and de-duplicate) as equal.
    return points * signs + 0.0


def _signs(maximize: Sequence[bool] | None, k: int) -> np.ndarray:
    if maximize is None:
        return np.ones(k)
    flags = list(maximize)
    if len(flags) != k:
        raise ConfigError(f"{len(flags)} directions given for {k} objectives")
    return np.where(np.asarray(flags, dtype=bool), 1.0, -1.0)


# ----------------------------------------------------------------------------- ranks


def pareto_ranks(values: ArrayLike, maximize: Sequence[bool] | None = None) -> np.ndarray:
    """Pareto rank of every row (0 = non-dominated), as an int64 array of length n."""
    points = oriented(values, maximize)
    n, k = points.shape
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    # Dense integer ranks per column keep every comparison exact and make the Python-level
    # comparisons below int comparisons.
    codes = np.empty((n, k), dtype=np.int64)
    for column in range(k):
        codes[:, column] = np.unique(points[:, column], return_inverse=True)[1].ravel()
    # Descending lexicographic order (np.lexsort's primary key is its last key).
    order = np.lexsort(tuple(-codes[:, column] for column in reversed(range(k))))
    ordered = codes[order]
    new_point = np.ones(n, dtype=bool)
    new_point[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
    unique_points = ordered[new_point]
    unique_index = np.cumsum(new_point) - 1  # position in `unique_points` of each sorted row

    if k == 1:
        unique_ranks = np.arange(len(unique_points), dtype=np.int64)
    elif k == 2:
        unique_ranks = _ranks_2d(unique_points)
    elif k == 3:
        unique_ranks = _ranks_3d(unique_points)
    else:
        unique_ranks = _ranks_kd(unique_points)

    ranks = np.empty(n, dtype=np.int64)
    ranks[order] = unique_ranks[unique_index]
    return ranks


def _ranks_2d(points: np.ndarray) -> np.ndarray:
    """Distinct integer points in descending lexicographic order -> ranks.

    An earlier point q (x_q >= x_p) dominates p iff (y_q, x_q) > (y_p, x_p) lexicographically,
    so with `key` = the position of (y, x) in ascending lexicographic order, p's rank is the
    number of fronts whose most recent point has a larger key: patience sorting."""
    by_y_then_x = np.lexsort((points[:, 0], points[:, 1]))
    key = np.empty(len(points), dtype=np.int64)
    key[by_y_then_x] = np.arange(len(points))
    negated_tails: list[int] = []  # -key of each front's latest point, ascending
    ranks = []
    for negated in (-key).tolist():
        rank = bisect_left(negated_tails, negated)
        if rank == len(negated_tails):
            negated_tails.append(negated)
        else:
            negated_tails[rank] = negated
        ranks.append(rank)
    return np.asarray(ranks, dtype=np.int64)


def _ranks_3d(points: np.ndarray) -> np.ndarray:
    """Distinct integer points in descending lexicographic order -> ranks.

    Every earlier point is at least as good in x, so front f dominates p iff one of its
    points is >= p in (y, z). Each front keeps only its staircase in (y, z): y ascending, z
    descending, points weakly below another one dropped (a later query point is no better
    in x, so whatever such a point dominates, the one that made it redundant dominates too).
    The first staircase point with y >= y_p has the largest z among those, so a query is
    one bisect."""
    staircase_y: list[list[int]] = []
    staircase_z: list[list[int]] = []
    ranks = []
    for _, y, z in points.tolist():
        low, high = 0, len(staircase_y)
        while low < high:  # first front that does not dominate (y, z)
            middle = (low + high) // 2
            ys, zs = staircase_y[middle], staircase_z[middle]
            at = bisect_left(ys, y)
            if at < len(ys) and zs[at] >= z:
                low = middle + 1
            else:
                high = middle
        rank = low
        ranks.append(rank)
        if rank == len(staircase_y):
            staircase_y.append([y])
            staircase_z.append([z])
            continue
        ys, zs = staircase_y[rank], staircase_z[rank]
        end = bisect_right(ys, y)  # points [0, end) have y' <= y
        start = end
        while start > 0 and zs[start - 1] <= z:  # ...and the redundant ones also z' <= z
            start -= 1
        ys[start:end] = [y]
        zs[start:end] = [z]
    return np.asarray(ranks, dtype=np.int64)


class _FrontPoints:
    """The points of one front (all objectives but the first), stored column by column in a
    growable buffer so that each comparison runs over one contiguous row."""

    def __init__(self, first: np.ndarray) -> None:
        self.columns = np.empty((first.size, 16), dtype=np.int64)
        self.columns[:, 0] = first
        self.count = 1

    def dominates(self, point: np.ndarray) -> bool:
        columns = self.columns[:, : self.count]
        at_least = columns[0] >= point[0]
        for column, value in zip(columns[1:], point[1:], strict=True):
            at_least &= column >= value
        return bool(at_least.any())

    def add(self, point: np.ndarray) -> None:
        columns = self.columns[:, : self.count]
        # Points weakly below the new one are redundant for later queries (see _ranks_3d).
        redundant = columns[0] <= point[0]
        for column, value in zip(columns[1:], point[1:], strict=True):
            redundant &= column <= value
        kept = columns[:, ~redundant]
        if kept.shape[1] + 1 > self.columns.shape[1]:
            self.columns = np.empty((point.size, 2 * self.columns.shape[1]), dtype=np.int64)
        self.columns[:, : kept.shape[1]] = kept
        self.columns[:, kept.shape[1]] = point
        self.count = kept.shape[1] + 1


def _ranks_kd(points: np.ndarray) -> np.ndarray:
    """Distinct integer points in descending lexicographic order -> ranks, any k."""
    fronts: list[_FrontPoints] = []
    ranks = np.empty(len(points), dtype=np.int64)
    rest = points[:, 1:]
    for index in range(len(points)):
        point = rest[index]
        low, high = 0, len(fronts)
        while low < high:
            middle = (low + high) // 2
            if fronts[middle].dominates(point):
                low = middle + 1
            else:
                high = middle
        ranks[index] = low
        if low == len(fronts):
            fronts.append(_FrontPoints(point))
        else:
            fronts[low].add(point)
    return ranks


def pareto_ranks_bruteforce(
    values: ArrayLike, maximize: Sequence[bool] | None = None
) -> np.ndarray:
    """Reference ranks by the textbook O(n^2) method (Deb et al.'s fast non-dominated sort):
    count each point's dominators, peel the points whose count reaches zero."""
    points = oriented(values, maximize)
    n = len(points)
    at_least = np.ones((n, n), dtype=bool)
    better_somewhere = np.zeros((n, n), dtype=bool)
    for column in points.T:
        at_least &= column[:, None] >= column[None, :]
        better_somewhere |= column[:, None] > column[None, :]
    dominates = at_least & better_somewhere  # dominates[i, j]: row i dominates row j
    dominator_count = dominates.sum(axis=0)
    ranks = np.full(n, -1, dtype=np.int64)
    front = np.flatnonzero(dominator_count == 0)
    rank = 0
    while front.size:
        ranks[front] = rank
        dominator_count = dominator_count - dominates[front].sum(axis=0)
        front = np.flatnonzero((dominator_count == 0) & (ranks < 0))
        rank += 1
    return ranks


# ----------------------------------------------------------------------------- hypervolume


def hypervolume(
    values: ArrayLike, reference_point: ArrayLike, maximize: Sequence[bool] | None = None
) -> float:
    """Exact volume of the region dominated by the points and bounded by `reference_point`
    (a worse-than-every-point corner, in the same units and directions as `values`).

    Points that are not strictly better than the reference in every objective add nothing.
    2 objectives: one sort and sweep. k >= 3: slices along the last objective, each an exact
    (k-1)-objective hypervolume (O(n^2 log n) in 3-D; meant for fronts, not whole searches).
    """
    points = oriented(values, maximize)
    reference = np.asarray(reference_point, dtype=np.float64).reshape(-1)
    if reference.size != points.shape[1] or not np.isfinite(reference).all():
        raise ConfigError(
            f"the reference point needs {points.shape[1]} finite values, got {reference.tolist()}"
        )
    reference = reference * _signs(maximize, points.shape[1])
    boxes = points - reference  # every box spans [0, box] after the shift
    boxes = boxes[(boxes > 0).all(axis=1)]
    if len(boxes) == 0:
        return 0.0
    boxes = boxes[pareto_ranks(boxes) == 0]
    return float(_volume_of_union(np.unique(boxes, axis=0)))


def _volume_of_union(boxes: np.ndarray) -> float:
    """Volume of the union of boxes [0, b] for the rows b (all positive)."""
    k = boxes.shape[1]
    if k == 1:
        return float(boxes.max())
    if k == 2:
        by_x = boxes[np.argsort(-boxes[:, 0], kind="stable")]
        highest = np.maximum.accumulate(by_x[:, 1])
        rises = np.diff(highest, prepend=0.0)
        return float(np.sum(by_x[:, 0] * rises))
    by_last = boxes[np.argsort(-boxes[:, -1], kind="stable")]
    levels = np.append(by_last[:, -1], 0.0)
    volume = 0.0
    for index in range(len(by_last)):
        thickness = levels[index] - levels[index + 1]
        if thickness > 0:  # slice [levels[i+1], levels[i]]: boxes 0..i reach through it
            section = by_last[: index + 1, :-1]
            if section.shape[1] >= 3:  # dominated sections add nothing and cost a recursion
                section = section[pareto_ranks(section) == 0]
            volume += thickness * _volume_of_union(section)
    return volume


# ----------------------------------------------------------------------------- knee


def knee_point(front: ArrayLike, maximize: Sequence[bool] | None = None) -> int:
    """Row index of the knee of a front.

    Definition: each objective is rescaled to [0, 1] over the front (0 = worst, 1 = best
    value on the front) and the knee is the point with the largest sum of rescaled values.
    With two objectives the extremes of a front rescale to (1, 0) and (0, 1), so this is the
    point farthest beyond the straight line joining the two extremes, the usual knee.
    Ties go to the point closest to the ideal (1, ..., 1), then to the first row. An
    objective that is constant on the front counts as 1 for every point."""
    points = oriented(front, maximize)
    if len(points) == 0:
        raise ConfigError("the knee point of an empty front is undefined")
    worst, best = points.min(axis=0), points.max(axis=0)
    span = best - worst
    scaled = np.ones_like(points)
    varying = span > 0
    scaled[:, varying] = (points[:, varying] - worst[varying]) / span[varying]
    total = scaled.sum(axis=1)
    candidates = np.flatnonzero(np.isclose(total, total.max(), rtol=0.0, atol=1e-12))
    distance_to_ideal = np.linalg.norm(1.0 - scaled[candidates], axis=1)
    return int(candidates[np.argmin(distance_to_ideal)])
