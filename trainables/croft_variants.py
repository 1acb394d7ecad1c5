"""CRoFT's paper equations and its authors' code, side by side: every difference as a switch,
the two presets (``implementation: paper | reference``) and the training step that honours any mix
of switches, by plain autograd (the EDR term by double backward, as the reference computes
it). `trainables/croft.py` is the method; docs/croft_reference.md is the table of the
differences with the reference's file and line for each.

The reference (github LinLLLL/CRoFT, ``CoOp/trainers/CRoFT.py``) computes one step as:

    x, t     = adapted image and text features, computed once (the graph is retained)
    repeat gen_step times:
        xc   = n(x @ G + x)
        Lgen = CE(s * xc @ t.T) + lambda1 * mean_{B x B}(same * xc @ x.T)
        zero every gradient, backward, step *every* optimiser (adapters and G)
    xc       = n(x @ G + x)                      G as it is now, x as computed above
    xa       = ri * xc + (1 - ri) * xc @ Wi       Wi as it is now, not normalised
    worst case (gen_step > 0, dataset name without "VLCS"):
        L1   = CE(s * xa @ t.T) - lambda1 * mean_{B x B}(same * xc @ n(f).T)
        rows = [n(f); xc]
    otherwise:
        L1   = CE(s * xc @ t.T);  rows = n(f)
    delta    = 1e-4 * ones(d, d), shared by both adapters
    E        = mean exp(n(adapt(rows, Wi + delta)) @ n(adapt(n(g), Wt + delta)).T)
               with adapt(r, W) = ri * r @ W + (1 - ri) * r   (W, not W.T as in the forward)
    Le       = sum((dE / d delta)^2)
    loss     = CE(s * x @ t.T) + L1 + lambda2 * Le; zero, backward, step every optimiser

The paper's form (`implementation: paper`, the method's hand-written objective) differs in each
switch below; ``implementation: custom`` takes every switch as given (paper values by default),
so an ablation grid can ask which difference moves the front.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from croft_search.errors import ConfigError
from trainables.base import HParam

if TYPE_CHECKING:
    from trainables.croft import CRoFT

# One optimiser step of the trial's main optimiser on a loss: zero the gradients, backward
# (keeping the graph, which later steps of the same batch reuse), step.
Update = Callable[[torch.Tensor], None]

IMPLEMENTATIONS = ("paper", "reference", "custom")


@dataclass(frozen=True)
class Switch:
    """One difference between the paper's equations and the reference code."""

    name: str
    paper: Any
    reference: Any
    help: str
    choices: tuple[Any, ...] | None = None

    def hparam(self) -> HParam:
        low, high = (0.0, 1.0) if isinstance(self.paper, float) else (None, None)
        return HParam(self.paper, low=low, high=high, choices=self.choices, help=self.help)


SWITCHES: tuple[Switch, ...] = (
    Switch(
        "lc_norm", "pairs", "all",
        "Lc's mean: over the same-class pairs (pairs) or all B x B entries, zeros included",
        ("pairs", "all"),
    ),
    Switch(
        "gen_moves_adapters", False, True,
        "the generator's inner steps also step the adapters (and prompts) on its loss",
    ),
    Switch(
        "gen_optimizer", "sgd", "main",
        "G's optimiser in the worst case: plain SGD at gen_lr, or the main one (momentum, "
        "weight decay, warm-up and cosine)",
        ("sgd", "main"),
    ),
    Switch(
        "gen_in_main_step", False, True,
        "G also takes the main step's gradient (the reference steps every optimiser on every "
        "loss); needs gen_optimizer=main",
    ),
    Switch(
        "worst_case_datasets", "all", "not_vlcs",
        "datasets the worst-case branch runs on; not_vlcs: off for names containing VLCS",
        ("all", "not_vlcs"),
    ),
    Switch(
        "lambda1_zero_disables_generator", True, False,
        "lambda1 = 0 removes the generator (paper) or keeps it with its CE terms (reference)",
    ),
    Switch(
        "joint_shift_term", "ce_lc", "ce",
        "the shift term where the worst case is off: CE(xc) + lambda1 * Lc, or CE(xc) alone",
        ("ce_lc", "ce"),
    ),
    Switch(
        "shift_readapt", False, True,
        "worst case: the adapters' CE on ri * xc + (1 - ri) * xc @ Wi (not normalised) "
        "instead of xc",
    ),
    Switch(
        "shift_partner", "adapted", "zero_shot",
        "worst case: the adapters' Lc pairs xc with the adapted x or the zero-shot n(f)",
        ("adapted", "zero_shot"),
    ),
    Switch(
        "edr_delta", 0.0, 1e-4,
        "EDR's gradient taken at theta + delta (the reference's delta is 1e-4 * ones)",
    ),
    Switch(
        "edr_shared_delta", False, True,
        "one delta for both adapters: the penalty is |dE/dWi + dE/dWt|^2, cross term included",
    ),
    Switch(
        "edr_transpose", True, False,
        "EDR's adapters as in the forward, f @ W.T (true), or as the reference writes, f @ W",
    ),
    Switch(
        "edr_stack_shifted", False, True,
        "worst case: one EDR penalty on [x; xc] (energy over 2B x K) instead of Le(x) + Le(xc)",
    ),
    Switch(
        "edr_shifted_readapt", False, True,
        "the shifted rows of EDR: xc as a function of the adapters (false), or xc passed "
        "through the adapters again (true)",
    ),
)  # fmt: skip

