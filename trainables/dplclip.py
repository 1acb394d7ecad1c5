"""DPLCLIP, domain prompt learning (Zhang et al., 2021): an MLP maps the mean (normalised)
image feature of the samples of one domain to M context token embeddings; the prompts
``[ctx(domain)] classname.`` go through the frozen text encoder; cross-entropy on CLIP's
logits. The context is generated entirely (no shared learnable context): the prompt
learner's context is a fixed zero and the MLP's output is its per-slot bias.

In training every domain of the batch gets its own prompts from the mean of its samples; at
test time (no domains) the whole batch is one domain. Logits therefore depend on the batch
(``batch_dependent``), and evaluation groups rows by domain.

M defaults to 8 where the paper uses 16: 16 does not fit tiny-digits' context length of 16
tokens (at most 12 do); real CLIP models take 16.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainables.base import DASSL_RECIPE, HParam, Method, MethodContext
from trainables.registry import register_method
from trainables.text import PromptLearner

# Where the MLP sits: on the domain's mean feature (ours) or on every feature, then the mean.
DOMAIN_CONTEXTS = ("mean_then_mlp", "mlp_then_mean")


def domain_mlp(inputs: int, width: int, depth: int, dropout: float, outputs: int) -> nn.Module:
    """DomainBed's MLP: ``depth`` linear layers, dropout and ReLU between them."""
    layers: list[nn.Module] = []
    sizes = [inputs] + [width] * (depth - 1) + [outputs]
    for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        if index:
            layers += [nn.Dropout(dropout), nn.ReLU()]
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)


@register_method
class DPLCLIP(Method):
    name = "dplclip"
    default_score = "mcm"
    batch_dependent = True
    hparams = {
        "n_ctx": HParam(8, low=1, high=16, help="generated context tokens M"),
        "mlp_width": HParam(512, low=16, high=4096),
        "mlp_depth": HParam(3, low=2, high=6, help="linear layers of the MLP"),
        "mlp_dropout": HParam(0.1, low=0.0, high=0.9),
        "lr": HParam(0.002, low=1e-6, high=1.0, help="peak learning rate"),
        "batch_size": HParam(32, low=2, high=4096, help="domain means need several samples"),
        "epochs": HParam(30, low=0, high=1000),
        "domain_context": HParam(
            "mean_then_mlp",
            choices=DOMAIN_CONTEXTS,
            help="the MLP maps the domain's mean normalised feature, or each raw feature before "
            "the mean (the reference's trainers/DPLCLIP.py)",
        ),
        "cross_domain_logits": HParam(
            False,
            help="training logits of every image against every domain's prompts, [B, G*K], the "
            "label pointing into the first domain's block (the reference's)",
        ),
    }
    # scripts/DPLCLIP/DPLCLIP_pacs.sh (16 generated tokens) with the reference trainer's
    # order (MLP, then the mean) and its [B, G*K] training logits.
    reference_recipe = {
        **DASSL_RECIPE, "n_ctx": 16, "domain_context": "mlp_then_mean",
        "cross_domain_logits": True,
    }  # fmt: skip

    @classmethod
    def batchable(cls, hp: dict[str, Any]) -> bool:
        # The batch's domain means take torch.unique, whose output shape vmap cannot batch
        # (and dropout draws from torch's global generator).
        return False

    def __init__(self, context: MethodContext, hp: dict[str, Any]) -> None:
        super().__init__(context, hp)
        self.n_ctx = hp["n_ctx"]
        self.prompt_learner = PromptLearner(
            context.text_encoder, context.classnames, self.n_ctx, learn_context=False
        )
        self.width = context.text_encoder.width
        self.mlp = domain_mlp(
            context.embed_dim,
            hp["mlp_width"],
            hp["mlp_depth"],
            hp["mlp_dropout"],
            self.n_ctx * self.width,
        )

    def domain_text(self, features: torch.Tensor, domains: torch.Tensor | None) -> torch.Tensor:
        """Per-sample text features [B, K, d]: the prompts of the sample's domain."""
        return self._per_domain_text(features, domains)[0]

    def _per_domain_text(
        self, features: torch.Tensor, domains: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-sample text features [B, K, d], each present domain's [G, K, d])."""
        if domains is None:
            domains = torch.zeros(len(features), dtype=torch.long, device=features.device)
        present, member = torch.unique(domains, return_inverse=True)
        if self.hp["domain_context"] == "mlp_then_mean":
            inputs = self.mlp(features)
        else:
            inputs = F.normalize(features, dim=-1)
        sums = inputs.new_zeros(len(present), inputs.shape[1]).index_add_(0, member, inputs)
        counts = torch.bincount(member, minlength=len(present)).to(inputs.dtype)
        means = sums / counts[:, None]
        if self.hp["domain_context"] == "mean_then_mlp":
            means = self.mlp(means)
        text = self.prompt_learner(means.view(len(present), self.n_ctx, self.width))
        return text[member], text

    def logits(self, features: torch.Tensor, domains: torch.Tensor | None = None) -> torch.Tensor:
        per_sample, per_domain = self._per_domain_text(features, domains)
        if self.training and self.hp["cross_domain_logits"]:
            return self.clip_logits(features, per_domain.reshape(-1, per_domain.shape[-1]))
        return self.clip_logits(features, per_sample)
