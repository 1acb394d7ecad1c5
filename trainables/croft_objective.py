"""CRoFT's training objective with its gradient written out: one autograd node from the
adapters (and, where they train, the generator G and the learned prompt features) to the
cross-entropy, the shift term and the EDR loss. `trainables/croft.py` is the method; this
module is its arithmetic.

On the small matrices of cached-feature training, autograd's engine costs more than the
operations: about 15 microseconds a node on 2 CPU cores, some 40 nodes a step. So the
forward runs without a graph and `CRoFTObjective.backward` applies the chain rule by hand,
about a hundred operations in all. The EDR term, the squared gradient of the energy with
respect to the adapters, is written the same way (`_edr_forward`, `_edr_backward`): its
forward builds dE/dtheta by the chain rule and its backward differentiates that chain
again, which is what the paper's double backward computes. tests/test_croft.py holds
value and gradient of every term to a pure-autograd build in every branch.

Every function here also takes a leading member dimension: a population
(`croft_search.trial.population`) hands `objective_gradients` its stacked [P, ...]
weights and features, each member's weights and ratios [P, 1, 1] tensors, and gets [P]
outputs (where a prompt layout cannot take the stacks, it maps one member's call over
the members with vmap, those numbers 0-dim). A member's totals stay [..., 1, 1]
(`total`), so they broadcast against the stacks; `mm_add` is addmm (baddbmm) where the
weights are numbers. Plain autograd under vmap, the EDR by double backward, was
measured first and cost more per member at K = 16 and 64 than one trial through this
objective: vmap shares autograd's per-node cost among members, not the d x d products of
its double backward that the Gram form here avoids.

Notation: f raw image features [B, d], g raw text features [K, d], u = adapt(f, Wi, ri),
x = n(u), v = adapt(g, Wt, rt), t = n(v), S = x t^T, m = x G + x, xc = n(m), n(.) the row
normalisation (`unit`). Rows are assumed to have norms above the 1e-12 floor, which
encoder features always do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

# F.normalize's floor on the norm, so unit() and F.normalize agree bit for bit.
NORM_EPS = 1e-12
# A weight, ratio or rate: a Python number, or a population member's 0-dim tensor.
Number = float | torch.Tensor


def adapt(raw: torch.Tensor, weight: torch.Tensor, ratio: Number) -> torch.Tensor:
    """Residual adapter ``ratio * raw @ weight.T + (1 - ratio) * raw`` (not normalised).

    Written as ``raw + ratio * (raw @ weight.T - raw)``: a product with the identity is
    exact in floating point, so an identity ``weight`` returns ``raw`` bit for bit and the
    untrained method reproduces zero-shot CLIP exactly rather than to rounding; and the
    difference is taken on the [N, d] product, not as ``weight - I`` on the d x d matrix,
    which on a population's [K, d, d] stacks costs about what the product does."""
    return adapt_product(raw, raw @ weight.mT, ratio)


def adapt_product(raw: torch.Tensor, product: torch.Tensor, ratio: Number) -> torch.Tensor:
    """`adapt` from the product ``raw @ weight.T`` where it is known another way (a
    population's text adapter, kept in the row space of the text features it acts on)."""
    moved = product - raw
    if isinstance(ratio, torch.Tensor):
        return raw + moved * ratio
    return torch.add(raw, moved, alpha=ratio)


def mm_add(
    base: torch.Tensor, left: torch.Tensor, right: torch.Tensor, alpha: Number = 1.0,
    beta: Number = 1.0,
) -> torch.Tensor:  # fmt: skip
    """``beta * base + alpha * left @ right``: one fused `torch.addmm` (`torch.baddbmm` on
    a population's stacks) where both weights are Python numbers; a population member's
    own values (tensors, which neither takes as weights) take the unfused form, equal to
    rounding."""
    if isinstance(alpha, torch.Tensor) or isinstance(beta, torch.Tensor):
        return base * beta + (left @ right) * alpha
    fused = torch.addmm if base.dim() == 2 else torch.baddbmm
    return fused(base, left, right, alpha=alpha, beta=beta)


def total(values: torch.Tensor) -> torch.Tensor:
    """The sum over a member's matrix, kept as a [..., 1, 1] tensor: a population's
    per-member totals then broadcast against its [P, N, d] stacks."""
    return values.sum((-2, -1), keepdim=True)