SWITCH_NAMES = tuple(switch.name for switch in SWITCHES)


def preset(variant: str) -> dict[str, Any]:
    """The switches' values under ``variant`` ("paper" or "reference")."""
    return {switch.name: getattr(switch, variant) for switch in SWITCHES}


def resolve_variant(hp: dict[str, Any], given: set[str]) -> dict[str, Any]:
    """``hp`` with the variant's switches filled in. Under ``paper`` or ``reference`` a
    switch given with another value is an error; under ``custom`` every switch is as given."""
    variant = hp["implementation"]
    hp = dict(hp)
    if variant != "custom":
        for name, value in preset(variant).items():
            if name in given and hp[name] != value:
                raise ConfigError(
                    f"hyper-parameter {name}={hp[name]!r} contradicts implementation={variant}, "
                    f"which sets {name}={value!r}; use implementation=custom to mix switches"
                )
            hp[name] = value
    if hp["gen_in_main_step"] and hp["gen_optimizer"] != "main":
        raise ConfigError(
            "hyper-parameter gen_in_main_step=True needs gen_optimizer=main (G's own SGD "
            "takes no main-step gradient); allowed gen_optimizer values: sgd, main"
        )
    return hp


def is_paper(hp: Mapping[str, Any]) -> bool:
    """Whether every switch has the paper's value (the hand-written objective applies)."""
    return all(hp[switch.name] == switch.paper for switch in SWITCHES)


# -- the step, by autograd ----------------------------------------------------------------
def adapt_as(
    raw: torch.Tensor, weight: torch.Tensor, ratio: float, transpose: bool
) -> torch.Tensor:
    """``ratio * raw @ W' + (1 - ratio) * raw`` with W' = W.T (the forward) or W."""
    eye = torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device)
    moved = (weight - eye).T if transpose else weight - eye
    return raw + ratio * raw @ moved


def same_class_mean(
    shifted: torch.Tensor, partner: torch.Tensor, labels: torch.Tensor, norm: str
) -> torch.Tensor:
    """``Lc``: ``shifted_i . partner_j`` over the same-class pairs (i = j included), divided
    by their number (``pairs``) or by B * B (``all``, the reference's ``.mean()``)."""
    mask = (labels[:, None] == labels[None, :]).to(shifted.dtype)
    total = (shifted @ partner.T * mask).sum()
    return total / (mask.sum() if norm == "pairs" else mask.numel())


def edr_term(
    method: CRoFT,
    features: torch.Tensor,
    raw_text: torch.Tensor,
    shifted: torch.Tensor | None,
    generator: torch.Tensor | None,
) -> torch.Tensor:
    """``|| dE / d delta ||^2`` at ``theta + delta`` under the method's EDR switches;
    ``shifted`` (the worst case's xc) adds its rows, stacked or as a second penalty."""
    hp = method.hp
    value = hp["edr_delta"]
    trained = (method.image_adapter.requires_grad, method.text_adapter.requires_grad)
    if hp["edr_shared_delta"]:
        shared = torch.full_like(method.image_adapter, value, requires_grad=True)
        deltas, image_delta, text_delta = [shared], shared, shared
    else:
        image_delta, text_delta = (
            torch.full_like(method.image_adapter, value, requires_grad=True) if grad else None
            for grad in trained
        )
        deltas = [d for d in (image_delta, text_delta) if d is not None]
    pairs = ((method.image_adapter, image_delta), (method.text_adapter, text_delta))
    image_weight, text_weight = (w if delta is None else w + delta for w, delta in pairs)
    transpose = hp["edr_transpose"]

    def adapted(rows: torch.Tensor) -> torch.Tensor:
        return F.normalize(adapt_as(rows, image_weight, method.ratio_image, transpose), dim=-1)

    text = F.normalize(adapt_as(raw_text, text_weight, method.ratio_text, transpose), dim=-1)
    image = adapted(features)
    rows = [image]
    if shifted is not None:
        if hp["edr_shifted_readapt"]:
            rows.append(adapted(shifted))
        else:
            rows.append(F.normalize(image @ generator + image, dim=-1))
    if hp["edr_stack_shifted"]:
        rows = [torch.cat(rows)]
    penalty = features.new_zeros(())
    for block in rows:
        values = torch.exp(block @ text.T)
        energy = values.mean() if method.edr_energy == "mean" else values.sum()
        grads = torch.autograd.grad(energy, deltas, create_graph=True)
        squares = sum(g.pow(2).sum() for g in grads)
        if method.edr_reduction == "mean":
            squares = squares / sum(g.numel() for g in grads)
        penalty = penalty + squares
    return penalty


