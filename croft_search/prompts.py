"""Class prompts and zero-shot CLIP logits from raw features: what the zero-shot command,
the trial runner and the zero-shot method share."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from croft_search.errors import ConfigError


def class_prompts(template: str, classnames: Sequence[str]) -> list[str]:
    """The template filled with each class name."""
    if "{}" not in template:
        raise ConfigError(f"prompt template {template!r} needs a '{{}}' where the class name goes")
    return [template.format(name) for name in classnames]


def zero_shot_logits(image: torch.Tensor, text: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """CLIP logits `s * n(f) @ n(g).T` from raw image and text features."""
    return logit_scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
