"""Linear probe: multinomial logistic regression on ``n(f)`` with the ID labels, fitted in
closed form by scikit-learn's L-BFGS before "training" (no SGD); its weights become a frozen
linear layer, so the probe's logits are exactly scikit-learn's decision function."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from croft_search.errors import ConfigError
from trainables.base import HParam, Method, MethodContext
from trainables.registry import register_method

# Logit of a class with no training image: never predicted, softmax probability exactly 0
# in float32, yet finite so no score meets inf - inf.
UNSEEN_CLASS_LOGIT = -1e4


@register_method
class LinearProbe(Method):
    name = "linear_probe"
    hparams = {
        "C": HParam(1.0, low=1e-3, high=1e3, help="inverse L2 strength (search on a log scale)"),
        "max_iter": HParam(1000, low=10, high=100_000, help="L-BFGS iterations"),
        "use_views": HParam(False, help="fit on every augmented view instead of the clean one"),
        "epochs": HParam(0, low=0, high=0, help="closed-form fit: no SGD epochs"),
    }
    default_score = "msp"

    def __init__(self, context: MethodContext, hp: dict[str, Any]) -> None:
        super().__init__(context, hp)
        k, d = len(context.classnames), context.embed_dim
        self.register_buffer("weight", torch.zeros(k, d, device=context.device))
        self.register_buffer("bias", torch.zeros(k, device=context.device))
        self.fitted = False

    def setup(self) -> None:
        train = self.context.train
        if self.hp["use_views"]:
            n_views = train.views.shape[1]
            features = train.views.reshape(-1, train.views.shape[-1])
            labels = train.labels.repeat_interleave(n_views)
        else:
            features, labels = train.clean, train.labels
        classes = torch.unique(labels)
        if len(classes) < 2:
            raise ConfigError(
                f"the linear probe needs training images of at least two classes, got "
                f"{len(classes)}; use more shots or another target domain"
            )
        # scikit-learn takes seconds to import: only a linear probe's setup pays for it, not
        # every process that looks the methods up.
        from sklearn.linear_model import LogisticRegression

        probe = LogisticRegression(C=self.hp["C"], max_iter=self.hp["max_iter"])
        probe.fit(F.normalize(features.double(), dim=-1).cpu().numpy(), labels.cpu().numpy())
        weight, bias = _class_rows(probe, len(self.context.classnames))
        self.weight.copy_(torch.from_numpy(weight))
        self.bias.copy_(torch.from_numpy(bias))
        self.fitted = True

    def logits(self, features: torch.Tensor, domains: torch.Tensor | None = None) -> torch.Tensor:
        if not self.fitted:
            raise RuntimeError("linear_probe.logits before setup(): the probe is not fitted")
        return F.normalize(features, dim=-1) @ self.weight.T + self.bias


def _class_rows(probe: Any, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Weights [K, d] and biases [K] whose softmax is ``probe.predict_proba``, for all K ID
    classes (scikit-learn only knows the classes it saw)."""
    coef, intercept = probe.coef_, probe.intercept_
    if len(probe.classes_) == 2:
        # Binary fits keep one row z for the second class: softmax([0, z]) = sigmoid(z).
        coef = np.concatenate([np.zeros_like(coef), coef])
        intercept = np.concatenate([np.zeros_like(intercept), intercept])
    weight = np.zeros((n_classes, coef.shape[1]))
    bias = np.full(n_classes, UNSEEN_CLASS_LOGIT)
    weight[probe.classes_] = coef
    bias[probe.classes_] = intercept
    return weight, bias