def _generator_loss(
    method: CRoFT, image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    shifted = F.normalize(image @ method.generator + image, dim=-1)
    loss = F.cross_entropy(method.logit_scale * shifted @ text.T, labels)
    if method.lambda1 > 0:
        lc = same_class_mean(shifted, image, labels, method.hp["lc_norm"])
        loss = loss + method.lambda1 * lc
    return loss


def _generator_steps(
    method: CRoFT,
    image: torch.Tensor,
    text: torch.Tensor,
    labels: torch.Tensor,
    update: Update | None,
) -> None:
    hp = method.hp
    moves_adapters = hp["gen_moves_adapters"]
    if update is None and (moves_adapters or hp["gen_optimizer"] == "main"):
        raise ConfigError(
            "gen_moves_adapters=True and gen_optimizer=main step the training loop's "
            "optimiser: pass training_loss its update"
        )
    if not moves_adapters:
        image, text = image.detach(), text.detach()
    for _ in range(method.gen_steps):
        loss = _generator_loss(method, image, text, labels)
        if hp["gen_optimizer"] == "main":
            update(loss)  # G is one of the main optimiser's parameters
            continue
        if moves_adapters:
            update(loss)
            grad, method.generator.grad = method.generator.grad, None
        else:
            (grad,) = torch.autograd.grad(loss, [method.generator])
        with torch.no_grad():
            method.generator.sub_(grad, alpha=hp["gen_lr"])


def training_loss(
    method: CRoFT,
    features: torch.Tensor,
    labels: torch.Tensor,
    update: Update | None = None,
    inner_steps: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CRoFT's loss for one batch under any mix of switches, after the generator's inner
    steps when ``inner_steps`` (through ``update``, the loop's optimiser step, where they
    step the main optimiser)."""
    hp = method.hp
    scale = method.logit_scale
    raw_text = method.raw_text()
    image = F.normalize(adapt_as(features, method.image_adapter, method.ratio_image, True), dim=-1)
    text = F.normalize(adapt_as(raw_text, method.text_adapter, method.ratio_text, True), dim=-1)
    ce = F.cross_entropy(scale * image @ text.T, labels)
    loss, terms = ce, {"ce": ce}
    shifted = generator = None
    if method.use_generator:
        if method.gen_steps > 0 and inner_steps:
            _generator_steps(method, image, text, labels, update)
        generator = method.generator if method.generator_in_main_step else method.generator.detach()
        shifted = F.normalize(image @ generator + image, dim=-1)
        if method.worst_case:
            target = shifted
            if hp["shift_readapt"]:
                ratio = method.ratio_image
                target = ratio * shifted + (1 - ratio) * shifted @ method.image_adapter
            partner = F.normalize(features, dim=-1) if hp["shift_partner"] == "zero_shot" else image
            lc = same_class_mean(shifted, partner, labels, hp["lc_norm"])
            shift = F.cross_entropy(scale * target @ text.T, labels) - method.lambda1 * lc
        else:
            shift = F.cross_entropy(scale * shifted @ text.T, labels)
            if hp["joint_shift_term"] == "ce_lc" and method.lambda1 > 0:
                lc = same_class_mean(shifted, image, labels, hp["lc_norm"])
                shift = shift + method.lambda1 * lc
        loss = loss + shift
        terms["shift"] = shift
    if method.lambda2 > 0 and method.adapter_parameters():
        rows = shifted if method.edr_on_shifted else None
        edr = method.lambda2 * edr_term(method, features, raw_text, rows, generator)
        loss = loss + edr
        terms["edr"] = edr
    return loss, terms
