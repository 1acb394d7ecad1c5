"""Post-hoc OOD scores (OpenOOD style): one small class per score behind `OODScore`.

Every score maps a batch to a 1-D float tensor in which **higher means more
in-distribution**, so all of them feed the same metrics (ID = positive class).
Scores are computed on the device of their inputs; half-precision inputs are promoted to
float32 (softmax / covariance maths in fp16 loses too much), float64 stays float64.

    score = get_score("energy", T=1.0)
    s = score.score(logits)                              # logit-based scores
    knn = get_score("knn", k=10).fit(train_feats, train_labels)
    s = knn.score(None, test_feats)                      # feature-based scores

Scores that need training statistics (`needs_fit`) or test features (`needs_features`)
say so through class attributes, so callers can prepare the right inputs generically.
"""

from __future__ import annotations

import inspect
import math
import numbers
from abc import ABC, abstractmethod
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from croft_search.errors import ConfigError

__all__ = [
    "OODScore",
    "MSPScore",
    "MaxLogitScore",
    "EnergyScore",
    "MCMScore",
    "KNNScore",
    "MahalanobisScore",
    "register_score",
    "get_score",
    "score_names",
    "score_parameters",
]


# ----------------------------------------------------------------------------- helpers


def _working(x: Tensor) -> Tensor:
    """Floating dtype used for the maths: at least float32, float64 kept as is."""
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


def _check_2d(name: str, what: str, x: Any) -> Tensor:
    if x is None:
        raise ConfigError(f"OOD score '{name}' needs {what} (a 2-D tensor), got None")
    x = torch.as_tensor(x)
    if x.ndim != 2:
        raise ConfigError(
            f"OOD score '{name}': {what} must be 2-D (N, D), got shape {tuple(x.shape)}"
        )
    return x


def _check_logits(name: str, logits: Any) -> Tensor:
    logits = _check_2d(name, "logits", logits)
    if logits.shape[1] == 0:
        raise ConfigError(f"OOD score '{name}': logits have zero classes")
    return _working(logits)


def _positive_real(score: str, param: str, value: Any) -> float:
    # bool is an int subclass; `T=True` is almost certainly a bug, so refuse it.
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(float(value))
        or float(value) <= 0
    ):
        raise ConfigError(
            f"OOD score '{score}': {param} must be a finite number > 0, got {value!r}"
        )
    return float(value)


def _l2_normalise(x: Tensor) -> Tensor:
    # eps guards all-zero rows (they stay zero instead of becoming NaN).
    return torch.nn.functional.normalize(x, p=2.0, dim=1, eps=1e-12)


def _max_softmax(z: Tensor) -> Tensor:
    # max softmax = 1 / sum_j exp(z_j - max z): no (N, K) probability tensor is kept, and
    # shifting by the max keeps it exact for CLIP-scale logits. (exp(max - logsumexp) would
    # lose the small log-sum term against a large max: 0.4999 instead of 0.5 at 1e4.)
    shifted = z - z.max(dim=1, keepdim=True).values
    return 1.0 / torch.exp(shifted).sum(dim=1)


# ----------------------------------------------------------------------------- base + registry


class OODScore(ABC):
    """A post-hoc OOD score. Higher output = more in-distribution.

    Subclasses take their hyper-parameters as keyword arguments of `__init__` (validated
    there, raising ConfigError); `get_score` uses that signature to reject unknown names.
    """

    name: ClassVar[str]
    #: True when `fit` must be called with training features before `score`.
    needs_fit: ClassVar[bool] = False
    #: True when `score` reads `features` (test features) rather than `logits`.
    needs_features: ClassVar[bool] = False

    def fit(self, features: Tensor, labels: Tensor | None = None) -> OODScore:
        """Store statistics of the ID training features; a no-op for logit-based scores."""
        return self

    @abstractmethod
    def score(self, logits: Tensor, features: Tensor | None = None) -> Tensor:
        """Return a 1-D float tensor of N scores on the inputs' device."""

    def __call__(self, logits: Tensor, features: Tensor | None = None) -> Tensor:
        return self.score(logits, features)

    def params(self) -> dict[str, Any]:
        """The hyper-parameters this score was built with (for logging)."""
        return {p: getattr(self, p) for p in _param_names(type(self))}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


