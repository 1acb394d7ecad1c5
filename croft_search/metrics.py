"""Classification and OOD-detection metrics: numpy (or torch tensors) in, Python floats out.

OOD convention everywhere: ID samples are the positive class and a higher score means
"more in-distribution" (see `croft_search.scores`).

AUROC, FPR@TPR and average precision are implemented here with O(n log n) sorting rather
than by calling scikit-learn, so the search workers need no sklearn import on the hot path;
the tests check every one of them against scikit-learn, including heavily tied scores.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from croft_search.contract import DEFAULT_OBJECTIVE_WEIGHT
from croft_search.errors import ConfigError

__all__ = [
    "accuracy",
    "auroc",
    "fpr_at_tpr",
    "aupr_in",
    "aupr_out",
    "ood_metrics",
    "CONVENTIONS",
    "fpr_at_recall_nearest",
    "fpr_at_percentile",
    "joint_objective",
    "joint_objectives",
]

# ----------------------------------------------------------------------------- input checks


def _to_numpy(x: Any) -> np.ndarray:
    """numpy array from a numpy array, list or torch tensor (any device, any dtype)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensor, without importing torch
        t = x.detach().cpu()
        if t.is_floating_point():
            t = t.double()  # bfloat16 has no numpy dtype
        return t.numpy()
    return np.asarray(x)


def _scores(x: Any, what: str) -> np.ndarray:
    a = _to_numpy(x)
    if a.ndim != 1:
        raise ConfigError(f"{what} must be a 1-D array of scores, got shape {a.shape}")
    if a.size == 0:
        raise ConfigError(f"{what} is empty; OOD metrics need at least one ID and one OOD score")
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise ConfigError(f"{what} must be numeric, got dtype {a.dtype}")
    a = a.astype(np.float64, copy=False)
    if np.isnan(a).any():
        raise ConfigError(f"{what} contains {int(np.isnan(a).sum())} NaN value(s)")
    return a


def _pair(id_scores: Any, ood_scores: Any) -> tuple[np.ndarray, np.ndarray]:
    return _scores(id_scores, "id_scores"), _scores(ood_scores, "ood_scores")


# ----------------------------------------------------------------------------- accuracy


def accuracy(logits_or_preds: Any, labels: Any) -> float:
    """Top-1 accuracy in [0, 1]. A 2-D input (N, K) is taken as logits/probabilities and
    arg-maxed over classes; a 1-D input as predicted class indices."""
    p = _to_numpy(logits_or_preds)
    y = _to_numpy(labels)
    if y.ndim != 1:
        raise ConfigError(f"labels must be 1-D, got shape {y.shape}")
    if p.ndim == 2:
        if p.shape[1] == 0:
            raise ConfigError("logits have zero classes")
        if np.issubdtype(p.dtype, np.floating) and np.isnan(p).any():
            raise ConfigError("logits contain NaN")
        p = p.argmax(axis=1)
    elif p.ndim != 1:
        raise ConfigError(f"predictions must be 1-D (classes) or 2-D (logits), got shape {p.shape}")
    if p.shape[0] != y.shape[0]:
        raise ConfigError(f"{p.shape[0]} predictions but {y.shape[0]} labels")
    if y.shape[0] == 0:
        raise ConfigError("accuracy of an empty set is undefined")
    return float(np.mean(p == y))


# ----------------------------------------------------------------------------- OOD metrics


def auroc(id_scores: Any, ood_scores: Any) -> float:
    """Area under the ROC curve with ID as the positive class.

    Equals P(s_id > s_ood) + 1/2 P(s_id == s_ood) over all ID/OOD pairs (the Mann-Whitney
    statistic), which is exactly sklearn's `roc_auc_score` (trapezoids over tied blocks).
    Computed with integer counts from binary search, so ties are counted exactly.
    """
    ids, ood = _pair(id_scores, ood_scores)
    return _auroc(ids, ood)


def _auroc(ids: np.ndarray, ood: np.ndarray) -> float:
    ood_sorted = np.sort(ood)
    below = np.searchsorted(ood_sorted, ids, side="left")  # OOD strictly below each ID score
    not_above = np.searchsorted(ood_sorted, ids, side="right")  # OOD <= each ID score
    # 2 * (wins + ties / 2) = below + not_above, kept in int64 to stay exact.
    twice_u = int(np.sum(below, dtype=np.int64) + np.sum(not_above, dtype=np.int64))
    return twice_u / (2.0 * ids.size * ood.size)


