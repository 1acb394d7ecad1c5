"""OOD scores: hand-computed values, registry behaviour, validation, kNN/Mahalanobis sanity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from croft_search.errors import ConfigError
from croft_search.scores import (
    KNNScore,
    MahalanobisScore,
    OODScore,
    get_score,
    register_score,
    score_names,
)

LOG3 = math.log(3.0)


def _t(rows, dtype=torch.float64):
    return torch.tensor(rows, dtype=dtype)


# ----------------------------------------------------------------------------- registry


def test_registry_names():
    assert score_names() == ["energy", "knn", "mahalanobis", "maxlogit", "mcm", "msp"]
    for name in score_names():
        params = {"logit_scale": 100.0} if name == "mcm" else {}
        s = get_score(name, **params)
        assert isinstance(s, OODScore) and s.name == name
    assert get_score(" MSP ").name == "msp"  # case/whitespace-insensitive
    assert get_score("knn", k=3).params() == {"k": 3}
    assert repr(get_score("energy", T=2)) == "EnergyScore(T=2.0)"


def test_unknown_name_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        get_score("odin")
    msg = str(err.value)
    assert "\n" not in msg and "'odin'" in msg
    assert all(n in msg for n in score_names())


@pytest.mark.parametrize(
    "name, params, match",
    [
        ("msp", {"temperature": 2.0}, "unknown parameter.*temperature.*valid parameters: T"),
        ("maxlogit", {"T": 1.0}, "valid parameters: none"),
        ("knn", {"K": 5}, "valid parameters: k"),
        ("mcm", {"s": 100.0}, "valid parameters: logit_scale, T"),
        ("msp", {"T": 0}, "T must be a finite number > 0"),
        ("energy", {"T": -1.0}, "T must be"),
        ("energy", {"T": math.inf}, "T must be"),
        ("energy", {"T": math.nan}, "T must be"),
        ("msp", {"T": True}, "T must be"),
        ("msp", {"T": "1"}, "T must be"),
        ("mcm", {}, "needs logit_scale"),
        ("mcm", {"logit_scale": 0.0}, "logit_scale must be"),
        ("mcm", {"logit_scale": 100.0, "T": 0.0}, "T must be"),
        ("knn", {"k": 0}, "k must be an integer >= 1"),
        ("knn", {"k": 2.5}, "k must be an integer"),
        ("knn", {"k": 10.0}, "k must be an integer"),
        ("knn", {"k": True}, "k must be an integer"),
        ("mahalanobis", {"shrinkage": 1.0}, r"shrinkage must be a number in \[0, 1\)"),
        ("mahalanobis", {"shrinkage": -0.1}, "shrinkage"),
    ],
)
def test_bad_params(name, params, match):
    with pytest.raises(ConfigError, match=match) as err:
        get_score(name, **params)
    assert "\n" not in str(err.value)


def test_register_custom_score_and_duplicate():
    @register_score
    class _Neg(OODScore):
        name = "_test_negmax"

        def score(self, logits, features=None):
            return -logits.max(dim=1).values

    try:
        assert get_score("_test_negmax").score(_t([[1.0, 2.0]])).tolist() == [-2.0]
        with pytest.raises(ValueError, match="already registered"):

            @register_score
            class _Other(OODScore):
                name = "_test_negmax"

                def score(self, logits, features=None):
                    return logits[:, 0]

        with pytest.raises(TypeError):
            register_score(int)
        with pytest.raises(TypeError, match="lower-case"):

            @register_score
            class _Upper(OODScore):
                name = "_Test_Upper"

                def score(self, logits, features=None):
                    return logits[:, 0]
    finally:
        from croft_search import scores

        scores._REGISTRY.pop("_test_negmax", None)


# ----------------------------------------------------------------------------- logit scores


def test_energy_hand_computed():
    logits = _t([[0.0, LOG3], [0.0, 0.0]])
    # logsumexp(0, log 3) = log(1 + 3); logsumexp(0, 0) = log 2.
    assert torch.allclose(get_score("energy").score(logits), _t([math.log(4), math.log(2)]))
    # T = 2: 2 * log(exp(0) + exp(log(3)/2)) = 2 * log(1 + sqrt 3).
    got = get_score("energy", T=2.0).score(logits[:1])
    assert got.item() == pytest.approx(2 * math.log(1 + math.sqrt(3)), abs=1e-12)


def test_msp_and_maxlogit_hand_computed():
    logits = _t([[0.0, LOG3], [5.0, 5.0]])
    assert torch.allclose(get_score("msp").score(logits), _t([0.75, 0.5]))
    # T = 2 on [0, log 3]: softmax of [0, log(3)/2] -> sqrt3 / (1 + sqrt3).
    got = get_score("msp", T=2.0).score(logits[:1]).item()
    assert got == pytest.approx(math.sqrt(3) / (1 + math.sqrt(3)), abs=1e-12)
    assert get_score("maxlogit").score(logits).tolist() == [LOG3, 5.0]


def test_msp_stable_for_large_logits():
    logits = torch.tensor([[1000.0, 0.0], [1e4, 1e4]])  # float32 exp would overflow naively
    out = get_score("msp").score(logits)
    assert torch.isfinite(out).all() and out.tolist() == [1.0, 0.5]


def test_mcm_relation_to_msp():
    torch.manual_seed(0)
    cos = torch.rand(7, 5, dtype=torch.float64) * 2 - 1
    logits = 100.0 * cos
    mcm = get_score("mcm", logit_scale=100.0)
    assert torch.allclose(mcm.score(logits), get_score("msp").score(logits / 100.0))
    # Temperature applies to the cosines: mcm(logits, s, T) == msp(cos, T).
    mcm_t = get_score("mcm", logit_scale=100.0, T=0.01)
    assert torch.allclose(mcm_t.score(logits), get_score("msp", T=0.01).score(cos))
    # With T = 1/s MCM is MSP on the raw logits.
    assert torch.allclose(
        get_score("mcm", logit_scale=50.0, T=1 / 50).score(logits), get_score("msp").score(logits)
    )


@pytest.mark.parametrize("name", ["msp", "maxlogit", "energy", "mcm"])
def test_logit_scores_shapes_dtypes_and_ranking(name):
    s = get_score(name, **({"logit_scale": 10.0} if name == "mcm" else {}))
    confident = torch.tensor([[9.0, 0.0, 0.0]])
    flat = torch.tensor([[1.0, 1.0, 1.0]])
    assert s.score(confident).item() > s.score(flat).item()  # higher = more ID
    for dtype, out_dtype in [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
        (torch.int64, torch.float32),
    ]:
        out = s(torch.ones(4, 3, dtype=dtype))
        assert out.shape == (4,) and out.dtype == out_dtype
    assert s.score(torch.zeros(0, 3)).shape == (0,)
    with pytest.raises(ConfigError, match="2-D"):
        s.score(torch.zeros(3))
    with pytest.raises(ConfigError, match="zero classes"):
        s.score(torch.zeros(2, 0))
    with pytest.raises(ConfigError, match="needs logits"):
        s.score(None)


def test_logit_scores_keep_gradients():
    logits = torch.randn(3, 4, requires_grad=True)
    get_score("energy").score(logits).sum().backward()
    assert logits.grad is not None


# ----------------------------------------------------------------------------- kNN


TRAIN = [[2.0, 0.0], [0.0, 0.5], [-3.0, 0.0]]  # normalised: e1, e2, -e1


def test_knn_hand_computed():
    train = _t(TRAIN)
    test = _t([[3.0, 0.0], [0.0, -5.0]])  # normalised: e1, -e2
    # Distances from e1: 0, sqrt2, 2.  From -e2: sqrt2, 2, sqrt2 -> sorted sqrt2, sqrt2, 2.
    r2 = math.sqrt(2)
    for k, expected in [(1, [0.0, -r2]), (2, [-r2, -r2]), (3, [-2.0, -2.0])]:
        got = get_score("knn", k=k).fit(train).score(None, test)
        assert torch.allclose(got, _t(expected), atol=1e-7), k
    # k beyond the training set is clamped to its size (3), not an error.
    knn = get_score("knn", k=10).fit(train, torch.tensor([0, 1, 2]))
    assert knn.k_effective == 3
    assert torch.allclose(knn.score(None, test), _t([-2.0, -2.0]))


def test_knn_batched_equals_unbatched(monkeypatch):
    g = torch.Generator().manual_seed(1)
    train, test = torch.randn(300, 16, generator=g), torch.randn(50, 16, generator=g)
    full = KNNScore(k=5).fit(train).score(None, test)
    monkeypatch.setattr(KNNScore, "max_block_elements", 7 * 300)  # 7 test rows per block
    assert torch.allclose(KNNScore(k=5).fit(train).score(None, test), full)
    # Reference: brute-force cdist on normalised features.
    n = torch.nn.functional.normalize
    ref = -torch.cdist(n(test, dim=1), n(train, dim=1)).sort(dim=1).values[:, 4]
    assert torch.allclose(full, ref, atol=1e-5)


def test_knn_block_size_bounded_for_10k():
    # 10k x 10k: each block holds at most max_block_elements similarities (64 MiB fp32).
    rows = max(1, KNNScore.max_block_elements // 10_000)
    assert rows * 10_000 <= KNNScore.max_block_elements and rows >= 1000


# ----------------------------------------------------------------------------- shared sanity


def _clusters(seed=0, d=32, per_class=16, classes=4):
    """Few-shot-like ID data: tight clusters around random unit directions."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(classes, d, generator=g), dim=1)
    labels = torch.arange(classes).repeat_interleave(per_class)
    feats = centres[labels] + 0.05 * torch.randn(len(labels), d, generator=g)
    id_test = centres[torch.arange(classes).repeat(5)] + 0.05 * torch.randn(
        5 * classes, d, generator=g
    )
    far = torch.randn(30, d, generator=g)  # random directions, far from every centre
    return feats, labels, id_test, far


