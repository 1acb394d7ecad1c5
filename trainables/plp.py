"""PLP, pseudo-label probing (Adaloglou et al., TMLR 2024): a linear layer on ``n(f)``
trained with cross-entropy against zero-shot CLIP's predictions with a prompt ensemble. No
ground-truth label is ever used; the OOD score is the probe's MSP (or energy).

Pseudo-labels are computed once per training image, on its clean view, and serve every
augmented view of that image: the shared loop draws the view inside the step and asks
``targets(labels, index)`` by image row only. The reference labels each embedding it trains
on; with crop/flip views of the same image the zero-shot argmax rarely differs, and one
label per image keeps the target of an image fixed across epochs."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainables.base import HParam, Method, MethodContext
from trainables.registry import register_method
from trainables.zsclip import ensemble_templates, ensemble_text_weights


@register_method
class PseudoLabelProbe(Method):
    name = "plp"
    hparams = {
        "temperature": HParam(1.0, low=0.01, high=10.0, help="probe logits are divided by it"),
        # The few-shot set is a few hundred images (16 shots: 1-2 batches of 256), so the
        # probe gets many short epochs: 300 reach ~600 Adam steps at the reference's lr, where
        # the convex probe is close to its optimum; 100 left it clearly under-fitted.
        "optimizer": HParam("adamw", choices=("sgd", "adamw")),
        "lr": HParam(1e-3, low=1e-6, high=1.0),
        "weight_decay": HParam(1e-4, low=0.0, high=0.1),
        "batch_size": HParam(256, low=1, high=65_536),
        "epochs": HParam(300, low=1, high=5000),
        "warmup_epochs": HParam(0, low=0, high=1000),
    }
    default_score = "msp"

    def __init__(self, context: MethodContext, hp: dict[str, Any]) -> None:
        super().__init__(context, hp)
        self.probe = nn.Linear(context.embed_dim, len(context.classnames)).to(context.device)
        text = ensemble_text_weights(context, ensemble_templates(context.template))
        self.register_buffer("text_weights", text)
        self.register_buffer(
            "pseudo_labels", torch.full((len(context.train),), -1, device=context.device)
        )
        self.labelled = False

    def setup(self) -> None:
        clean = F.normalize(self.context.train.clean.to(self.text_weights), dim=-1)
        self.pseudo_labels.copy_((clean @ self.text_weights.T).argmax(dim=-1))
        self.labelled = True

    def targets(self, labels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if not self.labelled:
            raise RuntimeError("plp.targets before setup(): no pseudo-labels yet")
        return self.pseudo_labels[index.to(self.pseudo_labels.device)]

    def logits(self, features: torch.Tensor, domains: torch.Tensor | None = None) -> torch.Tensor:
        return self.probe(F.normalize(features, dim=-1)) / self.hp["temperature"]
