"""The one interface every method implements, and the hyper-parameter declarations.

A method is a small `torch.nn.Module` that says which parameters train, how cached image
features become class logits, and which extra losses it adds; the shared loop in
`croft_search.trial.loop` does the optimisation for all of them (DomainBed's `update`/`predict`
shape, without its string-built commands or global state).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from croft_search.errors import ConfigError
from trainables.text import FrozenTextEncoder


class MemberStep(NamedTuple):
    """What one population member's step computes (`Method.population_loss`): its loss and
    the loss's parts; ``updates``, new values of state the step moves outside the optimiser
    (CRoFT's generator); ``gradients``, by parameter name, the gradients the method writes
    out itself, which then skip autograd (the loss need not reach those parameters)."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]
    updates: dict[str, torch.Tensor] = {}
    gradients: dict[str, torch.Tensor] = {}


@dataclass(frozen=True)
class HParam:
    """A hyper-parameter: its default, and the values it may take. The type is the
    default's (bool, int, float or str)."""

    default: Any
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None
    help: str = ""

    def coerce(self, key: str, value: Any) -> Any:
        """``value`` converted to this parameter's type, or a ConfigError saying why not."""
        kind = type(self.default)
        try:
            if kind is bool:
                if isinstance(value, str):
                    if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError
                    value = value.lower() in ("true", "1", "yes")
                elif not isinstance(value, (bool, int)) or value not in (0, 1):
                    raise ValueError
                value = bool(value)
            elif kind is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                value = int(value)
            elif kind is float:
                if isinstance(value, bool):
                    raise ValueError
                value = float(value)
                if value != value:  # NaN
                    raise ValueError
            else:
                value = str(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"hyper-parameter {key}={value!r} must be of type {kind.__name__}"
            ) from None
        if self.choices is not None and value not in self.choices:
            raise ConfigError(
                f"hyper-parameter {key}={value!r} must be one of "
                f"{', '.join(map(str, self.choices))}"
            )
        if self.low is not None and value < self.low:
            raise ConfigError(f"hyper-parameter {key}={value} is below its minimum {self.low}")
        if self.high is not None and value > self.high:
            raise ConfigError(f"hyper-parameter {key}={value} is above its maximum {self.high}")
        return value


# How a method's unset hyper-parameters are filled: its own defaults (ours), or the values
# the CRoFT authors' code base runs it with (reference: each method's ``reference_recipe``,
# scored by energy as in every table of theirs). The trial setting ``recipe``.
REFERENCE_SCORE = "energy"
# The recipe every trainer of the reference shares: CoOp/configs/trainers/*/ViT_ep30.yaml
# (SGD at 0.002, 30 epochs, batch 32, one constant warm-up epoch at 1e-5, cosine) and the
# defaults of its Dassl copy (CoOp/dassl/config/defaults.py: momentum 0.9, weight decay 0.1).
DASSL_RECIPE: dict[str, Any] = {
    "optimizer": "sgd",
    "lr": 0.002,
    "epochs": 30,
    "batch_size": 32,
    "warmup_epochs": 1,
    "warmup_lr": 1e-5,
    "momentum": 0.9,
    "weight_decay": 0.1,
    "drop_last": True,
}


# Hyper-parameters of the shared training loop; a method overrides defaults by redeclaring.
LOOP_HPARAMS: dict[str, HParam] = {
    "lr": HParam(0.002, low=0.0, high=10.0, help="peak learning rate"),
    "epochs": HParam(30, low=0, high=10_000),
    "batch_size": HParam(32, low=1, high=65_536),
    "optimizer": HParam("sgd", choices=("sgd", "adamw")),
    "momentum": HParam(0.9, low=0.0, high=1.0),
    "weight_decay": HParam(5e-4, low=0.0, high=1.0),
    "warmup_epochs": HParam(1, low=0, high=1000, help="constant warm-up epochs (Dassl)"),
    "warmup_lr": HParam(1e-5, low=0.0, high=10.0),
    "shots": HParam(16, low=0, high=100_000, help="images per class and domain; 0 = all"),
    "drop_last": HParam(
        False,
        help="skip an epoch's last incomplete batch when the training set holds a full one "
        "(Dassl's training loader)",
    ),
    "view_order": HParam(
        "random",
        choices=("random", "epoch"),
        help="augmented view of an image: a random one each step, or view epoch % views "
        "(with views >= epochs, a fresh crop every epoch as in the reference)",
    ),
    "seed": HParam(0, low=0, high=2**31 - 1),
}


@dataclass(frozen=True)
class TrainData:
    """The (few-shot) training set as cached features: ``views`` [N, V, d] augmented views,
    ``clean`` [N, d] the evaluation view, ``labels`` [N], ``domains`` [N] source-domain ids.
    A subset cut from a larger set may say where from: ``views`` is ``source[rows]``, so
    that subsets of one source can share its rows (a population's members)."""

    views: torch.Tensor
    clean: torch.Tensor
    labels: torch.Tensor
    domains: torch.Tensor
    source: torch.Tensor | None = None
    rows: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class MethodContext:
    """What a method may build itself from: the frozen text side, the class names, CLIP's
    temperature, and the training data (for cache-based methods and pseudo-labels)."""

    classnames: tuple[str, ...]
    template: str
    class_text: torch.Tensor  # raw text features of the template prompts [K, d]
    logit_scale: float
    embed_dim: int
    train: TrainData
    device: torch.device
    # The dataset's name, for methods whose reference code switches on it (CRoFT on VLCS).
    dataset: str = ""
    # Opening the text tower is deferred to the methods that run it (prompt learners), so
    # methods on fixed text features work with any backbone.
    make_text_encoder: Callable[[], FrozenTextEncoder] | None = None

    @functools.cached_property
    def text_encoder(self) -> FrozenTextEncoder:
        if self.make_text_encoder is None:
            raise ConfigError("this trial has no text encoder; prompt learning needs a backbone")
        return self.make_text_encoder()


class Method(nn.Module):
    """Base class: subclasses set ``name``, declare ``hparams`` and implement ``logits``."""

    name: ClassVar[str]
    hparams: ClassVar[dict[str, HParam]] = {}
    # The post-hoc OOD score reported by default (any score in croft_search.scores works).
    default_score: ClassVar[str] = "mcm"
    # Whether logits depend on the batch as a whole (DPLCLIP: the batch's mean feature).
    batch_dependent: ClassVar[bool] = False
    # Whether training_loss may step the loop's optimiser (its ``update``) on a loss that
    # leaves some trainable parameters without a gradient (CRoFT's generator steps).
    partial_steps: bool = False
    # The hyper-parameters the CRoFT code base (github LinLLLL/CRoFT, for ViT-B/16) trains
    # this method with; the trial setting recipe=reference fills every one a configuration
    # leaves unset. Empty for a method that code base does not run.
    reference_recipe: ClassVar[dict[str, Any]] = {}

    @classmethod
    def batchable(cls, hp: dict[str, Any]) -> bool:
        """Whether members with these hyper-parameters can train as one population
        (`croft_search.trial.population`): the loss is a pure function of the method's
        parameters and buffers, with no random draw and no optimiser step inside it."""
        return True

    @classmethod
    def member_values(cls, hp: dict[str, Any]) -> dict[str, float]:
        """The method's own hyper-parameters whose values may differ between the members of
        one population, read by `population_loss` as 0-dim tensors; {} by default."""
        return {}

    @classmethod
    def structure(cls, hp: dict[str, Any]) -> tuple:
        """What of `member_values` decides the method's shape (a term on or off): members
        of one population agree on it."""
        return ()

    def population_row_spaces(self) -> dict[str, torch.Tensor]:
        """Trained matrices W [out, in] that `population_loss` reads only as R @ W.T, for a
        fixed R [r, in] with r < in, by name: {name: R}. A population training them by SGD
        keeps each as c W0 + A R (W0 its start, c a number, A [out, r], the momentum
        buffer alike), the form SGD's steps keep it in when every gradient is some
        [out, r] matrix times R; it hands `population_loss` the product R @ W.T as
        ``values[name]`` instead of W, and takes back ``gradients[name]``, the loss's
        gradient with respect to that product. Only where the method broadcasts
        (`population_broadcasts`) and the optimiser is SGD: otherwise W comes as usual and
        ``values`` has no entry for it. {} by default."""
        return {}

    def population_broadcasts(self) -> bool:
        """Whether this method's `population_loss` computes every member at once when
        handed the stacked [K, ...] parameters, buffers, data and member values ([K, 1, 1])
        as they are, so that a
        population runs it without vmap (whose batching rules cost about twice the plain
        operations on small matrices). False: it is written for one member, and the
        population maps it over the members with `torch.func.vmap`."""
        return False

    def population_loss(
        self,
        values: dict[str, torch.Tensor],
        features: torch.Tensor,
        labels: torch.Tensor,
        domains: torch.Tensor,
    ) -> MemberStep:
        """One member's training step inside a population (`MemberStep`). ``values``:
        `member_values`. By default cross-entropy plus `extra_losses`, as `training_loss`,
        every gradient by autograd."""
        ce = F.cross_entropy(self.logits(features, domains), labels)
        loss, parts = ce, {"ce": ce}
        for key, value in self.extra_losses(features, labels, domains).items():
            loss = loss + value
            parts[key] = value
        return MemberStep(loss, parts)

    def __init__(self, context: MethodContext, hp: dict[str, Any]) -> None:
        super().__init__()
        self.context = context
        self.hp = hp
        self.logit_scale = context.logit_scale

    # -- what every method defines ------------------------------------------------------
    def logits(self, features: torch.Tensor, domains: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits [B, K] from raw cached image features [B, d]."""
        raise NotImplementedError

    def extra_losses(
        self, features: torch.Tensor, labels: torch.Tensor, domains: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Weighted regularisers added to the cross-entropy (already multiplied by their
        lambdas)."""
        return {}

    # -- hooks with sensible defaults ---------------------------------------------------
    def setup(self) -> None:
        """Runs once before training (closed-form fits, caches, pseudo-labels)."""

    def targets(self, labels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Training targets of the batch; PLP replaces ground truth with pseudo-labels.
        ``index`` are the rows of the batch in the training set. Row by row: a population
        asks once for every row and indexes the answer for each batch."""
        return labels

    @classmethod
    def resolve(cls, hp: dict[str, Any], given: set[str]) -> dict[str, Any]:
        """The resolved hyper-parameters, after presets that depend on others (``given``:
        the keys the configuration set); raises ConfigError for contradicting values."""
        return hp

    def training_loss(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        domains: torch.Tensor,
        update: Callable[[torch.Tensor], None] | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The batch's loss and its parts. ``update(loss)`` takes one step of the loop's
        optimiser on ``loss`` (zero gradients, backward keeping the graph, step), for
        methods that step inside a batch (the reference CRoFT's generator steps)."""
        logits = self.logits(features, domains)
        loss = F.cross_entropy(logits, labels)
        parts = {"ce": float(loss.detach())}
        for key, value in self.extra_losses(features, labels, domains).items():
            loss = loss + value
            parts[key] = float(value.detach())
        return loss, parts

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """Normalised image embedding used by the KNN and Mahalanobis scores."""
        return F.normalize(features, dim=-1)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def clip_logits(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``s * n(image) @ n(text).T``; text may be [K, d] or per-sample [B, K, d]."""
        image = F.normalize(image, dim=-1)
        text = F.normalize(text, dim=-1)
        if text.dim() == 3:
            return self.logit_scale * torch.einsum("bd,bkd->bk", image, text)
        return self.logit_scale * image @ text.T
