"""CRoFT (Zhu et al., ICML 2024): identity-initialised image and text adapters trained with
cross-entropy, a worst-case covariate-shift feature generator, and the energy distribution
reshaping (EDR) loss, the squared gradient of the un-logged energy with respect to the
adapters (see shared/docs/METHODS.md, "CRoFT"). Written from the paper's equations.

    x  = n(f + ri * (f @ Wi.T - f))          adapted image feature (= ri*f@Wi.T + (1-ri)*f)
    t  = n(g + rt * (g @ Wt.T - g))          adapted text feature, g fixed or CoOp prompts
    L  = s * x @ t.T                         logits
    xc = n(x @ G + x)                        shifted feature from the generator G
    Lc = mean_{y_i == y_j} xc_i . x_j        similarity of shifted and same-class ID features
    E  = sum_{b,k} exp(x_b . t_k)            un-logged energy, unit-norm, no temperature
                                             (edr_energy="mean": mean over b and k)
    Le = || dE / d(Wi, Wt) ||^2              EDR, differentiable (double backward); squares
                                             summed (edr_reduction="sum") or averaged
    loss = CE(L, y) + shift term + lambda2 * (Le(x) + Le(xc))

Training never builds an autograd graph for this: `trainables/croft_objective.py` computes
the loss and its three terms as one autograd node whose backward applies the chain rule by
hand, the EDR term included (its forward writes dE/dtheta out and takes its squared norm
in Gram form, B x B products instead of d x d ones; its backward differentiates that chain
again). In value and gradient this is what autograd and the paper's double backward
``autograd.grad(E, theta, create_graph=True)`` give (`edr_penalty`); the tests hold the two
together in every branch. The generator's inner steps use their gradient in closed form
too. bench/trial_speed.py times the effect. A population of members
(`croft_search.trial.population`) runs this objective on its members' stacks
(`_population_loss`), each member's weights and ratios as tensors.

Switches, all plain hyper-parameters so a search grid can express the paper's ablations:
- lambda1 = 0 turns the generator off entirely (no parameter, no loss, no inner steps).
- lambda1 > 0, gen_steps > 0: worst-case branch. Before every main step G takes
  ``gen_steps`` plain SGD steps (lr ``gen_lr``, apart from the main optimiser) on
  CE(s*xc@t.T) + lambda1*Lc with the adapters frozen; the adapters then see
  CE(s*xc@t.T) - lambda1*Lc with G frozen, i.e. they learn to keep shifted features close
  to their class.
- lambda1 > 0, gen_steps = 0: G is one of the main parameters and everything minimises
  CE(s*xc@t.T) + lambda1*Lc together.
- lambda2 = 0 skips the EDR double backward; edr_on_shifted adds Le on the shifted features
  (in the worst-case branch only, as the reference does).
- ratio_image = 0 or ratio_text = 0: that adapter has no effect, so it is a frozen buffer.
- implementation: "paper" (these equations, the hand-written objective), "reference" (what the
  authors' code computes, `trainables.croft_variants`, by plain autograd) or "custom" (each
  switch of `croft_variants.SWITCHES` as given); docs/croft_reference.md lists them.
- edr_energy: with the energy summed over the batch, Le grows with (batch * classes)^2 and
  at lambda2 >= 1 it outweighs the cross-entropy until the features collapse; the mean
  keeps Le independent of batch size and class count, and is what the reference computes
  (the mean of E(theta + delta) - E(theta) over the batch-by-class matrix): the default.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainables import croft_variants
from trainables.base import DASSL_RECIPE, HParam, MemberStep, Method, MethodContext
from trainables.croft_objective import (
    AdapterPass,
    Batch,
    CRoFTObjective,
    EDRSpec,
    ObjectiveSettings,
    Unit,
    adapt,
    adapt_product,
    objective_gradients,
    stepped_generator,
    unit,
)
from trainables.registry import register_method
from trainables.text import PromptLearner


def energy(image: torch.Tensor, text: torch.Tensor, aggregate: str = "sum") -> torch.Tensor:
    """Un-logged energy ``exp(x . t)`` of unit-norm features, summed (or averaged, with
    ``aggregate="mean"``) over batch and classes."""
    values = torch.exp(image @ text.T)
    return values.mean() if aggregate == "mean" else values.sum()


def edr_penalty(
    energy_value: torch.Tensor,
    theta: Sequence[torch.Tensor],
    reduction: str = "sum",
    create_graph: bool = True,
) -> torch.Tensor:
    """``|| dE / dtheta ||^2``: squares of the gradient summed (setup II) or averaged over
    every entry of ``theta`` (setup I), by autograd (training uses the closed form in
    `trainables.croft_objective`, which the tests hold to this).

    The reference perturbs the adapter matrices by an additive ``delta`` (requires grad) and
    differentiates ``E(theta + delta) - E(theta)`` with respect to ``delta``. By the chain
    rule d/d(delta) E(theta + delta) = E'(theta + delta) * d(theta + delta)/d(delta) =
    E'(theta + delta), and ``E(theta)`` does not depend on delta, so at delta = 0 this is
    exactly dE/dtheta, which autograd gives directly on the matrices; the same holds for
    the second derivatives the double backward takes. (The reference's delta of 1e-4
    evaluates the gradient 1e-4 away from theta, a difference of order 1e-4 * Hessian.)
    ``create_graph=True`` keeps the gradient differentiable, so training reduces it."""
    grads = torch.autograd.grad(energy_value, list(theta), create_graph=create_graph)
    total = sum(g.pow(2).sum() for g in grads)
    if reduction == "mean":
        total = total / sum(g.numel() for g in grads)
    return total


@register_method
class CRoFT(Method):
    name = "croft"
    default_score = "energy"
    # The reference trainer (implementation), scripts/CRoFT/croft_pacs_vit.sh (ratios 0.2 and
    # 0.5, lambda1 15, one generator step) and train.py's lambda2 default, 5.
    reference_recipe = {
        **DASSL_RECIPE, "implementation": "reference", "ratio_image": 0.2, "ratio_text": 0.5,
        "lambda1": 15.0, "lambda2": 5.0, "gen_steps": 1,
    }  # fmt: skip
    hparams = {
        "ratio_image": HParam(0.2, low=0.0, high=1.0, help="image adapter residual ratio ri"),
        "ratio_text": HParam(0.5, low=0.0, high=1.0, help="text adapter residual ratio rt"),
        "test_ratio_image": HParam(
            -1.0,
            low=-1.0,
            high=1.0,
            help="ri in every evaluation (validation too); -1 = as trained; the reference's "
            "open-set test scripts reload the model with 0.5",
        ),
        "test_ratio_text": HParam(
            -1.0,
            low=-1.0,
            high=1.0,
            help="rt in every evaluation (validation too); -1 = as trained; the reference's "
            "open-set test scripts reload the model with 0.0",
        ),
        "n_ctx": HParam(0, low=0, high=16, help="learnable context length; 0 = fixed template"),
        "ctx_init": HParam("", help="words initialising the context (n_ctx tokens), or ''"),
        "lambda1": HParam(5.0, low=0.0, high=100.0, help="weight of Lc; 0 = no generator"),
        "lambda2": HParam(1.0, low=0.0, high=1e4, help="weight of the EDR loss; 0 = no EDR"),
        "gen_steps": HParam(1, low=0, high=20, help="generator steps per batch; 0 = joint"),
        "gen_lr": HParam(0.002, low=0.0, high=1.0, help="generator SGD learning rate"),
        "edr_reduction": HParam("sum", choices=("sum", "mean"), help="sum: setup II, mean: I"),
        "edr_on_shifted": HParam(
            True, help="also apply EDR to the shifted features (worst-case branch only)"
        ),
        # METHODS.md defines E as a sum over batch and classes but quotes the reference as
        # differentiating mean(E(theta + delta) - E(theta)); the two differ by (B*K)^2 in Le.
        # "mean" by default: the reference differentiates mean(E(theta+delta) - E(theta)).
        "edr_energy": HParam("mean", choices=("sum", "mean"), help="E over batch and classes"),
        "implementation": HParam(
            "paper",
            choices=croft_variants.IMPLEMENTATIONS,
            help="paper: the equations; reference: the authors' code; custom: switches as given",
        ),
        **{switch.name: switch.hparam() for switch in croft_variants.SWITCHES},
    }

    @classmethod
    def resolve(cls, hp: dict[str, Any], given: set[str]) -> dict[str, Any]:
        return croft_variants.resolve_variant(hp, given)

    @classmethod
    def batchable(cls, hp: dict[str, Any]) -> bool:
        # The authors' implementation steps optimisers inside the loss; the paper's batches
        # through population_loss.
        return croft_variants.is_paper(hp)

    @classmethod
    def member_values(cls, hp: dict[str, Any]) -> dict[str, float]:
        keys = ("lambda1", "lambda2", "ratio_image", "ratio_text", "gen_lr")
        return {key: float(hp[key]) for key in keys}

    def population_row_spaces(self) -> dict[str, torch.Tensor]:
        # With the template's text features (no prompts) the text adapter acts on those
        # alone: the loss reads g Wt^T, and Wt's gradient rt dv^T g lies in g's row space.
        classes, dim = self.class_text.shape
        if self.prompt_learner is None and self.trained_adapters[1] and classes < dim:
            return {"text_adapter": self.class_text}
        return {}

    def population_broadcasts(self) -> bool:
        # The objective is written for leading member dimensions, and so is a prompt
        # learner's pass where the classes share its start; other prompt layouts run under
        # vmap.
        return self.prompt_learner is None or self.prompt_learner.shares_start

    @classmethod
    def structure(cls, hp: dict[str, Any]) -> tuple:
        # Which terms and parameters exist: a zero weight or ratio removes one.
        return tuple(hp[key] > 0 for key in ("lambda1", "lambda2", "ratio_image", "ratio_text"))

    def __init__(self, context: MethodContext, hp: dict[str, Any]) -> None:
        super().__init__(context, hp)
        dim = context.embed_dim
        self.ratio_image = hp["ratio_image"]
        self.ratio_text = hp["ratio_text"]
        self.lambda1 = hp["lambda1"]
        self.lambda2 = hp["lambda2"]
        self.gen_steps = hp["gen_steps"]
        self.edr_reduction = hp["edr_reduction"]
        self.edr_energy = hp["edr_energy"]
        self.hand_written = croft_variants.is_paper(hp)
        self.use_generator = self.lambda1 > 0 or not hp["lambda1_zero_disables_generator"]
        skip_dataset = hp["worst_case_datasets"] == "not_vlcs" and "vlcs" in context.dataset.lower()
        self.worst_case = self.use_generator and self.gen_steps > 0 and not skip_dataset
        # G takes the main step's gradient when it trains jointly (no inner steps) or, in
        # the reference, because every optimiser steps on every loss.
        self.generator_in_main_step = self.use_generator and (
            self.gen_steps == 0 or hp["gen_in_main_step"]
        )
        self.generator_in_main_optimizer = self.generator_in_main_step or (
            self.use_generator and hp["gen_optimizer"] == "main"
        )
        # Off the paper's path the generator's inner steps and the main step may each leave
        # some parameters without a gradient.
        self.partial_steps = not self.hand_written and self.use_generator and self.gen_steps > 0
        # Shifted features join the EDR only in the worst-case branch, as in the reference
        # (METHODS.md: Le(zI) + Le(zI^c) there; joint training penalises ID features only).
        self.edr_on_shifted = self.worst_case and hp["edr_on_shifted"]

        eye = torch.eye(dim, device=context.device)
        # An adapter whose ratio is 0 cannot change the output: a buffer, so it never trains.
        # Kept as flags too: inside a population's vmap a tensor does not say whether it
        # requires grad.
        self.trained_adapters = (self.ratio_image > 0, self.ratio_text > 0)
        self._adapter("image_adapter", eye, trains=self.trained_adapters[0])
        self._adapter("text_adapter", eye, trains=self.trained_adapters[1])
        self.generator = nn.Parameter(eye.clone()) if self.use_generator else None

        self.prompt_learner: PromptLearner | None = None
        if hp["n_ctx"] > 0:
            self.prompt_learner = PromptLearner.from_hparams(context, hp)
        self.register_buffer("class_text", context.class_text.detach().clone(), persistent=False)

    def _adapter(self, name: str, init: torch.Tensor, trains: bool) -> None:
        if trains:
            self.register_parameter(name, nn.Parameter(init.clone()))
        else:
            self.register_buffer(name, init.clone())

    # -- features -----------------------------------------------------------------------
    def adapter_parameters(self) -> list[torch.Tensor]:
        """The trained adapter matrices, the ``theta`` of the EDR loss."""
        return [w for w in (self.image_adapter, self.text_adapter) if w.requires_grad]

    def raw_text(self) -> torch.Tensor:
        """Text features before the adapter: the template's, or the learned prompts'."""
        return self.class_text if self.prompt_learner is None else self.prompt_learner()

    def image_features(self, features: torch.Tensor) -> torch.Tensor:
        return self._image_unit(features).value

    def text_features(self) -> torch.Tensor:
        return self._text_unit(self.raw_text()).value

    def adapter_pass(
        self,
        features: torch.Tensor,
        raw_text: torch.Tensor,
        ratios: tuple | None = None,
        text_product: torch.Tensor | None = None,
    ) -> AdapterPass:
        """Both adapters on ``features`` and ``raw_text``, with ``ratios`` (a population
        member's 0-dim tensors) or the method's own; ``text_product``, where given, is
        ``raw_text @ Wt.T`` (a population's text adapter in its row-space form)."""
        ratio_image, ratio_text = ratios or (None, None)
        image = self._image_unit(features, ratio_image)
        text = self._text_unit(raw_text, ratio_text, text_product)
        return AdapterPass(features, raw_text, image, text)

    def _image_unit(self, features: torch.Tensor, ratio: Any = None) -> Unit:
        if ratio is None:
            ratio = self._ratio(self.ratio_image, "test_ratio_image")
        return unit(adapt(features, self.image_adapter, ratio))

    def _text_unit(
        self, raw_text: torch.Tensor, ratio: Any = None, product: torch.Tensor | None = None
    ) -> Unit:
        if ratio is None:
            ratio = self._ratio(self.ratio_text, "test_ratio_text")
        if product is None:
            product = raw_text @ self.text_adapter.mT
        return unit(adapt_product(raw_text, product, ratio))

    def _ratio(self, trained: float, test_key: str) -> float:
        if self.training or self.hp[test_key] < 0:
            return trained
        return self.hp[test_key]

    def logits(self, features: torch.Tensor, domains: torch.Tensor | None = None) -> torch.Tensor:
        return self.logit_scale * self.image_features(features) @ self.text_features().T

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        return self.image_features(features)

    # -- training -------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        # In the paper's worst-case branch the generator takes its own steps.
        return [
            p
            for p in self.parameters()
            if p.requires_grad and (p is not self.generator or self.generator_in_main_optimizer)
        ]

    def objective_settings(self, numbers: dict[str, Any] | None = None) -> ObjectiveSettings:
        """The objective's settings; ``numbers`` (`member_values`' keys) as Python floats
        from the hyper-parameters by default, or a population member's 0-dim tensors."""
        if numbers is None:
            numbers = type(self).member_values(self.hp)
        ratios = (numbers["ratio_image"], numbers["ratio_text"])
        edr = None
        if self.lambda2 > 0 and any(self.trained_adapters):
            edr = EDRSpec(
                ratios,
                self.trained_adapters,
                self.edr_energy,
                self.edr_reduction,
            )
        return ObjectiveSettings(
            logit_scale=self.logit_scale,
            ratios=ratios,
            lambda1=numbers["lambda1"],
            shift_sign=-1.0 if self.worst_case else 1.0,
            lambda2=numbers["lambda2"],
            edr=edr,
            edr_on_shifted=self.edr_on_shifted,
        )

    def _objective_inputs(
        self,
        passed: AdapterPass,
        labels: torch.Tensor,
        numbers: dict[str, Any],
        step_generator_first: bool,
        in_place: bool = False,
    ) -> tuple[Batch, ObjectiveSettings, torch.Tensor | None, torch.Tensor | None]:
        """The objective's batch, settings, generator and, where the generator stepped,
        x G + x under the stepped G, for one adapter pass; with ``step_generator_first``
        (training) G has taken its inner steps (in its own tensor with ``in_place``), on
        the same adapter outputs, which its steps do not change. Worst case: the adapters
        play against a fixed G; joint: G trains with them."""
        moved_raw = None
        with torch.no_grad():
            batch = Batch.of(passed.image.value, labels, passed.raw_text.shape[-2])
            settings = self.objective_settings(numbers)
            generator = self.generator if self.use_generator else None
            if self.worst_case:
                generator = generator.detach()
                if step_generator_first:
                    generator, moved_raw = stepped_generator(
                        generator, passed.image.value, passed.text.value, batch, settings,
                        self.gen_steps, numbers["gen_lr"], in_place,
                    )  # fmt: skip
        return batch, settings, generator, moved_raw

    def _losses(
        self, features: torch.Tensor, labels: torch.Tensor, step_generator_first: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, {"ce", "shift", "edr"} of this branch) from one pass over the adapters,
        so the text side (the text encoder when n_ctx > 0) runs once per step."""
        raw_text = self.raw_text()  # a graph into the prompt learner when n_ctx > 0
        with torch.no_grad():
            passed = self.adapter_pass(features, raw_text.detach())
        numbers = type(self).member_values(self.hp)
        batch, settings, generator, moved_raw = self._objective_inputs(
            passed, labels, numbers, step_generator_first
        )
        if step_generator_first and self.worst_case:
            with torch.no_grad():
                self.generator.copy_(generator)
        loss, ce, shift, edr = CRoFTObjective.apply(
            self.image_adapter, self.text_adapter, generator, raw_text, passed, batch, settings,
            moved_raw,
        )  # fmt: skip
        return loss, self._terms(ce, shift, edr, settings)

    def _terms(self, ce: torch.Tensor, shift: torch.Tensor, edr: torch.Tensor,
               settings: ObjectiveSettings) -> dict[str, torch.Tensor]:  # fmt: skip
        terms = {"ce": ce}
        if self.use_generator:
            terms["shift"] = shift
        if settings.edr is not None:
            terms["edr"] = edr
        return terms

    def population_loss(self, values, features, labels, domains):  # noqa: ANN001, ANN201
        return _population_loss(self, values, features, labels)

    def extra_losses(
        self, features: torch.Tensor, labels: torch.Tensor, domains: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        if self.hand_written:
            terms = self._losses(features, labels, step_generator_first=False)[1]
        else:
            terms = croft_variants.training_loss(self, features, labels, inner_steps=False)[1]
        del terms["ce"]
        return terms

    def training_loss(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        domains: torch.Tensor,
        update: croft_variants.Update | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        # CE(logits) + sum(extra_losses) as in the base class, as one node, after the
        # generator's inner steps in the worst-case branch.
        if self.hand_written:
            loss, terms = self._losses(features, labels, step_generator_first=True)
        else:
            loss, terms = croft_variants.training_loss(self, features, labels, update)
        return loss, {key: float(value.detach()) for key, value in terms.items()}


def _population_loss(
    method: CRoFT,
    values: dict[str, torch.Tensor],
    features: torch.Tensor,
    labels: torch.Tensor,
) -> MemberStep:
    """A population's step by the hand-written objective, on the members' stacks (or one
    member's, under vmap): its weights and ratios are the members' tensors and the
    gradients of the adapters (and of a jointly trained G) come from `objective_gradients`
    outright, as the step's ``gradients``, so autograd never sees them. With learned
    prompts the loss carries dL/dg of their text features g to autograd as ``<g, dL/dg>``
    (per member) with dL/dg fixed, which autograd takes on through the text encoder."""
    raw_text = method.raw_text()
    fixed_text = raw_text.detach()
    # The text adapter as g Wt^T, where the population keeps it in g's row space.
    text_product = values.get("text_adapter")
    with torch.no_grad():
        passed = method.adapter_pass(
            features, fixed_text, (values["ratio_image"], values["ratio_text"]), text_product
        )
    # The population's own stack of G steps in place, unless vmap maps over it.
    in_place = method.population_broadcasts()
    batch, settings, generator, moved_raw = method._objective_inputs(
        passed, labels, values, True, in_place
    )
    joint = method.use_generator and not method.worst_case
    prompts = method.prompt_learner is not None
    needs = (*method.trained_adapters, joint, prompts)
    with torch.no_grad():
        (loss, ce, shift, edr), grads = objective_gradients(
            generator, method.text_adapter, passed, batch, settings, needs, moved_raw,
            text_as_product=text_product is not None,
        )  # fmt: skip
    image_grad, text_grad, generator_grad, raw_text_grad = grads
    named = zip(("image_adapter", "text_adapter", "generator"),
                (image_grad, text_grad, generator_grad), needs, strict=False)  # fmt: skip
    gradients = {name: grad for name, grad, need in named if need}
    if prompts:
        # dL/dg goes on through the text encoder by autograd: <g, dL/dg> with dL/dg fixed.
        pulled = (raw_text * raw_text_grad).sum((-2, -1))  # per member
        loss = loss + (pulled - pulled.detach())
    updates = {"generator": generator} if method.worst_case else {}
    return MemberStep(loss, method._terms(ce, shift, edr, settings), updates, gradients)


def energy_gradient_norm(
    method: CRoFT,
    features: torch.Tensor,
    reduction: str = "sum",
    aggregate: str | None = None,
) -> float:
    """``|| dE / dtheta ||^2`` on ``features`` (raw image features [N, d], one energy over
    all of them, aggregated as the method's ``edr_energy`` unless ``aggregate`` says) for the
    method's current adapters, theta being the adapters it trains (as in its EDR loss); the
    prompts stay fixed. 0.0 when no adapter trains."""
    aggregate = aggregate or method.edr_energy
    trained = [w.requires_grad for w in (method.image_adapter, method.text_adapter)]
    if not any(trained):
        return 0.0
    with torch.enable_grad():
        image_adapter, text_adapter = (
            w.detach().clone().requires_grad_(grad)
            for w, grad in zip((method.image_adapter, method.text_adapter), trained, strict=True)
        )
        with torch.no_grad():
            raw_text = method.raw_text()
        image = F.normalize(adapt(features, image_adapter, method.ratio_image), dim=-1)
        text = F.normalize(adapt(raw_text, text_adapter, method.ratio_text), dim=-1)
        theta = [w for w in (image_adapter, text_adapter) if w.requires_grad]
        value = edr_penalty(energy(image, text, aggregate), theta, reduction, create_graph=False)
    return float(value)