_REGISTRY: dict[str, type[OODScore]] = {}

S = TypeVar("S", bound=type[OODScore])


def register_score(cls: S) -> S:
    """Class decorator: make `cls` available to `get_score` under `cls.name`."""
    if not (isinstance(cls, type) and issubclass(cls, OODScore)):
        raise TypeError(f"register_score expects an OODScore subclass, got {cls!r}")
    name = getattr(cls, "name", None)
    # Lower-case only: get_score looks names up case-insensitively.
    if not isinstance(name, str) or not name or name != name.strip().lower():
        raise TypeError(f"{cls.__name__} must define a non-empty lower-case class attribute `name`")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"OOD score name '{name}' is already registered")
    _REGISTRY[name] = cls
    return cls


def score_names() -> list[str]:
    """Registered score names, sorted."""
    return sorted(_REGISTRY)


def score_parameters(name: str) -> list[str]:
    """The keyword parameters score ``name`` takes (``logit_scale`` for scores of CLIP's
    cosines, which the caller supplies from the model)."""
    key = str(name).strip().lower()
    if key not in _REGISTRY:
        raise ConfigError(f"unknown OOD score '{name}'; valid names: {', '.join(score_names())}")
    return _param_names(_REGISTRY[key])


def _param_names(cls: type[OODScore]) -> list[str]:
    sig = inspect.signature(cls.__init__)
    return [
        p.name
        for p in sig.parameters.values()
        if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


def get_score(name: str, **params: Any) -> OODScore:
    """Build the score registered as `name` (case-insensitive) with keyword `params`.

    Unknown names, unknown parameters and invalid values raise ConfigError (one line).
    """
    key = str(name).strip().lower()
    if key not in _REGISTRY:
        raise ConfigError(f"unknown OOD score '{name}'; valid names: {', '.join(score_names())}")
    cls = _REGISTRY[key]
    valid = _param_names(cls)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown parameter(s) {', '.join(unknown)} for OOD score '{key}'; "
            f"valid parameters: {', '.join(valid) if valid else 'none'}"
        )
    return cls(**params)


# ----------------------------------------------------------------------------- logit scores


@register_score
class MSPScore(OODScore):
    """Maximum softmax probability of `logits / T` (Hendrycks & Gimpel, 2017)."""

    name = "msp"

    def __init__(self, *, T: float = 1.0) -> None:
        self.T = _positive_real(self.name, "T", T)

    def score(self, logits: Tensor, features: Tensor | None = None) -> Tensor:
        z = _check_logits(self.name, logits)
        return _max_softmax(z / self.T)


@register_score
class MaxLogitScore(OODScore):
    """Largest logit (Hendrycks et al., 2022)."""

    name = "maxlogit"

    def __init__(self) -> None:
        pass

    def score(self, logits: Tensor, features: Tensor | None = None) -> Tensor:
        return _check_logits(self.name, logits).max(dim=1).values


@register_score
class EnergyScore(OODScore):
    """Negative free energy `T * logsumexp(logits / T)` (Liu et al., 2020)."""

    name = "energy"

    def __init__(self, *, T: float = 1.0) -> None:
        self.T = _positive_real(self.name, "T", T)

    def score(self, logits: Tensor, features: Tensor | None = None) -> Tensor:
        z = _check_logits(self.name, logits)
        return self.T * torch.logsumexp(z / self.T, dim=1)


@register_score
class MCMScore(OODScore):
    """Maximum concept matching (Ming et al., 2022): max softmax of `cos / T`.

    CLIP logits are `s * cos`, so the cosines are `logits / logit_scale`. `logit_scale`
    is the *multiplier* `s = exp(model.logit_scale)` (100 for OpenAI CLIP), not the
    log-parameter stored in open_clip models. It is required: guessing 100 would silently
    give MSP-like numbers for models with a different scale.
    """

    name = "mcm"

    def __init__(self, *, logit_scale: float | None = None, T: float = 1.0) -> None:
        if logit_scale is None:
            raise ConfigError(
                "OOD score 'mcm' needs logit_scale (CLIP's multiplier s = exp(logit_scale),"
                " e.g. 100)"
            )
        self.logit_scale = _positive_real(self.name, "logit_scale", logit_scale)
        self.T = _positive_real(self.name, "T", T)

    def score(self, logits: Tensor, features: Tensor | None = None) -> Tensor:
        z = _check_logits(self.name, logits)
        return _max_softmax((z / self.logit_scale) / self.T)