def fpr_at_tpr(id_scores: Any, ood_scores: Any, tpr: float = 0.95) -> float:
    """False-positive rate at the first ROC operating point whose TPR reaches `tpr`.

    Definition (thresholding rule `predict ID iff score >= t`): let `t*` be the largest
    threshold with `#{id >= t*} / n_id >= tpr`; the result is `#{ood >= t*} / n_ood`.
    Tied scores are never split: every sample with score `t*` counts as accepted, on both
    sides. `t*` is always one of the ID scores (the TPR only changes there).

    This equals `fpr[np.argmax(tpr_curve >= tpr)]` for
    `fpr, tpr_curve, _ = sklearn.metrics.roc_curve(y, s, drop_intermediate=False)`.
    (sklearn's default `drop_intermediate=True` removes collinear points, which can skip the
    exact crossing and report a larger FPR; OpenOOD's `fpr_recall` inherits that.)
    The comparison is `count / n_id >= tpr` in float64, as in sklearn, so e.g. 19/20
    reaches 0.95.
    """
    if (
        isinstance(tpr, bool)
        or not isinstance(tpr, numbers.Real)
        or not 0.0 < float(tpr) <= 1.0  # also rejects NaN
    ):
        raise ConfigError(f"tpr must be a number in (0, 1], got {tpr!r}")
    ids, ood = _pair(id_scores, ood_scores)
    return _fpr_at_tpr(ids, ood, float(tpr))


def _fpr_at_tpr(ids: np.ndarray, ood: np.ndarray, tpr: float) -> float:
    ids_sorted = np.sort(ids)
    thresholds = np.unique(ids)[::-1]  # candidate thresholds, descending
    id_accepted = ids.size - np.searchsorted(ids_sorted, thresholds, side="left")
    # id_accepted / n_id is non-decreasing and reaches 1 at the smallest ID score, so the
    # first index meeting `tpr` (<= 1) always exists.
    first = int(np.argmax(id_accepted / ids.size >= tpr))
    t_star = thresholds[first]
    ood_accepted = ood.size - np.searchsorted(np.sort(ood), t_star, side="left")
    return float(ood_accepted / ood.size)


def _average_precision(pos: np.ndarray, neg: np.ndarray) -> float:
    """sklearn's `average_precision_score`: sum over distinct thresholds (descending) of
    (R_i - R_{i-1}) * P_i, no interpolation; tied scores form a single operating point."""
    scores = np.concatenate([pos, neg])
    is_pos = np.concatenate([np.ones(pos.size, np.int64), np.zeros(neg.size, np.int64)])
    order = np.argsort(-scores, kind="stable")
    scores, is_pos = scores[order], is_pos[order]
    # Last index of each block of equal scores (`!=` rather than np.diff: diff(inf, inf)
    # would be NaN and split a tie).
    ends = np.r_[np.flatnonzero(scores[1:] != scores[:-1]), scores.size - 1]
    tps = np.cumsum(is_pos)[ends]
    precision = tps / (ends + 1)
    recall = tps / pos.size
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def aupr_in(id_scores: Any, ood_scores: Any) -> float:
    """Average precision with ID as the positive class (sklearn `average_precision_score`)."""
    ids, ood = _pair(id_scores, ood_scores)
    return _average_precision(ids, ood)


def aupr_out(id_scores: Any, ood_scores: Any) -> float:
    """Average precision with OOD as the positive class, ranking by the negated score."""
    ids, ood = _pair(id_scores, ood_scores)
    return _average_precision(-ood, -ids)


def fpr_at_recall_nearest(id_scores: Any, ood_scores: Any, recall: float = 0.95) -> float:
    """FPR at the threshold whose ID recall is *nearest* ``recall``: the CRoFT reference's
    ``fpr_and_fdr_at_recall`` (CoOp/metric_utils.py, after Hendrycks' code), used there for
    the KNN score. Its curve runs from the threshold where recall first reaches 1 back to the
    highest score, then appends the point (recall 1, 0 false positives); ``argmin`` takes the
    first of equally near points in that order."""
    ids, ood = _pair(id_scores, ood_scores)
    scores = np.concatenate([ids, ood])
    is_id = np.concatenate([np.ones(ids.size), np.zeros(ood.size)])
    order = np.argsort(-scores, kind="mergesort")
    scores, is_id = scores[order], is_id[order]
    ends = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tps = np.cumsum(is_id)[ends]
    fps = 1 + ends - tps
    last = int(np.searchsorted(tps, tps[-1]))
    recalls = np.r_[(tps / tps[-1])[last::-1], 1.0]
    false_positives = np.r_[fps[last::-1], 0.0]
    cutoff = int(np.argmin(np.abs(recalls - recall)))
    return float(false_positives[cutoff] / ood.size)


def fpr_at_percentile(id_scores: Any, ood_scores: Any, tpr: float = 0.95) -> float:
    """FPR as Dassl's evaluator in the CRoFT reference computes it for the energy score: the
    threshold is numpy's (linearly interpolated) ``100 * (1 - tpr)``-th percentile of the ID
    scores, and an OOD sample is a false positive when its score is strictly above it."""
    ids, ood = _pair(id_scores, ood_scores)
    threshold = np.percentile(ids, 100 * (1 - tpr))
    return float(np.mean(ood > threshold))


