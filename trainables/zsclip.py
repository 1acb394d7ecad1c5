"""Zero-shot CLIP (Radford et al., 2021): no trainable parameter; logits
``s * n(f) @ n(g).T`` against text weights from the hand-written template, or from a
template ensemble (each template's features normalised, averaged, renormalised).

The ensemble helpers live here because PLP labels its training images with the same
ensemble."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from croft_search.prompts import class_prompts
from trainables.base import HParam, Method, MethodContext
from trainables.registry import register_method

# The five templates of the PLP paper (Adaloglou et al., TMLR 2024).
PLP_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a photo of many {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
)


def ensemble_templates(dataset_template: str) -> tuple[str, ...]:
    """The dataset's own template followed by the PLP five, without duplicates.

    The PLP templates are generic; a dataset whose hand-written template says more (digits:
    "a photo of the number {}.") keeps that template as one member, so the ensemble never
    loses the prompt zero-shot CLIP uses. For "a photo of a {}." (PACS, VLCS) this is exactly
    the PLP five."""
    return tuple(dict.fromkeys((dataset_template, *PLP_TEMPLATES)))


@torch.no_grad()
def ensemble_text_weights(context: MethodContext, templates: Sequence[str]) -> torch.Tensor:
    """Unit-norm class weights [K, d]: per template the normalised features of its K prompts,
    averaged over templates, normalised again."""
    per_template = [
        F.normalize(context.text_encoder.encode(class_prompts(t, context.classnames)), dim=-1)
        for t in templates
    ]
    mean = torch.stack(per_template).float().mean(dim=0)
    return F.normalize(mean, dim=-1).to(context.device)


def zero_shot_text_weights(context: MethodContext, ensemble: bool) -> torch.Tensor:
    """Unit-norm class weights [K, d] of the hand-written template, or of its ensemble."""
    if ensemble:
        return ensemble_text_weights(context, ensemble_templates(context.template))
    return F.normalize(context.class_text.detach().float(), dim=-1).to(context.device)


@register_method
class ZeroShotCLIP(Method):
    name = "zsclip"
    hparams = {
        "ensemble": HParam(
            False, help="average the text weights of the dataset template and the PLP five"
        ),
        # Nothing trains, so the loop has nothing to do; refusing other values keeps a search
        # from spending trials on a setting that cannot change the result.
        "epochs": HParam(0, low=0, high=0, help="zero-shot: nothing trains"),
    }
    default_score = "mcm"
    # trainers/zsclip.py: the dataset's one template ("a photo of a {}." for PACS and VLCS).
    reference_recipe = {"ensemble": False}

    def __init__(self, context: MethodContext, hp: dict[str, Any]) -> None:
        super().__init__(context, hp)
        self.register_buffer("text_weights", zero_shot_text_weights(context, hp["ensemble"]))

    def logits(self, features: torch.Tensor, domains: torch.Tensor | None = None) -> torch.Tensor:
        return self.logit_scale * F.normalize(features, dim=-1) @ self.text_weights.T