# ----------------------------------------------------------------------------- feature scores


class _FeatureScore(OODScore):
    """Shared plumbing for scores fitted on ID training features."""

    needs_fit = True
    needs_features = True

    def _check_fit_inputs(self, features: Tensor, labels: Tensor | None) -> Tensor:
        features = _check_2d(self.name, "training features", features)
        if features.shape[0] == 0 or features.shape[1] == 0:
            raise ConfigError(
                f"OOD score '{self.name}': training features are empty, shape "
                f"{tuple(features.shape)}"
            )
        features = _working(features.detach())
        if not torch.isfinite(features).all():
            raise ConfigError(f"OOD score '{self.name}': training features contain NaN/inf")
        if labels is not None:
            labels = torch.as_tensor(labels)
            if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
                raise ConfigError(
                    f"OOD score '{self.name}': labels must be 1-D with one entry per training"
                    f" feature ({features.shape[0]}), got shape {tuple(labels.shape)}"
                )
        return features

    def _check_score_inputs(self, features: Tensor | None, dim: int | None) -> Tensor:
        if dim is None:
            raise ConfigError(f"OOD score '{self.name}': call fit(train_features, ...) first")
        features = _check_2d(self.name, "features", features)
        if features.shape[1] != dim:
            raise ConfigError(
                f"OOD score '{self.name}': features have dimension {features.shape[1]}, "
                f"fitted on dimension {dim}"
            )
        return _working(features)


