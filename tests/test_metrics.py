"""Metrics: hand-computed cases with ties, and property tests against scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from croft_search.errors import ConfigError
from croft_search.metrics import (
    accuracy,
    aupr_in,
    aupr_out,
    auroc,
    fpr_at_tpr,
    joint_objective,
    joint_objectives,
    ood_metrics,
)

# ----------------------------------------------------------------------------- sklearn references


def _labels_scores(ids, ood):
    ids, ood = np.asarray(ids, float), np.asarray(ood, float)
    return np.r_[np.ones(ids.size), np.zeros(ood.size)], np.r_[ids, ood]


def ref_fpr(ids, ood, tpr=0.95, drop_intermediate=False):
    y, s = _labels_scores(ids, ood)
    fpr, tpr_curve, _ = roc_curve(y, s, drop_intermediate=drop_intermediate)
    return float(fpr[np.argmax(tpr_curve >= tpr)])


def ref_all(ids, ood):
    y, s = _labels_scores(ids, ood)
    return {
        "auroc": roc_auc_score(y, s),
        "fpr95": ref_fpr(ids, ood),
        "aupr_in": average_precision_score(y, s),
        "aupr_out": average_precision_score(1 - y, -s),
    }


def assert_matches_sklearn(ids, ood):
    got, ref = ood_metrics(ids, ood), ref_all(ids, ood)
    assert got.keys() == ref.keys()
    for key in ref:
        # fpr95 is a ratio of the same integers in both: demand equality.
        tol = 0.0 if key == "fpr95" else 1e-12
        assert got[key] == pytest.approx(ref[key], abs=tol, rel=0), (key, ids, ood)


# ----------------------------------------------------------------------------- hand-computed


def test_hand_computed_with_ties():
    ids, ood = [1, 2, 3], [2, 0]
    # ID/OOD pairs: (1,2)=0 (1,0)=1 (2,2)=1/2 (2,0)=1 (3,2)=1 (3,0)=1 -> 4.5 / 6.
    assert auroc(ids, ood) == 0.75
    # TPR >= 0.95 needs all 3 ID scores, threshold 1; OOD >= 1 is {2}: 1 of 2.
    assert fpr_at_tpr(ids, ood) == 0.5
    # Descending blocks: 3(+) | 2(+),2(-) | 1(+) | 0(-):
    # P = 1, 2/3, 3/4, 3/5 at R = 1/3, 2/3, 1, 1 -> 1/3 + 2/9 + 1/4 = 29/36.
    assert aupr_in(ids, ood) == pytest.approx(29 / 36, abs=1e-15)
    # OOD positive, negated: 0(+) | -1(-) | -2(+),-2(-) | -3(-):
    # P = 1, 1/2, 1/2 at R = 1/2, 1/2, 1 -> 1/2 + 1/4 = 3/4.
    assert aupr_out(ids, ood) == pytest.approx(0.75, abs=1e-15)
    assert_matches_sklearn(ids, ood)


def test_all_tied():
    m = ood_metrics([1, 1], [1, 1, 1])
    assert m == {"auroc": 0.5, "fpr95": 1.0, "aupr_in": 0.4, "aupr_out": 0.6}


def test_perfect_and_reversed():
    m = ood_metrics([3, 4], [1, 2])
    assert m == {"auroc": 1.0, "fpr95": 0.0, "aupr_in": 1.0, "aupr_out": 1.0}
    m = ood_metrics([1, 2], [3, 4])
    assert m["auroc"] == 0.0 and m["fpr95"] == 1.0
    # 4(-) | 3(-) | 2(+): P=1/3, R=1/2 | 1(+): P=1/2, R=1 -> 1/6 + 1/4.
    assert m["aupr_in"] == pytest.approx(5 / 12, abs=1e-15)


def test_fpr_exact_tpr_boundary():
    # 19 of 20 ID scores reach exactly TPR 0.95 (float 19/20 == 0.95), so the threshold is
    # the 19th-highest ID score, 1.0; OOD scores >= 1.0: {1.0, 5.0} -> 2 of 4.
    ids = [float(i) for i in range(1, 20)] + [-10.0]
    ood = [1.0, 5.0, 0.5, -20.0]
    assert fpr_at_tpr(ids, ood) == 0.5
    assert fpr_at_tpr(ids, ood, tpr=1.0) == 0.75  # threshold -10: all but -20
    assert fpr_at_tpr(ids, ood, tpr=0.05) == 0.0  # threshold 19: above every OOD score
    assert fpr_at_tpr(ids, ood) == ref_fpr(ids, ood)


def test_fpr_differs_from_drop_intermediate_only_by_skipped_points():
    # A straight ROC segment where sklearn's default drop_intermediate=True drops the exact
    # crossing point: ours matches the full curve (the documented definition).
    ids = [2, 4, 4, 4, 4, 4, 4, 3, 6, 4, 6, 2, 4, 2, 1, 0, 4, 2, 6, 5, 7, 7, 3, 2, 4, 4, 5]
    ood = [1, -1, 5, 5, 5, 2, 4, -2, 2, 0, 2, 3, 3, -2, 4]
    assert fpr_at_tpr(ids, ood) == ref_fpr(ids, ood) == 11 / 15
    assert ref_fpr(ids, ood, drop_intermediate=True) == pytest.approx(12 / 15)


def test_infinite_scores_are_ranked_not_rejected():
    ids, ood = [np.inf, np.inf, 1.0], [-np.inf, np.inf, 0.0]
    m = ood_metrics(ids, ood)
    # inf vs inf ties count 1/2: pairs won = (0.5+1+1)*2 + (0+1+1) = 7 of 9.
    assert m["auroc"] == pytest.approx(7 / 9)
    assert m["aupr_in"] == pytest.approx(
        average_precision_score([1, 1, 1, 0, 0, 0], [9, 9, 1, -9, 9, 0])
    )


def test_accepts_torch_and_lists():
    ids = torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)
    ood = torch.tensor([2.0, 0.0], dtype=torch.float16)
    assert auroc(ids, ood) == 0.75
    assert ood_metrics([1, 2, 3], (2, 0)) == ood_metrics(np.array([1, 2, 3]), np.array([2, 0]))


# ----------------------------------------------------------------------------- property tests

# Integer-valued scores in a narrow range force many ties within and across the two sets.
tied = st.lists(st.integers(-3, 3), min_size=1, max_size=40)
real = st.lists(
    st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=60
)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(ids=tied, ood=tied)
def test_matches_sklearn_heavy_ties(ids, ood):
    assert_matches_sklearn(ids, ood)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(ids=real, ood=real)
def test_matches_sklearn_real_scores(ids, ood):
    assert_matches_sklearn(ids, ood)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(ids=tied, ood=tied, tpr=st.sampled_from([0.05, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0]))
def test_fpr_at_any_tpr_matches_sklearn(ids, ood, tpr):
    assert fpr_at_tpr(ids, ood, tpr=tpr) == ref_fpr(ids, ood, tpr=tpr)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(ids=tied, ood=tied)
def test_symmetry_and_invariance(ids, ood):
    a = auroc(ids, ood)
    assert auroc(ood, ids) == pytest.approx(1 - a, abs=1e-12)
    # Any strictly increasing transform leaves every rank-based metric unchanged.
    f = lambda v: np.exp(np.asarray(v, float) / 3.0) * 7.0 - 2.0  # noqa: E731
    assert ood_metrics(f(ids), f(ood)) == pytest.approx(ood_metrics(ids, ood), abs=1e-12)


def test_large_random_matches_sklearn():
    rng = np.random.default_rng(0)
    ids = rng.normal(1.0, 1.0, 20_000).round(1)  # rounding: ties at scale
    ood = rng.normal(0.0, 1.0, 15_000).round(1)
    assert_matches_sklearn(ids, ood)


# ----------------------------------------------------------------------------- accuracy


def test_accuracy():
    logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.3, 0.2], [0.0, 5.0]])
    assert accuracy(logits, [1, 0, 1, 1]) == 0.75
    assert accuracy(np.array([1, 0, 0, 1]), np.array([1, 0, 1, 1])) == 0.75
    assert accuracy(torch.tensor(logits), torch.tensor([1, 0, 0, 1])) == 1.0
    assert isinstance(accuracy([0], [0]), float)


@pytest.mark.parametrize(
    "preds, labels, match",
    [
        ([0, 1, 1], [0, 1], "3 predictions but 2 labels"),
        (np.zeros((2, 3)), [0, 1, 2], "2 predictions but 3 labels"),
        ([], [], "empty"),
        (np.zeros((2, 0)), [0, 1], "zero classes"),
        (np.array([[np.nan, 1.0]]), [0], "NaN"),
        (np.zeros((1, 2, 2)), [0], "1-D .* or 2-D"),
        ([0, 1], [[0, 1]], "labels must be 1-D"),
    ],
)
def test_accuracy_errors(preds, labels, match):
    with pytest.raises(ConfigError, match=match):
        accuracy(preds, labels)


# ----------------------------------------------------------------------------- errors + objective


@pytest.mark.parametrize("fn", [auroc, fpr_at_tpr, aupr_in, aupr_out, ood_metrics])
@pytest.mark.parametrize(
    "ids, ood, match",
    [
        ([], [1.0], "id_scores is empty"),
        ([1.0], [], "ood_scores is empty"),
        ([1.0, np.nan], [0.0], "id_scores contains 1 NaN"),
        ([1.0], [np.nan, np.nan], "ood_scores contains 2 NaN"),
        ([[1.0, 2.0]], [0.0], r"id_scores must be a 1-D .* shape \(1, 2\)"),
        (["a"], [0.0], "numeric"),
    ],
)
def test_ood_metric_errors(fn, ids, ood, match):
    with pytest.raises(ConfigError, match=match):
        fn(ids, ood)


@pytest.mark.parametrize("tpr", [0.0, -0.1, 1.5, math.nan, "0.95", True])
def test_fpr_bad_tpr(tpr):
    with pytest.raises(ConfigError, match="tpr"):
        fpr_at_tpr([1.0], [0.0], tpr=tpr)


def test_joint_objective():
    assert joint_objective(0.8, 0.6) == pytest.approx(0.7)
    assert joint_objective(0.8, 0.6, weight=1.0) == 0.8
    assert joint_objective(0.8, 0.6, weight=0.0) == 0.6
    assert joint_objective(0.8, 0.6, weight=0.25) == pytest.approx(0.25 * 0.8 + 0.75 * 0.6)
    assert joint_objective(np.float64(1.0), 1) == 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"acc": 0.5, "auroc": 0.5, "weight": 1.1}, "weight"),
        ({"acc": 0.5, "auroc": 0.5, "weight": -0.1}, "weight"),
        ({"acc": 0.5, "auroc": 0.5, "weight": math.nan}, "weight"),
        ({"acc": 97.3, "auroc": 0.5}, "acc"),
        ({"acc": 0.5, "auroc": math.nan}, "auroc"),
        ({"acc": 0.5, "auroc": "0.9"}, "auroc"),
    ],
)
def test_joint_objective_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        joint_objective(**kwargs)


def test_joint_objectives_of_many_trials_match_the_scalar_and_keep_missing_ones():
    acc = [0.8, 0.1, math.nan, 1.0]
    auroc = [0.6, 0.9, 0.5, math.nan]
    got = joint_objectives(acc, auroc, weight=0.3)
    assert got[:2].tolist() == [joint_objective(0.8, 0.6, 0.3), joint_objective(0.1, 0.9, 0.3)]
    assert math.isnan(got[2]) and math.isnan(got[3])
    with pytest.raises(ConfigError, match="acc must be in"):
        joint_objectives([0.5, 97.0], [0.5, 0.5])
    with pytest.raises(ConfigError, match="weight"):
        joint_objectives([0.5], [0.5], weight=2)