def _openood(ids: np.ndarray, ood: np.ndarray) -> dict[str, float]:
    # OpenOOD v1.5's evaluators/metrics.py: OOD is the positive class of the ROC curve
    # (scikit-learn's default drop_intermediate) and the AUPRs are trapezoidal areas.
    from sklearn import metrics

    scores = np.concatenate([ids, ood])
    is_ood = np.concatenate([np.zeros(ids.size), np.ones(ood.size)])
    fpr, tpr, _ = metrics.roc_curve(is_ood, -scores)
    precision_in, recall_in, _ = metrics.precision_recall_curve(1 - is_ood, scores)
    precision_out, recall_out, _ = metrics.precision_recall_curve(is_ood, -scores)
    return {
        "auroc": float(metrics.auc(fpr, tpr)),
        "fpr95": float(fpr[np.argmax(tpr >= 0.95)]),
        "aupr_in": float(metrics.auc(recall_in, precision_in)),
        "aupr_out": float(metrics.auc(recall_out, precision_out)),
    }


# How FPR95 and AUPR are computed: ours (first threshold reaching 95% ID recall, average
# precision), the reference's two (Dassl's percentile rule for the energy score,
# metric_utils' nearest-recall rule for KNN) and OpenOOD v1.5's. docs/croft_reference.md.
CONVENTIONS = ("ours", "dassl", "metric_utils", "openood")


def ood_metrics(id_scores: Any, ood_scores: Any, convention: str = "ours") -> dict[str, float]:
    """All OOD-detection metrics at once: keys `auroc`, `fpr95`, `aupr_in`, `aupr_out`,
    under one of `CONVENTIONS` (AUROC is the same in all of them)."""
    ids, ood = _pair(id_scores, ood_scores)
    if convention not in CONVENTIONS:
        raise ConfigError(
            f"unknown metric convention {convention!r}; expected one of {', '.join(CONVENTIONS)}"
        )
    if convention == "openood":
        return _openood(ids, ood)
    fpr95 = {
        "ours": lambda: _fpr_at_tpr(ids, ood, 0.95),
        "dassl": lambda: fpr_at_percentile(ids, ood),
        "metric_utils": lambda: fpr_at_recall_nearest(ids, ood),
    }[convention]()
    return {
        "auroc": _auroc(ids, ood),
        "fpr95": fpr95,
        "aupr_in": _average_precision(ids, ood),
        "aupr_out": _average_precision(-ood, -ids),
    }


# ----------------------------------------------------------------------------- search objective


def joint_objective(acc: float, auroc: float, weight: float = DEFAULT_OBJECTIVE_WEIGHT) -> float:
    """Scalar objective for single-objective search: `weight * acc + (1 - weight) * auroc`.

    Why this form: OOD-generalisation accuracy and OOD-detection AUROC are both fractions in
    [0, 1] where higher is better, so a convex combination needs no normalisation and stays
    in [0, 1]; `weight` states the trade-off explicitly (1 = accuracy only, 0 = AUROC only,
    0.5 = equal). Note AUROC's chance level is 0.5 while accuracy's is 1/K, so equal weights
    do not mean equal "distance from chance". Multi-objective searches do not use this:
    they optimise the pair (acc, auroc) directly and report its Pareto front.

    Both inputs must be fractions in [0, 1] (an accuracy in percent is rejected rather
    than allowed to dominate the sum).
    """
    for name, value in (("acc", acc), ("auroc", auroc)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"{name} must be a number in [0, 1], got {value!r}")
        if not 0.0 <= float(value) <= 1.0:  # also rejects NaN
            raise ConfigError(f"{name} must be in [0, 1], got {value!r}")
    return float(joint_objectives([float(acc)], [float(auroc)], weight)[0])


def joint_objectives(acc: Any, auroc: Any, weight: float = DEFAULT_OBJECTIVE_WEIGHT) -> np.ndarray:
    """`joint_objective` of many trials at once (arrays or Series of equal length); NaN
    where either metric is missing, an error for a present value outside [0, 1]."""
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not 0 <= weight <= 1:
        raise ConfigError(f"weight must be a number in [0, 1], got {weight!r}")
    acc = np.asarray(acc, dtype=np.float64)
    auroc = np.asarray(auroc, dtype=np.float64)
    for name, values in (("acc", acc), ("auroc", auroc)):
        present = values[~np.isnan(values)]
        if ((present < 0) | (present > 1)).any():
            raise ConfigError(
                f"{name} must be in [0, 1], got {present[(present < 0) | (present > 1)][0]!r}"
            )
    return float(weight) * acc + (1.0 - float(weight)) * auroc
