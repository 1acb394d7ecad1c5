"""CoCoOp (Zhou et al., CVPR 2022): CoOp's context plus a meta-net
``Linear(d, d/16) - ReLU - Linear(d/16, w)`` that maps each (normalised) image feature to a
bias added to every context vector, so every image gets its own prompts. The text encoder
runs on K prompts per image, which makes it the most expensive prompt learner by design.

Departures from the paper, for speed: batch 32 instead of 1 (the paper's batch of one
would take 288 optimiser steps an epoch on the embedded digits set), hence 20 epochs
instead of 10 at the same learning rate.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainables.base import DASSL_RECIPE, HParam, Method, MethodContext
from trainables.registry import register_method
from trainables.text import PromptLearner

META_NET_REDUCTION = 16


@register_method
class CoCoOp(Method):
    name = "cocoop"
    default_score = "mcm"
    # scripts/cocoop/cocoop_pacs.sh and configs/trainers/CoCoOp/ViT_ep30.yaml: 16 random
    # context tokens, batch 4, 30 epochs.
    reference_recipe = {**DASSL_RECIPE, "n_ctx": 16, "ctx_init": "", "batch_size": 4}
    hparams = {
        "n_ctx": HParam(4, low=1, high=16, help="context length M (must fit the context length)"),
        "ctx_init": HParam(
            "a photo of a",
            help="words initialising the context (exactly n_ctx tokens), '' = N(0, 0.02)",
        ),
        "lr": HParam(0.002, low=1e-6, high=1.0, help="peak SGD learning rate"),
        "batch_size": HParam(32, low=1, high=4096, help="the paper uses 1; see the module doc"),
        "epochs": HParam(20, low=0, high=1000),
    }

    def __init__(self, context: MethodContext, hp: dict[str, Any]) -> None:
        super().__init__(context, hp)
        self.prompt_learner = PromptLearner.from_hparams(context, hp)
        hidden = max(1, context.embed_dim // META_NET_REDUCTION)
        self.meta_net = nn.Sequential(
            nn.Linear(context.embed_dim, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, context.text_encoder.width),
        )

    def logits(self, features: torch.Tensor, domains: torch.Tensor | None = None) -> torch.Tensor:
        bias = self.meta_net(F.normalize(features, dim=-1))
        return self.clip_logits(features, self.prompt_learner(bias))
