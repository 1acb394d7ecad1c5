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

Training never builds the energy's backward graph to differentiate it again: the EDR term
is one autograd node (`edr_closed_form`) whose forward writes dE/dtheta out by the chain rule
and takes its squared norm in Gram form (B x B products, not d x d ones), and whose backward
is that chain differentiated by hand; in value and gradient it is what the paper's double
backward ``autograd.grad(E, theta, create_graph=True)`` gives (`edr_penalty`, which the
tests hold it to). The logits and the energy share one x @ t.T, and the generator's inner
step uses its gradient in closed form. bench/trial_speed.py times the effect.

Switches, all plain hyper-parameters so a search grid can express the paper's ablations:
- lambda1 = 0 turns the generator off entirely (no parameter, no loss, no inner steps).
- lambda1 > 0, gen_steps > 0: worst-case branch. Before every main step G takes
  ``gen_steps`` SGD steps (its own optimiser, lr ``gen_lr``) on CE(s*xc@t.T) + lambda1*Lc with
  the adapters frozen; the adapters then see CE(s*xc@t.T) - lambda1*Lc with G frozen, i.e.
  they learn to keep shifted features close to their class.
- lambda1 > 0, gen_steps = 0: G is one of the main parameters and everything minimises
  CE(s*xc@t.T) + lambda1*Lc together.
- lambda2 = 0 skips the EDR double backward; edr_on_shifted adds Le on the shifted features
  (in the worst-case branch only, as the reference does).
- ratio_image = 0 or ratio_text = 0: that adapter has no effect, so it is a frozen buffer.
- edr_energy: with the energy summed over the batch, Le grows with (batch * classes)^2 and
  at lambda2 >= 1 it outweighs the cross-entropy until the features collapse; the mean
  keeps Le independent of batch size and class count, and is what the reference computes
  (the mean of E(theta + delta) - E(theta) over the batch-by-class matrix): the default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainables.base import HParam, Method, MethodContext
from trainables.loop import fusable
from trainables.registry import register_method
from trainables.text import PromptLearner


def adapt(raw: torch.Tensor, weight: torch.Tensor, ratio: float) -> torch.Tensor:
    """Residual adapter ``ratio * raw @ weight.T + (1 - ratio) * raw`` (not normalised).

    Written as ``raw + ratio * (raw @ weight.T - raw)``, the same function, because then an
    identity ``weight`` returns ``raw`` bit for bit (the difference is exactly zero), so the
    untrained method reproduces zero-shot CLIP exactly rather than to rounding."""
    return raw + ratio * (raw @ weight.T - raw)


# F.normalize's floor on the norm, so unit() and F.normalize agree bit for bit.
NORM_EPS = 1e-12


@dataclass(frozen=True)
class Unit:
    """Row-normalised ``value = raw / |raw|``, keeping the norms so a gradient with respect
    to ``value`` can be pulled back to ``raw`` in closed form."""

    value: torch.Tensor
    norm: torch.Tensor  # [N, 1]

    def pullback(self, grad: torch.Tensor) -> torch.Tensor:
        """dL/d(raw) from dL/d(value): ``(g - u (u . g)) / |raw|`` row by row."""
        return (grad - self.value * (self.value * grad).sum(-1, keepdim=True)) / self.norm


def unit(raw: torch.Tensor) -> Unit:
    norm = raw.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    return Unit(raw / norm, norm)


def shift(image: torch.Tensor, generator: torch.Tensor) -> Unit:
    """The generator's covariate-shifted feature ``n(x @ G + x)`` of normalised ``x``."""
    return unit(image @ generator + image)


def energy(image: torch.Tensor, text: torch.Tensor, aggregate: str = "sum") -> torch.Tensor:
    """Un-logged energy ``exp(x . t)`` of unit-norm features, summed (or averaged, with
    ``aggregate="mean"``) over batch and classes."""
    values = torch.exp(image @ text.T)
    return values.mean() if aggregate == "mean" else values.sum()