@pytest.mark.parametrize(
    "name, params",
    [
        ("knn", {"k": 1}),
        ("knn", {"k": 10}),
        ("mahalanobis", {}),
        ("mahalanobis", {"shrinkage": 0.1}),
    ],
)
def test_feature_scores_separate_clusters(name, params):
    feats, labels, id_test, far = _clusters()  # d = 32 < N = 64
    s = get_score(name, **params).fit(feats, labels)
    id_s, far_s = s.score(None, id_test), s.score(None, far)
    assert id_s.shape == (len(id_test),) and id_s.dtype == torch.float32
    assert id_s.min() > far_s.max()


@pytest.mark.parametrize("name", ["knn", "mahalanobis"])
def test_feature_scores_errors(name):
    s = get_score(name)
    assert s.needs_fit and s.needs_features
    with pytest.raises(ConfigError, match="call fit"):
        s.score(None, torch.randn(2, 4))
    with pytest.raises(ConfigError, match="empty"):
        s.fit(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ConfigError, match="NaN"):
        s.fit(torch.tensor([[1.0, math.nan]]), torch.tensor([0]))
    with pytest.raises(ConfigError, match="one entry per training feature"):
        s.fit(torch.randn(3, 4), torch.tensor([0, 1]))
    s.fit(torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2]))
    with pytest.raises(ConfigError, match="dimension 5, fitted on dimension 4"):
        s.score(None, torch.randn(2, 5))
    with pytest.raises(ConfigError, match="needs features"):
        s.score(torch.randn(2, 3))
    assert s.score(None, torch.zeros(0, 4)).shape == (0,)
    # Half-precision test features on a float32 fit: promoted, no dtype clash.
    assert s.score(None, torch.randn(2, 4).half()).dtype == torch.float32
    # A later fit replaces the previous statistics.
    s.fit(torch.randn(5, 3), torch.tensor([0, 0, 1, 1, 1]))
    assert s.score(None, torch.randn(2, 3)).shape == (2,)


