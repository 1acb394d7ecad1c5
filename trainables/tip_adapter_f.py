"""Tip-Adapter-F (Zhang et al., ECCV 2022): zero-shot CLIP plus a key-value cache of the
training set, whose keys are then fine-tuned.

    Kc = n(mean over augmented views of f_i)       one key per training image  [N, d]
    Vc = one_hot(y_i)                               its label                   [N, K]
    logits = s * n(f) @ n(g).T + alpha * exp(-beta * (1 - n(f) @ Kc.T)) @ Vc

The affinity uses the unscaled cosine and the cache term is added to the *scaled* CLIP
logits, as in the paper. "-F": the keys are a trainable linear layer initialised from the
cache (not renormalised while training); values and text weights stay fixed. ``epochs = 0``
is the training-free Tip-Adapter.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainables.base import DASSL_RECIPE, HParam, Method, MethodContext
from trainables.registry import register_method


@register_method
class TipAdapterF(Method):
    name = "tip_adapter_f"
    hparams = {
        "alpha": HParam(1.0, low=0.0, high=100.0, help="weight of the cache logits"),
        "beta": HParam(1.0, low=0.1, high=100.0, help="sharpness of the cache affinity"),
        # The reference: AdamW at 1e-3 (torch's default weight decay 0.01), cosine, batch 256,
        # 20 epochs, no warm-up.
        "optimizer": HParam("adamw", choices=("sgd", "adamw")),
        "lr": HParam(1e-3, low=1e-6, high=1.0),
        "weight_decay": HParam(0.01, low=0.0, high=0.1),
        "batch_size": HParam(256, low=1, high=65_536),
        "epochs": HParam(20, low=0, high=1000, help="0 = training-free Tip-Adapter"),
        "warmup_epochs": HParam(0, low=0, high=1000),
    }
    # The logits are scaled cosines plus alpha times a cache vote, not cosines, so MCM's
    # "softmax of cosine / T" does not describe them; energy (logsumexp of the logits) is the
    # logit-based score that needs no such reading and uses the cache evidence as it is.
    default_score = "energy"
    # configs/trainers/TIP_ADAPTER/ViT_ep30.yaml (SGD at 0.001 for 50 epochs, batch 32) and
    # scripts/TIP_Adapter/tip_pacs_vit.sh (alpha 1, beta 10).
    reference_recipe = {
        **DASSL_RECIPE, "lr": 0.001, "epochs": 50, "alpha": 1.0, "beta": 10.0,
    }  # fmt: skip

    def __init__(self, context: MethodContext, hp: dict[str, Any]) -> None:
        super().__init__(context, hp)
        train = context.train
        keys = F.normalize(train.views.float().mean(dim=1), dim=-1).to(context.device)
        # alpha = 0 turns the cache off: zero-shot CLIP, with nothing to train.
        self.keys = nn.Parameter(keys, requires_grad=hp["alpha"] > 0.0)
        values = F.one_hot(train.labels, len(context.classnames)).float()
        self.register_buffer("values", values.to(context.device))
        text = F.normalize(context.class_text.detach().float(), dim=-1)
        self.register_buffer("text_weights", text.to(context.device))

    def cache_logits(self, image: torch.Tensor) -> torch.Tensor:
        """``exp(-beta * (1 - n(f) @ Kc.T)) @ Vc`` of normalised image features."""
        affinity = image @ self.keys.T
        return torch.exp(-self.hp["beta"] * (1.0 - affinity)) @ self.values

    def logits(self, features: torch.Tensor, domains: torch.Tensor | None = None) -> torch.Tensor:
        image = F.normalize(features, dim=-1)
        clip = self.logit_scale * image @ self.text_weights.T
        if self.hp["alpha"] == 0.0:
            return clip
        return clip + self.hp["alpha"] * self.cache_logits(image)
