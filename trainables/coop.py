"""CoOp (Zhou et al., IJCV 2022): M learnable context vectors ``[V1 .. VM]`` take the place
of the hand-written template's words; the prompts ``[V1 .. VM] classname.`` go through the
frozen text encoder and the logits are CLIP's, ``s * n(f) @ n(t).T``, trained with
cross-entropy. Only the context trains.

Defaults differ from the paper where the embedded model needs it: the paper's M = 16 does
not fit tiny-digits' context length of 16 tokens (start, end, class name and "." leave 12),
so M defaults to 4; real CLIP models (context length 77) take any M up to 16. Epochs: the
paper trains 200 epochs on 16-shot sets of 1000-1600 images; the embedded digits set
(16 shots x 6 classes x 3 domains = 288 images, 9 steps an epoch) converges in about 30.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from trainables.base import DASSL_RECIPE, HParam, MemberStep, Method, MethodContext
from trainables.registry import register_method
from trainables.text import CLASS_POSITIONS, PromptLearner


@register_method
class CoOp(Method):
    name = "coop"
    default_score = "mcm"
    # scripts/coop/coop_pacs.sh: 16 context tokens, shared, class token at the end.
    reference_recipe = {
        **DASSL_RECIPE, "n_ctx": 16, "ctx_init": "", "class_specific": False,
        "class_position": "end",
    }  # fmt: skip
    hparams = {
        "n_ctx": HParam(4, low=1, high=16, help="context length M (must fit the context length)"),
        "ctx_init": HParam(
            "", help="words initialising the context (exactly n_ctx tokens), '' = N(0, 0.02)"
        ),
        "class_specific": HParam(False, help="one context per class (CSC)"),
        "class_position": HParam("end", choices=CLASS_POSITIONS, help="where the class name goes"),
        "lr": HParam(0.002, low=1e-6, high=1.0, help="peak SGD learning rate"),
        "batch_size": HParam(32, low=1, high=4096),
        "epochs": HParam(30, low=0, high=1000),
    }

    def __init__(self, context: MethodContext, hp: dict[str, Any]) -> None:
        super().__init__(context, hp)
        self.prompt_learner = PromptLearner.from_hparams(
            context, hp, class_specific=hp["class_specific"], class_position=hp["class_position"]
        )

    def logits(self, features: torch.Tensor, domains: torch.Tensor | None = None) -> torch.Tensor:
        return self.clip_logits(features, self.prompt_learner())

    def population_broadcasts(self) -> bool:
        # A context shared by the classes runs on the members' stacked contexts.
        return self.prompt_learner.shares_start

    def population_loss(self, values, features, labels, domains):  # noqa: ANN001, ANN201
        # The cross-entropy of `logits`, per member of [..., B, K] logits.
        image = F.normalize(features, dim=-1)
        text = F.normalize(self.prompt_learner(), dim=-1)
        logits = self.logit_scale * image @ text.mT
        each = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="none")
        ce = each.view(labels.shape).mean(-1)
        return MemberStep(ce, {"ce": ce})
