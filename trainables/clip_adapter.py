"""CLIP-Adapter (Gao et al., IJCV 2023): a bottleneck MLP on the raw image feature,
``A(f) = ReLU(W2 ReLU(W1 f))`` (no biases, as in the reference), mixed back with a residual
ratio, ``x = r * A(f) + (1 - r) * f``; cross-entropy on ``s * n(x) @ n(g).T`` against the
fixed text weights of the hand-written template.

Optimisation uses the shared loop's defaults (CRoFT's Dassl recipe: SGD 0.002, cosine, batch
32), so the baseline is trained as CRoFT is."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainables.base import DASSL_RECIPE, HParam, Method, MethodContext
from trainables.registry import register_method


@register_method
class CLIPAdapter(Method):
    name = "clip_adapter"
    hparams = {
        "ratio": HParam(0.2, low=0.0, high=1.0, help="residual ratio r of the adapted feature"),
        "reduction": HParam(4, choices=(2, 4, 8, 16), help="bottleneck width is d / reduction"),
    }
    default_score = "mcm"
    # trainers/CLIP_Adapter.py: residual ratio 0.2, reduction 4.
    reference_recipe = {**DASSL_RECIPE, "ratio": 0.2, "reduction": 4}

    def __init__(self, context: MethodContext, hp: dict[str, Any]) -> None:
        super().__init__(context, hp)
        d = context.embed_dim
        hidden = max(1, d // hp["reduction"])
        self.adapter = nn.Sequential(
            nn.Linear(d, hidden, bias=False),
            nn.ReLU(),
            nn.Linear(hidden, d, bias=False),
            nn.ReLU(),
        ).to(context.device)
        if hp["ratio"] == 0.0:
            # The adapter has no effect, so nothing trains (and the loop skips training).
            self.adapter.requires_grad_(False)
        text = F.normalize(context.class_text.detach().float(), dim=-1)
        self.register_buffer("text_weights", text.to(context.device))

    def adapted(self, features: torch.Tensor) -> torch.Tensor:
        """``x = r * A(f) + (1 - r) * f``, not normalised."""
        ratio = self.hp["ratio"]
        if ratio == 0.0:
            return features  # exactly zero-shot, and no graph through an adapter without effect
        return ratio * self.adapter(features) + (1.0 - ratio) * features

    def logits(self, features: torch.Tensor, domains: torch.Tensor | None = None) -> torch.Tensor:
        return self.logit_scale * self.embed(features) @ self.text_weights.T

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.adapted(features), dim=-1)