@register_score
class KNNScore(_FeatureScore):
    """Deep nearest neighbours (Sun et al., 2022): `-||n(x) - n(z_(k))||`, where `z_(k)` is
    the k-th nearest L2-normalised training feature.

    The distance is the plain Euclidean one (OpenOOD's faiss index reports its square;
    the ranking, hence every metric, is identical). `k` larger than the training set is
    clamped to its size (`k_effective`), so few-shot runs never crash.
    """

    name = "knn"
    #: Upper bound on elements of one (test block x train) similarity matrix: 2**24
    #: float32 = 64 MiB, so 10k x 10k runs in ~6 blocks instead of one 400 MB matrix.
    max_block_elements: ClassVar[int] = 2**24

    def __init__(self, *, k: int = 10) -> None:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or int(k) < 1:
            raise ConfigError(f"OOD score 'knn': k must be an integer >= 1, got {k!r}")
        self.k = int(k)
        self._bank: Tensor | None = None

    @property
    def k_effective(self) -> int:
        """`k` clamped to the number of fitted training features."""
        if self._bank is None:
            return self.k
        return min(self.k, self._bank.shape[0])

    def fit(self, features: Tensor, labels: Tensor | None = None) -> KNNScore:
        """Store the L2-normalised training features (labels are not used)."""
        self._bank = _l2_normalise(self._check_fit_inputs(features, labels))
        return self

    def score(self, logits: Tensor | None, features: Tensor | None = None) -> Tensor:
        dim = None if self._bank is None else self._bank.shape[1]
        x = _l2_normalise(self._check_score_inputs(features, dim))
        bank = self._bank.to(device=x.device, dtype=torch.promote_types(x.dtype, self._bank.dtype))
        x = x.to(bank.dtype)
        k = self.k_effective
        rows = max(1, self.max_block_elements // bank.shape[0])
        out = []
        for start in range(0, x.shape[0], rows):
            sims = x[start : start + rows] @ bank.T
            # For unit vectors ||a - b||^2 = 2 - 2 a.b, so the k-th nearest neighbour is the
            # k-th largest cosine; topk avoids sorting the whole row.
            kth = sims.topk(k, dim=1).values[:, k - 1]
            out.append(-torch.sqrt(torch.clamp(2.0 - 2.0 * kth, min=0.0)))
        if not out:
            return x.new_zeros(0)
        return torch.cat(out)


@register_score
class MahalanobisScore(_FeatureScore):
    """Mahalanobis distance to the nearest class mean (Lee et al., 2018), on normalised
    features: `-min_c sqrt((n(x) - mu_c)^T P (n(x) - mu_c))`.

    `mu_c` are class means of the normalised training features; the shared covariance
    `S` is that of the class-centred features (divided by N, like sklearn's
    EmpiricalCovariance); `P` is its pseudo-inverse. Few-shot CLIP features have N < d, so
    `S` is singular: the pseudo-inverse ignores directions the training set never varies in
    (the reference behaviour). `shrinkage` in [0, 1) blends `S` towards
    `(trace(S)/d) I` (Ledoit-Wolf-style target) so those directions are penalised too.
    One sample per class (S = 0) falls back to the Euclidean distance to the class means.
    OpenOOD reports the squared distance; the ranking is identical.
    """

    name = "mahalanobis"

    def __init__(self, *, shrinkage: float = 0.0) -> None:
        if (
            isinstance(shrinkage, bool)
            or not isinstance(shrinkage, numbers.Real)
            or not 0.0 <= float(shrinkage) < 1.0
        ):
            raise ConfigError(
                f"OOD score 'mahalanobis': shrinkage must be a number in [0, 1), got {shrinkage!r}"
            )
        self.shrinkage = float(shrinkage)
        self._whiten: Tensor | None = None  # (d, r): P = W @ W.T
        self._means_w: Tensor | None = None  # (C, r): class means in the whitened space
        self.classes: Tensor | None = None

    def fit(self, features: Tensor, labels: Tensor | None = None) -> MahalanobisScore:
        if labels is None:
            raise ConfigError("OOD score 'mahalanobis' needs training labels for fit()")
        z = self._check_fit_inputs(features, labels)
        labels = torch.as_tensor(labels, device=z.device)
        if labels.is_floating_point() or labels.is_complex():
            raise ConfigError("OOD score 'mahalanobis': labels must be integers")
        out_dtype = z.dtype
        # Covariance and its eigen-decomposition in float64: the spectrum of few-shot
        # covariances spans many orders of magnitude and the rank cut needs it accurate.
        z = _l2_normalise(z.double())
        classes, inverse = torch.unique(labels, return_inverse=True)
        n, d = z.shape
        sums = torch.zeros(len(classes), d, dtype=z.dtype, device=z.device)
        sums.index_add_(0, inverse, z)
        counts = torch.bincount(inverse, minlength=len(classes)).to(z.dtype)
        means = sums / counts[:, None]
        centred = z - means[inverse]
        cov = centred.T @ centred / n
        trace = torch.trace(cov)
        if trace <= 0:
            # No within-class variation at all (one shot per class): Euclidean distance.
            whiten = torch.eye(d, dtype=z.dtype, device=z.device)
        else:
            if self.shrinkage > 0:
                eye = torch.eye(d, dtype=z.dtype, device=z.device)
                cov = (1 - self.shrinkage) * cov + self.shrinkage * (trace / d) * eye
            evals, evecs = torch.linalg.eigh(cov)
            # Same cut-off as numpy/torch pinv (rtol = max(shape) * eps): eigenvalues below
            # it are numerical zeros of a rank-deficient covariance, not real variance.
            keep = evals > evals.max() * d * torch.finfo(z.dtype).eps
            # P = pinv(S) = V diag(1/lambda) V^T = W W^T with W = V diag(lambda^-1/2); the
            # distance is then a Euclidean one in the whitened space x @ W.
            whiten = evecs[:, keep] / torch.sqrt(evals[keep])
        self._whiten = whiten.to(out_dtype)
        self._means_w = (means @ whiten).to(out_dtype)
        self.classes = classes
        return self

    def score(self, logits: Tensor | None, features: Tensor | None = None) -> Tensor:
        dim = None if self._whiten is None else self._whiten.shape[0]
        x = _l2_normalise(self._check_score_inputs(features, dim))
        dtype = torch.promote_types(x.dtype, self._whiten.dtype)
        whiten = self._whiten.to(device=x.device, dtype=dtype)
        means_w = self._means_w.to(device=x.device, dtype=dtype)
        y = x.to(dtype) @ whiten
        # ||y - m||^2 = ||y||^2 - 2 y.m + ||m||^2: one (N, C) matmul, no (N, C, r) tensor.
        d2 = (y * y).sum(1, keepdim=True) - 2.0 * (y @ means_w.T) + (means_w * means_w).sum(1)
        return -torch.sqrt(torch.clamp(d2.min(dim=1).values, min=0.0))