def same_class_similarity(
    shifted: torch.Tensor, image: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """``Lc``: mean of ``xc_i . x_j`` over the pairs (i, j) with ``y_i == y_j`` (i = j
    included, so a batch always has pairs)."""
    same = (labels[:, None] == labels[None, :]).to(shifted.dtype)
    return (shifted @ image.T * same).sum() / same.sum()


def edr_penalty(
    energy_value: torch.Tensor,
    theta: Sequence[torch.Tensor],
    reduction: str = "sum",
    create_graph: bool = True,
) -> torch.Tensor:
    """``|| dE / dtheta ||^2``: squares of the gradient summed (setup II) or averaged over
    every entry of ``theta`` (setup I).

    The reference perturbs the adapter matrices by an additive ``delta`` (requires grad) and
    differentiates ``E(theta + delta) - E(theta)`` with respect to ``delta``. By the chain
    rule d/d(delta) E(theta + delta) = E'(theta + delta) * d(theta + delta)/d(delta) =
    E'(theta + delta), and ``E(theta)`` does not depend on delta, so at delta = 0 this is
    exactly dE/dtheta, which autograd gives directly on the matrices; the same holds for
    the second derivatives the double backward takes. (The reference's delta of 1e-4
    evaluates the gradient 1e-4 away from theta, a difference of order 1e-4 * Hessian.)
    ``create_graph=True`` keeps the gradient differentiable, so training reduces it."""
    grads = torch.autograd.grad(energy_value, list(theta), create_graph=create_graph)
    return _squared_norm(grads, reduction)


def _squared_norm(grads: Sequence[torch.Tensor], reduction: str) -> torch.Tensor:
    total = sum(g.pow(2).sum() for g in grads)
    if reduction == "mean":
        total = total / sum(g.numel() for g in grads)
    return total


def generator_gradient(
    image: torch.Tensor,
    text: torch.Tensor,
    generator: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: float,
    lambda1: float,
) -> torch.Tensor:
    """d/dG of the generator's loss CE(s * xc @ t.T, y) + lambda1 * Lc(xc, x, y), with
    xc = n(x @ G + x) and x, t fixed: dCE/dxc = s * (softmax - onehot) @ t / B and
    dLc/dxc = (same-class mask) @ x / (number of same-class pairs), pulled back through the
    normalisation, then dG = x^T dL/d(x @ G + x)."""
    moved = shift(image, generator)
    residual = torch.softmax(logit_scale * moved.value @ text.T, dim=-1)
    residual[torch.arange(len(labels)), labels] -= 1.0
    same = (labels[:, None] == labels[None, :]).to(image.dtype)
    grad_moved = logit_scale * residual @ text / len(labels) + lambda1 * (same @ image) / same.sum()
    return image.T @ moved.pullback(grad_moved)


@dataclass(frozen=True)
class AdapterPass:
    """One forward pass through both adapters, with what the closed-form energy gradient
    needs: the raw inputs of each adapter, the normalised outputs with their norms, and
    ``similarity = x @ t.T``, which the logits and the energy share."""

    features: torch.Tensor  # raw image features f
    raw_text: torch.Tensor  # template or prompt text features g
    image: Unit  # n(adapt(f, Wi, ri))
    text: Unit  # n(adapt(g, Wt, rt))
    similarity: torch.Tensor  # image.value @ text.value.T


@dataclass(frozen=True)
class ShiftedPass:
    """The generator's shifted features ``n(x @ G + x)``, the ``G`` they came from and their
    similarity to the text features (shared by the shifted logits and energy)."""

    moved: Unit
    generator: torch.Tensor
    similarity: torch.Tensor


@dataclass(frozen=True)
class EDRSpec:
    """What the EDR penalty differentiates and how it reduces: the adapter ratios, which
    adapters train, the energy's aggregate and the squares' reduction."""

    ratios: tuple[float, float]
    trained: tuple[bool, bool]
    aggregate: str = "sum"
    reduction: str = "sum"


def edr_closed_form(
    passed: AdapterPass, spec: EDRSpec, shifted: ShiftedPass | None = None
) -> torch.Tensor:
    """``|| dE / d(Wi, Wt) ||^2`` for the energy of the ID features plus, with ``shifted``,
    that of the shifted features: in value and gradient what ``edr_penalty`` computes by
    double backward (tests hold the two together), as one autograd node."""
    moved = (None, None, None, None) if shifted is None else (
        shifted.similarity, shifted.moved.value, shifted.moved.norm, shifted.generator
    )  # fmt: skip
    return _ClosedFormEDR.apply(
        passed.similarity,
        passed.image.value,
        passed.image.norm,
        passed.text.value,
        passed.text.norm,
        passed.raw_text,
        passed.features,
        *moved,
        spec,
    )


def _pull_back(
    grad: torch.Tensor,
    pulled: torch.Tensor,
    raw: torch.Tensor,
    unit_value: torch.Tensor,
    norm: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of ``pulled = (raw - w (w . raw)) / n`` (`Unit.pullback`) row by row: the
    gradients with respect to ``raw``, ``w`` and ``n`` from the gradient of ``pulled``."""
    scaled = grad / norm
    along = (unit_value * scaled).sum(-1, keepdim=True)
    grad_raw = scaled - unit_value * along
    grad_unit = -((unit_value * raw).sum(-1, keepdim=True) * scaled + along * raw)
    grad_norm = -(scaled * pulled).sum(-1, keepdim=True)
    return grad_raw, grad_unit, grad_norm


def _add(total: torch.Tensor | None, value: torch.Tensor | None) -> torch.Tensor | None:
    if value is None:
        return total
    return value if total is None else total + value


class _ClosedFormEDR(torch.autograd.Function):
    """The EDR penalty with its backward written out.

    Forward, per energy (ID: z = x, S = x t^T; shifted: z = xc, S = xc t^T), with
    P = exp(S) (divided by its size for the mean energy), unit(u) = x, unit(v) = t:
        dE/du = pull_x(P t)                      or, shifted,
                pull_x(a (G^T + I)), a = pull_xc(P t)
        dE/dv = pull_t(P^T z)
        dE/dWi = ri (dE/du)^T f, dE/dWt = rt (dE/dv)^T g
        Le = ri^2 <A A^T, f f^T> + rt^2 <B B^T, g g^T>   (A = dE/du, B = dE/dv)
    the Gram form of || dE/dWi ||^2 + || dE/dWt ||^2, B x B products instead of d x d ones.
    Backward runs the same chain in reverse by hand and hands autograd the gradients with
    respect to S, x, |u|, t, |v|, g (learned prompts) and, shifted, xc, |m| and G, so the
    products shared with the logits (S, x, t) are differentiated once."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        similarity: torch.Tensor,
        image: torch.Tensor,
        image_norm: torch.Tensor,
        text: torch.Tensor,
        text_norm: torch.Tensor,
        raw_text: torch.Tensor,
        features: torch.Tensor,
        moved_similarity: torch.Tensor | None,
        moved: torch.Tensor | None,
        moved_norm: torch.Tensor | None,
        generator: torch.Tensor | None,
        spec: EDRSpec,
    ) -> torch.Tensor:
        (ri, rt), (train_image, train_text) = spec.ratios, spec.trained
        image_unit, text_unit = Unit(image, image_norm), Unit(text, text_norm)
        grams = (
            features @ features.T if train_image else None,
            raw_text @ raw_text.T if train_text else None,
        )
        energies = [(similarity, image, None, None)]
        if moved is not None:
            energies.append((moved_similarity, moved, moved_norm, generator))
        saved, total = [], similarity.new_zeros(())
        for energy_similarity, z, z_norm, shift_matrix in energies:
            weights = torch.exp(energy_similarity)
            if spec.aggregate == "mean":
                weights = weights / weights.numel()
            toward_text, toward_image = weights @ text, weights.T @ z
            inner = None
            if shift_matrix is not None:
                inner = Unit(z, z_norm).pullback(toward_text)
                toward_text_at_x = inner @ shift_matrix.T + inner
            else:
                toward_text_at_x = toward_text
            grad_u = image_unit.pullback(toward_text_at_x) if train_image else None
            grad_v = text_unit.pullback(toward_image) if train_text else None
            if grad_u is not None:
                total = total + ri**2 * ((grad_u @ grad_u.T) * grams[0]).sum()
            if grad_v is not None:
                total = total + rt**2 * ((grad_v @ grad_v.T) * grams[1]).sum()
            saved.append(
                (z, z_norm, shift_matrix, weights, toward_text, toward_image, inner)
                + (toward_text_at_x, grad_u, grad_v)
            )
        scale = 1.0
        if spec.reduction == "mean":
            scale = 1.0 / (image.shape[-1] ** 2 * sum(spec.trained))
        ctx.spec, ctx.scale, ctx.grams, ctx.saved = spec, scale, grams, saved
        # The shifted inputs ride in ctx.saved with their energy; saving them here as well
        # lets autograd catch an in-place change to G before the backward.
        ctx.save_for_backward(
            image, image_norm, text, text_norm, raw_text, moved, moved_norm, generator
        )
        return total * scale

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        image, image_norm, text, text_norm, raw_text, *_ = ctx.saved_tensors
        spec: EDRSpec = ctx.spec
        (ri, rt) = spec.ratios
        weight = grad_output * ctx.scale
        feature_gram, text_gram = ctx.grams
        grad_image = grad_image_norm = grad_text = grad_text_norm = grad_raw_text = None
        grad_moved = grad_moved_norm = grad_generator = None
        grad_similarities: list[torch.Tensor] = []
        for saved in ctx.saved:
            z, z_norm, shift_matrix, weights, toward_text, toward_image, inner = saved[:7]
            toward_text_at_x, grad_u, grad_v = saved[7:]
            grad_weights = None
            grad_z = None
            if grad_u is not None:
                upstream = (2 * ri**2) * weight * (feature_gram @ grad_u)
                grad_at_x, grad_x, grad_xn = _pull_back(
                    upstream, grad_u, toward_text_at_x, image, image_norm
                )
                grad_image = _add(grad_image, grad_x)
                grad_image_norm = _add(grad_image_norm, grad_xn)
                if shift_matrix is not None:
                    if ctx.needs_input_grad[10]:
                        grad_generator = _add(grad_generator, grad_at_x.T @ inner)
                    grad_inner = grad_at_x @ shift_matrix + grad_at_x
                    grad_at_x, grad_zz, grad_zn = _pull_back(
                        grad_inner, inner, toward_text, z, z_norm
                    )
                    grad_z = _add(grad_z, grad_zz)
                    grad_moved_norm = _add(grad_moved_norm, grad_zn)
                grad_weights = grad_at_x @ text.T
                grad_text = _add(grad_text, weights.T @ grad_at_x)
            if grad_v is not None:
                upstream = (2 * rt**2) * weight * (text_gram @ grad_v)
                if ctx.needs_input_grad[5]:
                    grad_raw_text = _add(
                        grad_raw_text, (2 * rt**2) * weight * ((grad_v @ grad_v.T) @ raw_text)
                    )
                grad_at_t, grad_t, grad_tn = _pull_back(
                    upstream, grad_v, toward_image, text, text_norm
                )
                grad_text = _add(grad_text, grad_t)
                grad_text_norm = _add(grad_text_norm, grad_tn)
                grad_weights = _add(grad_weights, z @ grad_at_t.T)
                grad_z = _add(grad_z, weights @ grad_at_t)
            grad_similarities.append(grad_weights * weights)
            if shift_matrix is None:
                grad_image = _add(grad_image, grad_z)
            else:
                grad_moved = _add(grad_moved, grad_z)
        grad_moved_similarity = grad_similarities[1] if len(grad_similarities) > 1 else None
        return (
            grad_similarities[0],
            grad_image,
            grad_image_norm,
            grad_text,
            grad_text_norm,
            grad_raw_text,
            None,
            grad_moved_similarity,
            grad_moved,
            grad_moved_norm,
            grad_generator,
            None,
        )


@register_method
class CRoFT(Method):
    name = "croft"
    default_score = "energy"
    hparams = {
        # The reference's training recipe (CoOp/Dassl): SGD, cosine, 1 warm-up epoch.
        "lr": HParam(0.002, low=0.0, high=10.0, help="peak learning rate"),
        "optimizer": HParam("sgd", choices=("sgd", "adamw")),
        "batch_size": HParam(32, low=1, high=65_536),
        "epochs": HParam(30, low=0, high=10_000),
        "warmup_epochs": HParam(1, low=0, high=1000),
        "warmup_lr": HParam(1e-5, low=0.0, high=10.0),
        "shots": HParam(16, low=0, high=100_000),
        "ratio_image": HParam(0.2, low=0.0, high=1.0, help="image adapter residual ratio ri"),
        "ratio_text": HParam(0.5, low=0.0, high=1.0, help="text adapter residual ratio rt"),
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
    }

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
        self.use_generator = self.lambda1 > 0
        self.worst_case = self.use_generator and self.gen_steps > 0
        # Shifted features join the EDR only in the worst-case branch, as in the reference
        # (METHODS.md: Le(zI) + Le(zI^c) there; joint training penalises ID features only).
        self.edr_on_shifted = self.worst_case and hp["edr_on_shifted"]

        eye = torch.eye(dim, device=context.device)
        # An adapter whose ratio is 0 cannot change the output: a buffer, so it never trains.
        self._adapter("image_adapter", eye, trains=self.ratio_image > 0)
        self._adapter("text_adapter", eye, trains=self.ratio_text > 0)
        self.generator = nn.Parameter(eye.clone()) if self.use_generator else None
        self._generator_optimizer: torch.optim.Optimizer | None = None

        self.prompt_learner: PromptLearner | None = None
        if hp["n_ctx"] > 0:
            self.prompt_learner = PromptLearner(
                context.text_encoder,
                context.classnames,
                hp["n_ctx"],
                init_words=hp["ctx_init"],
                seed=hp["seed"],
            )
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

    def adapter_pass(self, features: torch.Tensor) -> AdapterPass:
        raw_text = self.raw_text()
        image, text = self._image_unit(features), self._text_unit(raw_text)
        return AdapterPass(features, raw_text, image, text, image.value @ text.value.T)

    def _image_unit(self, features: torch.Tensor) -> Unit:
        return unit(adapt(features, self.image_adapter, self.ratio_image))

    def _text_unit(self, raw_text: torch.Tensor) -> Unit:
        return unit(adapt(raw_text, self.text_adapter, self.ratio_text))

    def logits(self, features: torch.Tensor, domains: torch.Tensor | None = None) -> torch.Tensor:
        return self.logit_scale * self.image_features(features) @ self.text_features().T

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        return self.image_features(features)

    # -- training -------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        # In the worst-case branch the generator has its own optimiser (_step_generator).
        return [
            p
            for p in self.parameters()
            if p.requires_grad and not (self.worst_case and p is self.generator)
        ]

    def setup(self) -> None:
        if self.worst_case:
            self._generator_optimizer = torch.optim.SGD(
                [self.generator], lr=self.hp["gen_lr"], fused=fusable([self.generator])
            )

    def _step_generator(self, passed: AdapterPass, labels: torch.Tensor) -> None:
        """The generator's inner steps before the main step: keep the class, move away from
        same-class ID features (CE(s*xc@t.T) + lambda1*Lc), with the adapters frozen. They
        reuse the main step's adapter outputs, which G's steps do not change."""
        if not self.worst_case or self._generator_optimizer is None:
            return
        image, text = passed.image.value.detach(), passed.text.value.detach()
        with torch.no_grad():
            for _ in range(self.gen_steps):
                # The gradient in closed form: the adapters are frozen here, so it needs no
                # graph (a test checks it against autograd on the loss above).
                self.generator.grad = generator_gradient(
                    image, text, self.generator, labels, self.logit_scale, self.lambda1
                )
                self._generator_optimizer.step()
        self.generator.grad = None

    def _objective(
        self, features: torch.Tensor, labels: torch.Tensor, step_generator: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(logits, weighted regularisers) from one pass over the adapters, so the text
        side (the text encoder when n_ctx > 0) runs once per step; with
        ``step_generator`` (training) the generator takes its inner steps first."""
        passed = self.adapter_pass(features)
        if step_generator:
            self._step_generator(passed, labels)
        image, text = passed.image.value, passed.text.value
        logits = self.logit_scale * passed.similarity
        terms: dict[str, torch.Tensor] = {}
        shifted: ShiftedPass | None = None
        if self.use_generator:
            # Worst case: the adapters play against a fixed G; joint: G trains here too.
            generator = self.generator.detach() if self.worst_case else self.generator
            moved = shift(image, generator)
            shifted = ShiftedPass(moved, generator, moved.value @ text.T)
            similarity = same_class_similarity(moved.value, image, labels)
            sign = -1.0 if self.worst_case else 1.0
            shifted_ce = F.cross_entropy(self.logit_scale * shifted.similarity, labels)
            terms["shift"] = shifted_ce + sign * self.lambda1 * similarity
        if self.lambda2 > 0 and self.adapter_parameters():
            spec = EDRSpec(
                (self.ratio_image, self.ratio_text),
                (self.image_adapter.requires_grad, self.text_adapter.requires_grad),
                self.edr_energy,
                self.edr_reduction,
            )
            on_shifted = shifted if self.edr_on_shifted else None
            terms["edr"] = self.lambda2 * edr_closed_form(passed, spec, on_shifted)
        return logits, terms

    def extra_losses(
        self, features: torch.Tensor, labels: torch.Tensor, domains: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        return self._objective(features, labels)[1]

    def training_loss(
        self, features: torch.Tensor, labels: torch.Tensor, domains: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        # CE(logits) + sum(extra_losses) as in the base class, computed in one pass, after
        # the generator's inner steps in the worst-case branch.
        logits, terms = self._objective(features, labels, step_generator=True)
        loss = F.cross_entropy(logits, labels)
        parts = {"ce": float(loss.detach())}
        for key, value in terms.items():
            loss = loss + value
            parts[key] = float(value.detach())
        return loss, parts


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