# ----------------------------------------------------------------------------- Mahalanobis


def test_mahalanobis_hand_computed_pinv():
    # Class 0: (0.6, +-0.8), class 1: (-0.6, +-0.8); all unit norm. Means (+-0.6, 0);
    # centred features (0, +-0.8) -> S = diag(0, 0.64), rank 1, pinv = diag(0, 1/0.64).
    train = _t([[0.6, 0.8], [0.6, -0.8], [-0.6, 0.8], [-0.6, -0.8]])
    labels = torch.tensor([0, 0, 1, 1])
    m = MahalanobisScore().fit(train, labels)
    # e2 = (0, 1): diff to either mean is (-+0.6, 1) -> 1 / 0.64 -> distance 1.25.
    # e1 = (1, 0): differs only along the null direction of S -> distance 0 (pinv ignores it).
    got = m.score(None, _t([[0.0, 2.0], [1.0, 0.0]]))
    assert torch.allclose(got, _t([-1.25, 0.0]), atol=1e-12)
    assert m.classes.tolist() == [0, 1]


def test_mahalanobis_hand_computed_shrinkage():
    train = _t([[0.6, 0.8], [0.6, -0.8], [-0.6, 0.8], [-0.6, -0.8]])
    labels = torch.tensor([3, 3, 7, 7])  # labels need not be 0..C-1
    m = get_score("mahalanobis", shrinkage=0.5).fit(train, labels)
    # S' = 0.5 * diag(0, 0.64) + 0.5 * (0.64 / 2) I = diag(0.16, 0.48).
    # e1: diffs (0.4, 0) and (1.6, 0) -> 0.16 / 0.16 = 1 and 2.56 / 0.16 = 16 -> min 1.
    # e2: diffs (-+0.6, 1) -> 0.36 / 0.16 + 1 / 0.48 = 2.25 + 2.0833.. -> sqrt(4.3333..).
    got = m.score(None, _t([[1.0, 0.0], [0.0, 1.0]]))
    assert torch.allclose(got, _t([-1.0, -math.sqrt(2.25 + 1 / 0.48)]), atol=1e-12)