def inner(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``<left, right>`` of each member's matrices, as `total` keeps it."""
    return total(left * right)


def scalar(value: torch.Tensor) -> torch.Tensor:
    """A [..., 1, 1] total as the member's number: 0-dim alone, [P] for a population."""
    return value.squeeze(-1).squeeze(-1)


def nll(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of ``labels`` [..., B] under ``log_probs`` [..., B, C],
    as `total` keeps it."""
    return -total(log_probs.gather(-1, labels.unsqueeze(-1))) / labels.shape[-1]


@dataclass(frozen=True)
class Unit:
    """Row-normalised ``value = raw / |raw|``, keeping the norms so a gradient with respect
    to ``value`` can be pulled back to ``raw`` in closed form."""

    value: torch.Tensor
    norm: torch.Tensor  # [N, 1]

    def backward(
        self, grad_value: torch.Tensor, grad_norm: torch.Tensor | None = None
    ) -> torch.Tensor:
        """dL/d(raw) from the gradients with respect to ``value`` and (if any) ``norm``:
        ``(g - u (u . g - gn |raw|)) / |raw|`` row by row."""
        if grad_norm is None:
            return _project(grad_value, self.value, self.norm)[0]
        along = (self.value * grad_value).sum(-1, keepdim=True)
        along = torch.addcmul(along, grad_norm, self.norm, value=-1.0)
        return torch.addcmul(grad_value, self.value, along, value=-1.0) / self.norm


def unit(raw: torch.Tensor) -> Unit:
    norm = torch.linalg.vector_norm(raw, dim=-1, keepdim=True).clamp_min(NORM_EPS)
    return Unit(raw / norm, norm)


def shift(image: torch.Tensor, generator: torch.Tensor) -> Unit:
    """The generator's covariate-shifted feature ``n(x @ G + x)`` of normalised ``x``."""
    return unit(mm_add(image, image, generator))


@dataclass(frozen=True)
class SameClass:
    """The batch's same-class pairs (i, j), y_i == y_j, i = j included: the mask and its
    count, shared by the shift term and the generator's steps."""

    mask: torch.Tensor  # [B, B], 1.0 where the labels agree
    pairs: torch.Tensor  # number of such pairs, [..., 1, 1] (`total`)

    @classmethod
    def of(cls, labels: torch.Tensor, dtype: torch.dtype) -> SameClass:
        mask = (labels.unsqueeze(-1) == labels.unsqueeze(-2)).to(dtype)
        return cls(mask, total(mask))

    @classmethod
    def of_onehot(cls, onehot: torch.Tensor) -> SameClass:
        """From the one-hot labels [B, K]: the mask is onehot onehot^T (exact, 0 and 1)."""
        mask = onehot @ onehot.mT
        return cls(mask, total(mask))


def same_class_similarity(
    shifted: torch.Tensor,
    image: torch.Tensor,
    labels: torch.Tensor,
    same: SameClass | None = None,
) -> torch.Tensor:
    """``Lc``: mean of ``xc_i . x_j`` over the pairs (i, j) with ``y_i == y_j`` (i = j
    included, so a batch always has pairs)."""
    same = same or SameClass.of(labels, shifted.dtype)
    return scalar(total(shifted @ image.mT * same.mask) / same.pairs)


def generator_gradient(
    image: torch.Tensor,
    text: torch.Tensor,
    generator: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: float,
    lambda1: float,
    same: SameClass | None = None,
) -> torch.Tensor:
    """d/dG of the generator's loss CE(s * xc @ t.T, y) + lambda1 * Lc(xc, x, y), with
    xc = n(x @ G + x) and x, t fixed: dCE/dxc = s * (softmax - onehot) @ t / B and
    dLc/dxc = (same-class mask) @ x / (number of same-class pairs), pulled back through the
    normalisation, then dG = x^T dL/d(x @ G + x)."""
    batch = Batch.of(image, labels, text.shape[-2], same)
    moved = shift(image, generator)
    return image.mT @ _generator_pull(moved, text, batch, logit_scale, lambda1)


@dataclass(frozen=True)
class Batch:
    """What a training batch contributes besides the features: labels, their one-hot rows,
    the same-class pairs and ``(mask @ x) / pairs``, which do not change while G steps."""

    labels: torch.Tensor
    onehot: torch.Tensor  # [B, K]
    same: SameClass
    same_mean: torch.Tensor  # [B, B], the mask over the number of pairs
    toward_class: torch.Tensor  # [B, d], same_mean @ x

    @classmethod
    def of(
        cls, image: torch.Tensor, labels: torch.Tensor, classes: int, same: SameClass | None = None
    ) -> Batch:
        # one_hot rather than scatter_ into zeros: vmap cannot write a member's labels into
        # a tensor made inside it.
        onehot = F.one_hot(labels, classes).to(image.dtype)
        same = same or SameClass.of_onehot(onehot)
        same_mean = same.mask / same.pairs
        return cls(labels, onehot, same, same_mean, same_mean @ image)


def _generator_pull(
    moved: Unit, text: torch.Tensor, batch: Batch, logit_scale: float, lambda1: Number
) -> torch.Tensor:
    """The generator loss's gradient with respect to m = x G + x (``moved`` is n(m)),
    whose product with x^T is its gradient with respect to G."""
    residual = torch.softmax(logit_scale * moved.value @ text.mT, dim=-1) - batch.onehot
    scale = logit_scale / batch.labels.shape[-1]
    grad_moved = mm_add(batch.toward_class, residual, text, alpha=scale, beta=lambda1)
    return moved.backward(grad_moved)


def stepped_generator(
    generator: torch.Tensor,
    image: torch.Tensor,
    text: torch.Tensor,
    batch: Batch,
    settings: ObjectiveSettings,
    steps: int,
    lr: Number,
    in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """G after ``steps`` plain SGD steps on the generator's loss with x and t fixed (what
    the reference's SGD optimiser on G does: no momentum, no weight decay), and the
    batch's raw shifted features m = x G + x under it, which the objective's forward then
    takes as they are. G steps as a new tensor, so a population member's G can step under
    vmap; with ``in_place``, in ``generator`` itself (a population's own stack, which
    stepping into a new tensor would copy first)."""
    moved_raw = mm_add(image, image, generator)
    # m moves with G: x (G - x^T s) + x = m - (x x^T) s, a B x B x d product where a new
    # x G would be B x d x d.
    gram = image @ image.mT if steps else None
    for _ in range(steps):
        pull = _generator_pull(unit(moved_raw), text, batch, settings.logit_scale, settings.lambda1)
        # The rate scales the [B, d] factor, so the d x d matrix is written once.
        scaled = pull * lr
        if in_place:
            update = generator.baddbmm_ if generator.dim() == 3 else generator.addmm_
            generator = update(image.mT, scaled, alpha=-1.0)
        else:
            generator = mm_add(generator, image.mT, scaled, alpha=-1.0)
        moved_raw = mm_add(moved_raw, gram, scaled, alpha=-1.0)
    return generator, moved_raw


@dataclass(frozen=True)
class EDRSpec:
    """What the EDR penalty differentiates and how it reduces: the adapter ratios, which
    adapters train, the energy's aggregate and the squares' reduction."""

    ratios: tuple[Number, Number]
    trained: tuple[bool, bool]
    aggregate: str = "sum"
    reduction: str = "sum"


@dataclass(frozen=True)
class ObjectiveSettings:
    """The method's settings the objective reads: CLIP's logit scale, the adapter ratios,
    the shift term's weight and sign (worst case: the adapters see -lambda1 * Lc; joint:
    +lambda1 * Lc), and the EDR's weight, specification and whether it covers the shifted
    features (None when there is no EDR term)."""

    logit_scale: float
    ratios: tuple[Number, Number]
    lambda1: Number = 0.0
    shift_sign: float = 1.0
    lambda2: Number = 0.0
    edr: EDRSpec | None = None
    edr_on_shifted: bool = False


@dataclass(frozen=True)
class AdapterPass:
    """One forward pass through both adapters: the raw inputs of each adapter and the
    normalised outputs with their norms."""

    features: torch.Tensor  # raw image features f
    raw_text: torch.Tensor  # template or prompt text features g
    image: Unit  # n(adapt(f, Wi, ri))
    text: Unit  # n(adapt(g, Wt, rt))


@dataclass
class _Saved:
    """The forward's intermediates the backward reads."""

    passed: AdapterPass
    batch: Batch
    moved: Unit | None
    points: torch.Tensor  # [x; xc] or x
    log_probs: torch.Tensor  # log-softmax of [s S; s Sc]
    edr: _EDRState | None


class CRoFTObjective(torch.autograd.Function):
    """``CRoFTObjective.apply(Wi, Wt, G, g, passed, batch, settings, m)``: (loss, CE,
    shift term, EDR term) of one batch as one autograd node, each output differentiable;
    terms a branch does not have are zero. ``passed`` is the adapter pass of these
    adapters and of ``g`` (computed without a graph, so the generator could step on it
    first); ``m``, optional, is x G + x where the generator's steps left it; gradients
    reach whichever of Wi, Wt, G (the joint branch; the worst case passes it detached) and
    g (learned prompts) require them.

    Forward, with L = s [x; xc] t^T (the shifted rows only with a generator):
        CE = CE(L_x, y), shift = CE(L_xc, y) + sign * lambda1 * <xc, M x> / pairs,
        EDR = lambda2 * Le (`_edr_forward`), loss = CE + shift + EDR.
    Backward: dL = s (softmax - onehot) / B per CE, dxc += sign lambda1 M x / pairs and
    dx += sign lambda1 M xc / pairs for Lc, plus the EDR's own backward; then through
    S = [x; xc] t^T, m = x G + x and the normalisations to dWi = ri du^T f,
    dWt = rt dv^T g, dG = x^T dm (joint) and dg = dv + rt dv (Wt - I) (prompts)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        image_adapter: torch.Tensor,
        text_adapter: torch.Tensor,
        generator: torch.Tensor | None,
        raw_text: torch.Tensor,
        passed: AdapterPass,
        batch: Batch,
        settings: ObjectiveSettings,
        moved_raw: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        outputs, saved = _forward(generator, passed, batch, settings, moved_raw)
        ctx.set_materialize_grads(False)
        ctx.saved = saved
        ctx.settings = settings
        # The tensors are saved here as well so that autograd catches an in-place change
        # to a parameter between this forward and its backward.
        ctx.save_for_backward(image_adapter, text_adapter, generator)
        return outputs

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any,
        grad_loss: torch.Tensor | None,
        grad_ce: torch.Tensor | None,
        grad_shift: torch.Tensor | None,
        grad_edr: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        text_adapter, generator = ctx.saved_tensors[1:]
        grads = _backward(
            ctx.saved, ctx.settings, text_adapter, generator, tuple(ctx.needs_input_grad[:4]),
            (grad_loss, grad_ce, grad_shift, grad_edr),
        )  # fmt: skip
        return (*grads, None, None, None, None)


def objective_gradients(
    generator: torch.Tensor | None,
    text_adapter: torch.Tensor,
    passed: AdapterPass,
    batch: Batch,
    settings: ObjectiveSettings,
    needs: tuple[bool, bool, bool, bool],
    moved_raw: torch.Tensor | None = None,
    text_as_product: bool = False,
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor | None, ...]]:
    """`CRoFTObjective`'s four outputs and the loss's gradients with respect to (Wi, Wt, G,
    g) where ``needs`` asks for them, computed outright, without autograd: plain tensor
    operations, so a population runs them under vmap with each member's weights and
    ratios in ``settings`` as 0-dim tensors. With ``text_as_product``, Wt's gradient is
    the one with respect to the product g Wt^T (`adapt_product`), rt dv."""
    outputs, saved = _forward(generator, passed, batch, settings, moved_raw)
    grads = _backward(
        saved, settings, text_adapter, generator, needs, (1.0, None, None, None), text_as_product
    )
    return outputs, grads


def _forward(
    generator: torch.Tensor | None,
    passed: AdapterPass,
    batch: Batch,
    settings: ObjectiveSettings,
    moved_raw: torch.Tensor | None = None,
) -> tuple[tuple[torch.Tensor, ...], _Saved]:
    image, text = passed.image, passed.text
    rows = batch.labels.shape[-1]
    moved = None
    points = image.value
    if generator is not None:
        moved = shift(image.value, generator) if moved_raw is None else unit(moved_raw)
        points = torch.cat([image.value, moved.value], dim=-2)
    similarity = points @ text.value.mT
    log_probs = torch.log_softmax(settings.logit_scale * similarity, dim=-1)
    ce = nll(log_probs[..., :rows, :], batch.labels)
    loss, shift_term, edr_term, edr_state = ce, None, None, None
    if moved is not None:
        pulled = inner(moved.value, batch.toward_class)
        shift_term = (
            nll(log_probs[..., rows:, :], batch.labels)
            + (settings.shift_sign * settings.lambda1) * pulled
        )
        loss = loss + shift_term
    if settings.edr is not None:
        on_shifted = moved if settings.edr_on_shifted else None
        energy_rows = similarity if on_shifted is not None else similarity[..., :rows, :]
        energy_points = points if on_shifted is not None else image.value
        value, edr_state = _edr_forward(
            energy_rows, energy_points, passed, on_shifted, generator, settings.edr
        )
        edr_term = settings.lambda2 * value
        loss = loss + edr_term
    saved = _Saved(passed, batch, moved, points, log_probs, edr_state)
    if shift_term is None:
        shift_term = torch.zeros_like(ce)
    if edr_term is None:
        edr_term = torch.zeros_like(ce)
    return tuple(scalar(term) for term in (loss, ce, shift_term, edr_term)), saved


def _backward(
    saved: _Saved,
    settings: ObjectiveSettings,
    text_adapter: torch.Tensor,
    generator: torch.Tensor | None,
    needs: tuple[bool, ...],
    upstream: tuple[Any, Any, Any, Any],
    text_as_product: bool = False,
) -> tuple[torch.Tensor | None, ...]:
    """The gradients of (Wi, Wt, G, g) from those of the four outputs (None: no gradient;
    the loss's may be the Python number 1.0)."""
    grad_loss, grad_ce, grad_shift, grad_edr = upstream
    passed, batch, moved = saved.passed, saved.batch, saved.moved
    image, text = passed.image, passed.text
    weight_ce: Any = _add(grad_loss, grad_ce)
    weight_shift: Any = _add(grad_loss, grad_shift) if moved is not None else None
    weight_edr: Any = _add(grad_loss, grad_edr) if saved.edr is not None else None
    common = None
    uniform = moved is None  # one weight for every row of the cross-entropies
    if grad_ce is None and grad_shift is None and grad_edr is None and grad_loss is not None:
        # Training: every term has the loss's gradient, a factor the whole backward is
        # linear in, so it runs with Python-float weights (folded into the constants)
        # and the factor scales the parameters' gradients once at the end.
        common, uniform = grad_loss, True
        weight_ce, weight_shift, weight_edr = (
            None if w is None else 1.0 for w in (weight_ce, weight_shift, weight_edr)
        )
    rows = batch.labels.shape[-1]
    scale = settings.logit_scale / rows

    # Both cross-entropies: s (softmax - onehot) / B per row, weighted per term.
    residual = torch.exp(saved.log_probs).unflatten(-2, (-1, rows))  # [..., e, B, classes]
    residual = residual - batch.onehot.unsqueeze(-3)
    grad_similarity = None
    if uniform:
        if weight_ce is not None:
            grad_similarity = residual.flatten(-3, -2) * (weight_ce * scale)
    elif weight_ce is not None or weight_shift is not None:
        # Separate upstream gradients per term: one trial's autograd node (0-dim weights).
        like = weight_ce if weight_ce is not None else weight_shift
        per_term = torch.stack(
            [w if w is not None else torch.zeros_like(like) for w in (weight_ce, weight_shift)]
        )
        grad_similarity = (residual * (per_term * scale)[:, None, None]).flatten(-3, -2)

    grad_points = None
    grad_image = grad_image_norm = grad_text = grad_text_norm = grad_raw_text = None
    grad_moved = grad_moved_norm = grad_generator = None
    if weight_shift is not None:
        # Lc = <xc, M x> / pairs, M symmetric: dxc = M x / pairs, dx = M xc / pairs.
        pull = weight_shift * (settings.shift_sign * settings.lambda1)
        grad_moved = batch.toward_class * pull
        grad_image = (batch.same_mean @ moved.value) * pull
    if weight_edr is not None:
        grads = _edr_backward(
            saved.edr,
            weight_edr * settings.lambda2,
            need_generator=needs[2],
            need_raw_text=needs[3],
        )
        grad_similarity = _add_rows(grad_similarity, grads.similarity)
        grad_points = grads.points
        grad_image = _add(grad_image, grads.image)
        grad_image_norm = grads.image_norm
        grad_text, grad_text_norm = grads.text, grads.text_norm
        grad_raw_text = grads.raw_text
        grad_moved = _add(grad_moved, grads.moved)
        grad_moved_norm, grad_generator = grads.moved_norm, grads.generator

    # Through S = points t^T.
    if grad_similarity is not None:
        from_similarity = grad_similarity @ text.value
        grad_points = _add_rows(grad_points, from_similarity)
        used = saved.points[..., : grad_similarity.shape[-2], :]
        grad_text = _add(grad_text, grad_similarity.mT @ used)
    if grad_points is not None:
        grad_image = _add(grad_image, grad_points[..., :rows, :])
        if grad_points.shape[-2] > rows:
            grad_moved = _add(grad_moved, grad_points[..., rows:, :])

    # Through xc = n(m), m = x G + x.
    if moved is not None and grad_moved is not None:
        grad_raw_moved = moved.backward(grad_moved, grad_moved_norm)
        grad_image = _add(grad_image, mm_add(grad_raw_moved, grad_raw_moved, generator.mT))
        if needs[2]:
            grad_generator = _add(grad_generator, image.value.mT @ grad_raw_moved)

    # Through the normalisations and the adapters.
    ratio_image, ratio_text = settings.ratios
    grad_image_adapter = grad_text_adapter = None
    if needs[0] and grad_image is not None:
        grad_u = image.backward(grad_image, grad_image_norm)
        # The ratio scales the [B, d] factor, not the d x d product: a population's stacks
        # make every pass over d x d memory cost about a [B, d] x [d, d] product.
        grad_image_adapter = (grad_u * ratio_image).mT @ passed.features
    if grad_text is not None and (needs[1] or needs[3]):
        grad_v = text.backward(grad_text, grad_text_norm)
        if needs[1]:
            grad_text_adapter = grad_v * ratio_text  # with respect to g Wt^T
            if not text_as_product:
                grad_text_adapter = grad_text_adapter.mT @ passed.raw_text
        if needs[3]:
            # dv (I + rt (Wt - I)) = (1 - rt) dv + rt dv Wt
            through = mm_add(grad_v, grad_v, text_adapter, alpha=ratio_text, beta=1.0 - ratio_text)
            grad_raw_text = _add(grad_raw_text, through)
    grads = (
        grad_image_adapter,
        grad_text_adapter,
        grad_generator if needs[2] else None,
        grad_raw_text if needs[3] else None,
    )
    if common is not None and not (isinstance(common, float) and common == 1.0):
        grads = tuple(None if g is None else g * common for g in grads)
    return grads


def _add(total: torch.Tensor | None, value: torch.Tensor | None) -> torch.Tensor | None:
    if value is None:
        return total
    return value if total is None else total + value


def _add_rows(total: torch.Tensor | None, value: torch.Tensor | None) -> torch.Tensor | None:
    """``total + value`` where one of them may cover only the other's first rows."""
    if total is None or value is None or value.shape[-2] == total.shape[-2]:
        return _add(total, value)
    if value.shape[-2] > total.shape[-2]:
        total, value = value, total
    rows = value.shape[-2]
    return torch.cat([total[..., :rows, :] + value, total[..., rows:, :]], dim=-2)


# -- EDR ------------------------------------------------------------------------------------
def _project(
    grad: torch.Tensor, unit_value: torch.Tensor, norm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g - w (w . g)) / n`` row by row (`Unit.backward`) and the dot products ``w . g``,
    which its backward reuses; ``w`` and ``n`` broadcast against ``g``."""
    along = (unit_value * grad).sum(-1, keepdim=True)
    return torch.addcmul(grad, unit_value, along, value=-1.0) / norm, along


def _project_back(
    grad: torch.Tensor,
    projected: torch.Tensor,
    raw: torch.Tensor,
    unit_value: torch.Tensor,
    norm: torch.Tensor,
    along: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of ``projected, along = _project(raw, w, n)``: the gradients with respect to
    ``raw``, ``w`` and ``n`` from that of ``projected``. Those of ``w`` and ``n`` come out in
    ``raw``'s shape, for the caller to reduce over any stacked dimension."""
    scaled = grad / norm
    scaled_along = (unit_value * scaled).sum(-1, keepdim=True)
    grad_raw = torch.addcmul(scaled, unit_value, scaled_along, value=-1.0)
    grad_unit = torch.addcmul(along * scaled, scaled_along, raw).neg_()
    grad_norm = (scaled * projected).sum(-1, keepdim=True).neg_()
    return grad_raw, grad_unit, grad_norm


@dataclass
class _EDRState:
    spec: EDRSpec
    scale: float
    energies: int
    weights: torch.Tensor  # P = exp(S) (/ B K), every energy's rows
    points: torch.Tensor  # z: x, or [x; xc]
    passed: AdapterPass
    moved: Unit | None
    generator: torch.Tensor | None
    image_side: tuple | None
    text_side: tuple | None


@dataclass
class _EDRGradients:
    similarity: torch.Tensor | None = None
    points: torch.Tensor | None = None
    image: torch.Tensor | None = None
    image_norm: torch.Tensor | None = None
    text: torch.Tensor | None = None
    text_norm: torch.Tensor | None = None
    raw_text: torch.Tensor | None = None
    moved: torch.Tensor | None = None
    moved_norm: torch.Tensor | None = None
    generator: torch.Tensor | None = None


def _edr_forward(
    similarity: torch.Tensor,
    points: torch.Tensor,
    passed: AdapterPass,
    moved: Unit | None,
    generator: torch.Tensor | None,
    spec: EDRSpec,
) -> tuple[torch.Tensor, _EDRState]:
    """``|| dE / d(Wi, Wt) ||^2`` of the ID energy plus, with ``moved``, the shifted one.

    Per energy e (ID: z = x; shifted: z = xc), over its rows of S = [x; xc] t^T, with
    P = exp(S) (divided by B K for the mean energy) and pull_w(h) = (h - w (w . h)) / |.|:
        dE/dx = P t                              or, shifted, a G^T + a, a = pull_xc(P t)
        A_e = dE/du = pull_x(dE/dx),  B_e = dE/dv = pull_t(P^T z)
        dE/dWi = ri A_e^T f,  dE/dWt = rt B_e^T g
        Le = sum_e ri^2 <A_e, (f f^T) A_e> + rt^2 <B_e, (g g^T) B_e>
    the Gram form of || dE/dWi ||^2 + || dE/dWt ||^2, B x B products instead of d x d ones,
    with the energies stacked ([B, e, d] and [K, e, d]) so each step runs once for both."""
    (ri, rt), (train_image, train_text) = spec.ratios, spec.trained
    image, text = passed.image, passed.text
    batch, classes = image.value.shape[-2], text.value.shape[-2]
    energies = points.shape[-2] // batch
    weights = torch.exp(similarity)
    if spec.aggregate == "mean":
        weights = weights / (batch * classes)
    parts = []
    image_side = text_side = None
    if train_image:
        toward_text = weights @ text.value  # dE/dz, every energy's rows
        toward_x = [toward_text[..., :batch, :]]
        moved_side = None
        if moved is not None:
            at_moved = toward_text[..., batch:, :]
            into, into_along = _project(at_moved, moved.value, moved.norm)  # dE/dm
            toward_x.append(mm_add(into, into, generator.mT))
            moved_side = (at_moved, into, into_along)
        at_x = torch.stack(toward_x, dim=-2)  # [B, e, d]
        grad_u, u_along = _project(at_x, image.value.unsqueeze(-2), image.norm.unsqueeze(-2))
        flat_u = grad_u.flatten(-2)
        gram_grad_u = (passed.features @ passed.features.mT) @ flat_u
        parts.append(ri**2 * inner(flat_u, gram_grad_u))
        image_side = (at_x, grad_u, u_along, gram_grad_u, moved_side)
    if train_text:
        toward_image = torch.stack(
            [weights[..., e * batch : (e + 1) * batch, :].mT
             @ points[..., e * batch : (e + 1) * batch, :] for e in range(energies)],
            dim=-2,
        )  # [K, e, d]  # fmt: skip
        grad_v, v_along = _project(toward_image, text.value.unsqueeze(-2), text.norm.unsqueeze(-2))
        raw_text = passed.raw_text
        flat_v = grad_v.flatten(-2)
        gram_grad_v = (raw_text @ raw_text.mT) @ flat_v
        parts.append(rt**2 * inner(flat_v, gram_grad_v))
        text_side = (toward_image, grad_v, v_along, gram_grad_v)
    scale = 1.0
    if spec.reduction == "mean":
        scale = 1.0 / (image.value.shape[-1] ** 2 * sum(spec.trained))
    state = _EDRState(
        spec, scale, energies, weights, points, passed, moved, generator, image_side, text_side
    )
    total = parts[0] if len(parts) == 1 else parts[0] + parts[1]
    return total * scale if scale != 1.0 else total, state


def _edr_backward(
    state: _EDRState, weight: torch.Tensor, need_generator: bool, need_raw_text: bool
) -> _EDRGradients:
    """The gradients of ``weight * Le`` with respect to S, [x; xc], x, |u|, t, |v|, g (with
    ``need_raw_text``) and, shifted, xc, |m| and G (with ``need_generator``): the forward's
    chain run in reverse."""
    (ri, rt), energies = state.spec.ratios, state.energies
    image, text = state.passed.image, state.passed.text
    batch = image.value.shape[-2]
    weight = weight * state.scale  # a Python float in training
    out = _EDRGradients()
    grad_weights = None
    if state.image_side is not None:
        at_x, grad_u, u_along, gram_grad_u, moved_side = state.image_side
        # The member's weight scales the [B, e d] matrix, where a [P, 1, 1] one broadcasts.
        upstream = (gram_grad_u * ((2 * ri**2) * weight)).view_as(grad_u)
        grad_at_x, grad_x, grad_xn = _project_back(
            upstream, grad_u, at_x, image.value.unsqueeze(-2), image.norm.unsqueeze(-2), u_along
        )
        out.image = grad_x.sum(-2) if energies > 1 else grad_x[..., 0, :]
        out.image_norm = grad_xn.sum(-2) if energies > 1 else grad_xn[..., 0, :]
        grad_toward_text = grad_at_x[..., 0, :]
        if moved_side is not None:
            at_moved, into, into_along = moved_side
            grad_shifted_x = grad_at_x[..., 1, :]
            if need_generator:
                out.generator = grad_shifted_x.mT @ into
            grad_into = mm_add(grad_shifted_x, grad_shifted_x, state.generator)
            grad_at_moved, out.moved, out.moved_norm = _project_back(
                grad_into, into, at_moved, state.moved.value, state.moved.norm, into_along
            )
            grad_toward_text = torch.cat([grad_toward_text, grad_at_moved], dim=-2)
        grad_weights = grad_toward_text @ text.value.mT
        out.text = state.weights.mT @ grad_toward_text
    if state.text_side is not None:
        toward_image, grad_v, v_along, gram_grad_v = state.text_side
        coefficient = (2 * rt**2) * weight
        upstream = (gram_grad_v * coefficient).view_as(grad_v)
        if need_raw_text:
            flat = grad_v.flatten(-2)
            out.raw_text = ((flat @ flat.mT) @ state.passed.raw_text) * coefficient
        grad_toward_image, grad_t, grad_tn = _project_back(
            upstream, grad_v, toward_image, text.value.unsqueeze(-2), text.norm.unsqueeze(-2),
            v_along,
        )  # fmt: skip
        out.text = _add(out.text, grad_t.sum(-2))
        out.text_norm = grad_tn.sum(-2)
        by_energy = grad_toward_image.transpose(-3, -2)  # [e, K, d]
        grad_points = state.weights.unflatten(-2, (energies, batch)) @ by_energy
        out.points = grad_points.flatten(-3, -2)
        points = state.points.unflatten(-2, (energies, batch))
        # points @ by_energy^T, transposed: MKL's batched product runs about three times
        # faster on a population's stacks with the class columns first. (The forward's
        # similarities keep the plain product: transposed, their rounding took a prompt
        # member past 1e-5 of its trial alone.)
        from_text = (by_energy @ points.mT).mT
        grad_weights = _add(grad_weights, from_text.flatten(-3, -2))
    out.similarity = grad_weights * state.weights
    return out