def test_mahalanobis_matches_numpy_pinv_few_shot():
    # N = 12 < d = 20: singular covariance, the few-shot case.
    rng = np.random.default_rng(3)
    feats, labels = rng.normal(size=(12, 20)), np.repeat(np.arange(3), 4)
    test = rng.normal(size=(9, 20))
    n = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    z = n(feats)
    means = np.stack([z[labels == c].mean(0) for c in range(3)])
    centred = z - means[labels]
    prec = np.linalg.pinv(centred.T @ centred / len(z), hermitian=True)
    diffs = n(test)[:, None, :] - means[None]
    ref = -np.sqrt(np.einsum("ncd,de,nce->nc", diffs, prec, diffs).min(1))
    got = MahalanobisScore().fit(torch.tensor(feats), torch.tensor(labels))
    got = got.score(None, torch.tensor(test)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-9)


def test_mahalanobis_one_shot_falls_back_to_euclidean():
    train = _t([[1.0, 0.0], [0.0, 3.0]])  # one sample per class: S = 0
    m = MahalanobisScore().fit(train, torch.tensor([0, 1]))
    got = m.score(None, _t([[1.0, 0.0], [-1.0, 0.0], [1.0, 1.0]]))
    expected = [0.0, -math.sqrt(2.0), -math.sqrt((1 - 2**-0.5) ** 2 + 0.5)]
    assert torch.allclose(got, _t(expected), atol=1e-12)


def test_mahalanobis_needs_integer_labels():
    with pytest.raises(ConfigError, match="needs training labels"):
        MahalanobisScore().fit(torch.randn(4, 3))
    with pytest.raises(ConfigError, match="integers"):
        MahalanobisScore().fit(torch.randn(4, 3), torch.tensor([0.0, 1.0, 0.0, 1.0]))


# ----------------------------------------------------------------------------- device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", score_names())
def test_scores_stay_on_gpu(name):
    feats, labels, id_test, _ = _clusters()
    params = {"logit_scale": 100.0} if name == "mcm" else {}
    s = get_score(name, **params).fit(feats.cuda(), labels.cuda())
    out = s.score(torch.randn(5, 4, device="cuda"), id_test[:5].cuda())
    assert out.device.type == "cuda" and out.shape == (5,)
    # Fitted on CPU, scored on GPU: statistics follow the inputs.
    s = get_score(name, **params).fit(feats, labels)
    assert s.score(torch.randn(5, 4, device="cuda"), id_test[:5].cuda()).device.type == "cuda"
