"""CRoFT: identity initialisation, the EDR loss (its double backward and its effect), the
worst-case generator, which parameters train, hyper-parameter checks, the prompt path."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from croft_search.backbones import Backbone, load_backbone
from croft_search.data import get_dataset_spec, load_domain_split, load_image, sample_few_shot
from croft_search.errors import ConfigError
from croft_search.prompts import class_prompts, zero_shot_logits
from croft_search.trial.loop import train
from trainables.base import MethodContext, TrainData
from trainables.croft import CRoFT, edr_penalty, energy, energy_gradient_norm
from trainables.croft_objective import (
    Batch,
    adapt,
    generator_gradient,
    same_class_similarity,
    stepped_generator,
)
from trainables.registry import get_method, resolve_hparams
from trainables.text import FrozenTextEncoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHOTS = 8
VIEWS = 2


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return load_backbone("tiny-digits", pretrained=None)


@pytest.fixture(scope="module")
def digits_context(backbone: Backbone, digits_root: Path) -> MethodContext:
    """An 8-shot digits training set (target domain painting) encoded directly, the few
    hundred images only, not the whole feature cache."""
    spec = get_dataset_spec("digits")
    split = load_domain_split("digits", digits_root, "painting")
    chosen = sample_few_shot(split.train, SHOTS, seed=0)
    images = [load_image(sample.path) for sample in chosen]
    clean = backbone.encode_images(torch.stack([backbone.eval_transform(i) for i in images]))
    augment = backbone.train_transform(hflip=False)
    torch.manual_seed(0)
    views = torch.stack(
        [
            backbone.encode_images(torch.stack([augment(image) for image in images]))
            for _ in range(VIEWS)
        ],
        dim=1,
    )
    domains = sorted({sample.domain for sample in chosen})
    data = TrainData(
        views=views.float(),
        clean=clean.float(),
        labels=torch.as_tensor([sample.label for sample in chosen]),
        domains=torch.as_tensor([domains.index(sample.domain) for sample in chosen]),
    )
    with torch.no_grad():
        class_text = backbone.encode_texts(class_prompts(spec.prompt_template, split.classnames))
    return MethodContext(
        classnames=split.classnames,
        template=spec.prompt_template,
        make_text_encoder=lambda: FrozenTextEncoder(backbone),
        class_text=class_text.float(),
        logit_scale=backbone.logit_scale,
        embed_dim=backbone.embed_dim,
        train=data,
        device=torch.device("cpu"),
    )


def build(context: MethodContext, **overrides: Any) -> tuple[CRoFT, dict[str, Any]]:
    hp = resolve_hparams("croft", overrides)
    torch.manual_seed(hp["seed"])
    return get_method("croft")(context, hp), hp


def fit(context: MethodContext, **overrides: Any) -> tuple[CRoFT, list[dict[str, float]]]:
    method, hp = build(context, **overrides)
    return method, train(method, context.train, hp)


def first_batch(context: MethodContext, size: int = 32) -> tuple[torch.Tensor, ...]:
    data = context.train
    return data.views[:size, 0], data.labels[:size], data.domains[:size]


def test_untrained_croft_is_zero_shot_clip_exactly(digits_context: MethodContext) -> None:
    method, _ = build(digits_context)
    features = digits_context.train.clean
    expected = zero_shot_logits(features, digits_context.class_text, digits_context.logit_scale)
    assert torch.equal(method.logits(features), expected)
    assert torch.equal(method.embed(features), F.normalize(features, dim=-1))
    assert CRoFT.default_score == "energy"


# With the energy averaged over batch and classes Le is (B*K)^2 smaller, hence its lambda2.
@pytest.mark.parametrize(("aggregate", "lambda2"), [("sum", 1.0), ("mean", 100.0)])
def test_edr_training_flattens_the_energy_landscape(
    digits_context: MethodContext, aggregate: str, lambda2: float
) -> None:
    features = digits_context.train.clean
    for seed in (0, 1):
        common = {"epochs": 4, "seed": seed, "edr_energy": aggregate}
        plain, plain_history = fit(digits_context, lambda2=0.0, **common)
        reshaped, history = fit(digits_context, lambda2=lambda2, **common)
        assert "edr" in history[-1] and "edr" not in plain_history[-1]
        with_edr = energy_gradient_norm(reshaped, features)
        without_edr = energy_gradient_norm(plain, features)
        assert with_edr < 0.1 * without_edr, (seed, with_edr, without_edr)


def tiny_method(**overrides: Any) -> tuple[CRoFT, torch.Tensor, torch.Tensor]:
    """A float64 CRoFT with d = 6, K = 3 and adapters moved away from the identity."""
    generator = torch.Generator().manual_seed(0)
    dim, classes = 6, 3
    backbone = load_backbone("tiny-digits", pretrained=None)
    data = TrainData(
        views=torch.zeros(0, 1, dim),
        clean=torch.zeros(0, dim),
        labels=torch.zeros(0, dtype=torch.long),
        domains=torch.zeros(0, dtype=torch.long),
    )
    context = MethodContext(
        classnames=("zero", "one", "two"),
        template="{}",
        make_text_encoder=lambda: FrozenTextEncoder(backbone),
        class_text=torch.randn(classes, dim, generator=generator),
        logit_scale=100.0,
        embed_dim=dim,
        train=data,
        device=torch.device("cpu"),
    )
    method, _ = build(context, **overrides)
    method.double()
    with torch.no_grad():
        method.image_adapter.add_(0.3 * torch.randn(dim, dim, generator=generator))
        method.text_adapter.add_(0.3 * torch.randn(dim, dim, generator=generator))
    features = torch.randn(5, dim, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1])
    return method, features, labels


def energy_at(method: CRoFT, features: torch.Tensor, wi: torch.Tensor, wt: torch.Tensor):
    image = F.normalize(adapt(features, wi, method.ratio_image), dim=-1)
    text = F.normalize(adapt(method.class_text, wt, method.ratio_text), dim=-1)
    return energy(image, text)


def penalty_at(method: CRoFT, features: torch.Tensor, wi: torch.Tensor, wt: torch.Tensor):
    wi, wt = wi.detach().requires_grad_(True), wt.detach().requires_grad_(True)
    with torch.enable_grad():
        return float(edr_penalty(energy_at(method, features, wi, wt), (wi, wt)).detach())


def central_difference(function, matrix: torch.Tensor, eps: float) -> torch.Tensor:
    out = torch.zeros_like(matrix)
    for index in range(matrix.numel()):
        step = torch.zeros_like(matrix).view(-1)
        step[index] = eps
        step = step.view_as(matrix)
        out.view(-1)[index] = (function(matrix + step) - function(matrix - step)) / (2 * eps)
    return out


def test_energy_gradient_matches_the_delta_perturbation_and_finite_differences() -> None:
    method, features, _ = tiny_method()
    wi, wt = method.image_adapter, method.text_adapter
    grad_wi, grad_wt = torch.autograd.grad(energy_at(method, features, wi, wt), (wi, wt))

    # The reference's form: an additive perturbation delta on the matrices, differentiated
    # at delta = 0, with E(theta) subtracted (a constant for delta).
    delta_i = torch.zeros_like(wi, requires_grad=True)
    delta_t = torch.zeros_like(wt, requires_grad=True)
    base = energy_at(method, features, wi, wt).detach()
    shifted = energy_at(method, features, wi.detach() + delta_i, wt.detach() + delta_t)
    by_delta = torch.autograd.grad(shifted - base, (delta_i, delta_t))
    torch.testing.assert_close(by_delta[0], grad_wi, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(by_delta[1], grad_wt, rtol=1e-12, atol=1e-12)

    with torch.no_grad():
        numeric_wi = central_difference(
            lambda w: float(energy_at(method, features, w, wt)), wi.detach(), 1e-6
        )
    torch.testing.assert_close(grad_wi, numeric_wi, rtol=1e-6, atol=1e-8)
    assert grad_wi.abs().max() > 1e-3 and grad_wt.abs().max() > 1e-3


def test_edr_double_backward_reaches_the_adapters_with_the_right_gradient() -> None:
    method, features, _ = tiny_method()
    wi, wt = method.image_adapter, method.text_adapter
    penalty = edr_penalty(energy_at(method, features, wi, wt), (wi, wt))
    penalty.backward()
    assert wi.grad is not None and wi.grad.abs().max() > 1e-4
    assert wt.grad is not None and wt.grad.abs().max() > 1e-4
    numeric_wi = central_difference(lambda w: penalty_at(method, features, w, wt), wi, 1e-5)
    numeric_wt = central_difference(lambda w: penalty_at(method, features, wi, w), wt, 1e-5)
    torch.testing.assert_close(wi.grad, numeric_wi, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(wt.grad, numeric_wt, rtol=1e-5, atol=1e-7)
    # Setup I averages the squares over every entry of both matrices.
    mean = edr_penalty(energy_at(method, features, wi, wt), (wi, wt), reduction="mean")
    expected = float(penalty.detach()) / (2 * wi.numel())
    assert float(mean.detach()) == pytest.approx(expected, rel=1e-12)


def test_edr_is_skipped_without_lambda2_and_matches_the_helper() -> None:
    method, features, labels = tiny_method(lambda1=0.0)
    domains = torch.zeros_like(labels)
    terms = method.extra_losses(features, labels, domains)
    expected = energy_gradient_norm(method, features)
    assert float(terms["edr"].detach()) == pytest.approx(expected, rel=1e-10)
    assert expected > 0
    off, features, labels = tiny_method(lambda1=0.0, lambda2=0.0)
    assert off.extra_losses(features, labels, domains) == {}


def autograd_edr(method: CRoFT, features: torch.Tensor) -> torch.Tensor:
    """The EDR term as the paper writes it, by autograd's double backward: the reference
    the closed-form gradients in training must reproduce."""
    theta = method.adapter_parameters()
    image = F.normalize(adapt(features, method.image_adapter, method.ratio_image), dim=-1)
    text = F.normalize(adapt(method.raw_text(), method.text_adapter, method.ratio_text), dim=-1)
    aggregate, reduction = method.edr_energy, method.edr_reduction
    penalty = edr_penalty(energy(image, text, aggregate), theta, reduction)
    if method.edr_on_shifted:
        generator = method.generator.detach() if method.worst_case else method.generator
        shifted = F.normalize(image @ generator + image, dim=-1)
        penalty = penalty + edr_penalty(energy(shifted, text, aggregate), theta, reduction)
    return method.lambda2 * penalty


BRANCHES = [
    {"lambda1": 0.0},
    {"lambda1": 5.0, "gen_steps": 1},
    {"lambda1": 5.0, "gen_steps": 0},  # joint: the penalty also reaches G
    {"lambda1": 5.0, "edr_energy": "sum", "edr_reduction": "mean"},
    {"lambda1": 5.0, "edr_on_shifted": False},
    {"lambda1": 5.0, "ratio_image": 0.0},
    {"lambda1": 5.0, "ratio_text": 0.0},
]


def move_generator(method: CRoFT, seed: int) -> None:
    """Moves G (when there is one) away from the identity, so its terms are not trivial."""
    if method.generator is not None:
        with torch.no_grad():
            method.generator.add_(
                0.2 * torch.randn(6, 6, generator=torch.Generator().manual_seed(seed))
            )


@pytest.mark.parametrize("overrides", BRANCHES)
def test_closed_form_edr_equals_the_double_backward_in_value_and_gradient(
    overrides: dict[str, Any],
) -> None:
    method, features, labels = tiny_method(**overrides)
    move_generator(method, seed=1)
    params = [p for p in method.parameters() if p.requires_grad]
    closed = method.extra_losses(features, labels, torch.zeros_like(labels))["edr"]
    reference = autograd_edr(method, features)
    torch.testing.assert_close(closed, reference, rtol=1e-12, atol=1e-15)
    got = torch.autograd.grad(closed, params, allow_unused=True)
    want = torch.autograd.grad(reference, params, allow_unused=True)
    names = [name for name, p in method.named_parameters() if p.requires_grad]
    for name, param, a, b in zip(names, params, got, want, strict=True):
        # One autograd node computes every term, so a parameter the EDR term does not
        # depend on (G in the joint branch) may get an exact zero where autograd has None.
        zero = torch.zeros_like(param)
        a, b = (zero if a is None else a), (zero if b is None else b)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14, msg=name)
    assert any(g is not None and g.abs().max() > 1e-6 for g in got)


def autograd_loss(method: CRoFT, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CRoFT's whole training loss built from autograd's own operations (the EDR term by
    double backward): what the hand-written backward of the objective must reproduce."""
    image = F.normalize(adapt(features, method.image_adapter, method.ratio_image), dim=-1)
    text = F.normalize(adapt(method.raw_text(), method.text_adapter, method.ratio_text), dim=-1)
    loss = F.cross_entropy(method.logit_scale * image @ text.T, labels)
    if method.use_generator:
        generator = method.generator.detach() if method.worst_case else method.generator
        shifted = F.normalize(image @ generator + image, dim=-1)
        sign = -1.0 if method.worst_case else 1.0
        loss = loss + F.cross_entropy(method.logit_scale * shifted @ text.T, labels)
        loss = loss + sign * method.lambda1 * same_class_similarity(shifted, image, labels)
    if method.lambda2 > 0:
        loss = loss + autograd_edr(method, features)
    return loss


@pytest.mark.parametrize("overrides", [*BRANCHES, {"lambda1": 5.0, "lambda2": 0.0}])
def test_hand_written_objective_equals_autograd_in_value_and_gradient(
    overrides: dict[str, Any],
) -> None:
    method, features, labels = tiny_method(**overrides)
    move_generator(method, seed=2)
    params = method.trainable_parameters()  # in the worst case G takes its own steps
    names = [name for name, p in method.named_parameters() if any(p is q for q in params)]
    loss, parts = method.training_loss(features, labels, torch.zeros_like(labels))
    reference = autograd_loss(method, features, labels)
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=1e-15)
    assert parts["ce"] > 0 and ("edr" in parts) == (method.lambda2 > 0)
    got = torch.autograd.grad(loss, params)
    want = torch.autograd.grad(reference, params)
    for name, a, b in zip(names, got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13, msg=name)
    assert all(g.abs().max() > 1e-6 for g in got)


@pytest.mark.parametrize("lambda1", [0.5, 5.0])
def test_generator_gradient_equals_autograd_on_the_generator_loss(lambda1: float) -> None:
    method, features, labels = tiny_method(lambda1=lambda1, gen_steps=1)
    image, text = method.image_features(features).detach(), method.text_features().detach()
    generator = torch.eye(6, dtype=torch.float64) + 0.3 * torch.randn(6, 6, dtype=torch.float64)
    generator.requires_grad_(True)
    shifted = F.normalize(image @ generator + image, dim=-1)
    loss = F.cross_entropy(method.logit_scale * shifted @ text.T, labels)
    loss = loss + lambda1 * same_class_similarity(shifted, image, labels)
    (want,) = torch.autograd.grad(loss, [generator])
    got = generator_gradient(image, text, generator.detach(), labels, method.logit_scale, lambda1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    assert want.abs().max() > 1e-4


def test_generator_steps_are_sgd_on_the_generator_loss() -> None:
    """G's inner steps are what torch's SGD (no momentum, no weight decay) does with
    autograd's gradient of CE(s*xc@t.T) + lambda1*Lc, step after step."""
    method, features, labels = tiny_method(lambda1=5.0, gen_steps=3, gen_lr=0.05)
    image, text = method.image_features(features).detach(), method.text_features().detach()
    start = torch.eye(6, dtype=torch.float64) + 0.3 * torch.randn(6, 6, dtype=torch.float64)
    reference = start.clone().requires_grad_(True)
    optimizer = torch.optim.SGD([reference], lr=0.05)
    for _ in range(3):
        shifted = F.normalize(image @ reference + image, dim=-1)
        loss = F.cross_entropy(method.logit_scale * shifted @ text.T, labels)
        loss = loss + 5.0 * same_class_similarity(shifted, image, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    batch = Batch.of(image, labels, len(text))
    settings = method.objective_settings()
    stepped = stepped_generator(start, image, text, batch, settings, 3, 0.05)[0]
    torch.testing.assert_close(stepped, reference.detach(), rtol=1e-10, atol=1e-12)
    assert (stepped - start).abs().max() > 1e-3


def test_stepped_generator_keeps_the_shifted_features_of_the_stepped_generator() -> None:
    """The raw shifted features the steps hand the objective are x G + x of the G they
    leave, and stepping a population's own stack in place gives that G too."""
    method, features, labels = tiny_method(lambda1=5.0, gen_steps=3, gen_lr=0.05)
    image, text = method.image_features(features).detach(), method.text_features().detach()
    start = torch.eye(6, dtype=torch.float64) + 0.3 * torch.randn(6, 6, dtype=torch.float64)
    batch, settings = Batch.of(image, labels, len(text)), method.objective_settings()
    stepped, moved = stepped_generator(start, image, text, batch, settings, 3, 0.05)
    torch.testing.assert_close(moved, image @ stepped + image, rtol=1e-10, atol=1e-12)
    assert (moved - (image @ start + image)).abs().max() > 1e-3
    stack = torch.stack([start, start.T.clone()])
    own = stack.clone()
    pair = Batch.of(image.expand(2, -1, -1), labels.expand(2, -1), len(text))
    stepped_stack, moved_stack = stepped_generator(
        own, image.expand(2, -1, -1), text.expand(2, -1, -1), pair, settings, 3, 0.05, True
    )
    assert stepped_stack.data_ptr() == own.data_ptr()
    for k in range(2):
        alone, moved_alone = stepped_generator(stack[k], image, text, batch, settings, 3, 0.05)
        torch.testing.assert_close(stepped_stack[k], alone, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(moved_stack[k], moved_alone, rtol=1e-10, atol=1e-12)


def test_closed_form_edr_follows_learned_prompts(digits_context: MethodContext) -> None:
    method, _ = build(digits_context, n_ctx=4, lambda1=5.0)
    # float32: the frozen text tower the prompts run through is float32.
    features, labels, domains = first_batch(digits_context, size=8)
    with torch.no_grad():
        method.text_adapter.add_(0.05 * torch.randn_like(method.text_adapter))
    context = method.prompt_learner.context
    closed = method.extra_losses(features, labels, domains)["edr"]
    reference = autograd_edr(method, features)
    torch.testing.assert_close(closed, reference, rtol=1e-5, atol=1e-12)
    (got,) = torch.autograd.grad(closed, [context])
    (want,) = torch.autograd.grad(reference, [context])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3 * float(want.abs().max()))
    assert got.abs().max() > 0


def test_worst_case_generator_trains_on_its_own_and_the_adapters_see_the_minimax_term(
    digits_context: MethodContext,
) -> None:
    method, history = fit(digits_context, epochs=2, gen_steps=2, lambda1=5.0)
    generator = method.generator
    assert generator is not None
    eye = torch.eye(digits_context.embed_dim)
    assert (generator.detach() - eye).abs().max() > 1e-4  # moved by its own steps
    assert all(p is not generator for p in method.trainable_parameters())
    assert "shift" in history[-1]

    features, labels, domains = first_batch(digits_context)
    terms = method.extra_losses(features, labels, domains)
    image = method.image_features(features)
    text = method.text_features()
    shifted = F.normalize(image @ generator + image, dim=-1)
    same = labels[:, None] == labels[None, :]
    similarity = (shifted @ image.T)[same].mean()
    worst_case = F.cross_entropy(method.logit_scale * shifted @ text.T, labels) - 5.0 * similarity
    torch.testing.assert_close(terms["shift"], worst_case)
    torch.testing.assert_close(same_class_similarity(shifted, image, labels), similarity)

    method.zero_grad(set_to_none=True)
    terms["shift"].backward()
    assert method.image_adapter.grad.abs().max() > 0
    assert method.text_adapter.grad.abs().max() > 0
    assert generator.grad is None  # G is frozen while the adapters play against it


def test_joint_generator_is_a_main_parameter_and_lambda1_zero_removes_it(
    digits_context: MethodContext,
) -> None:
    joint, _ = fit(digits_context, epochs=2, gen_steps=0, lambda1=5.0)
    assert any(p is joint.generator for p in joint.trainable_parameters())
    assert (joint.generator.detach() - torch.eye(digits_context.embed_dim)).abs().max() > 1e-5
    features, labels, domains = first_batch(digits_context)
    image = joint.image_features(features)
    text = joint.text_features()
    shifted = F.normalize(image @ joint.generator + image, dim=-1)
    expected = F.cross_entropy(
        joint.logit_scale * shifted @ text.T, labels
    ) + 5.0 * same_class_similarity(shifted, image, labels)
    torch.testing.assert_close(joint.extra_losses(features, labels, domains)["shift"], expected)

    # EDR on the shifted features belongs to the worst-case branch (METHODS.md, reference).
    assert not joint.edr_on_shifted
    assert build(digits_context, gen_steps=1, lambda1=5.0)[0].edr_on_shifted

    for gen_steps in (0, 3):
        off, history = fit(digits_context, epochs=1, gen_steps=gen_steps, lambda1=0.0)
        assert off.generator is None
        assert not any("generator" in name for name, _ in off.named_parameters())
        assert "shift" not in history[-1]
        assert set(off.extra_losses(features, labels, domains)) == {"edr"}


def test_training_loss_is_ce_plus_the_extra_losses(digits_context: MethodContext) -> None:
    method, _ = build(digits_context)
    features, labels, domains = first_batch(digits_context)
    with torch.no_grad():
        method.image_adapter.add_(0.01 * torch.randn_like(method.image_adapter))
    loss, parts = method.training_loss(features, labels, domains)
    extra = method.extra_losses(features, labels, domains)
    expected = F.cross_entropy(method.logits(features), labels) + sum(extra.values())
    torch.testing.assert_close(loss, expected)
    assert set(parts) == {"ce", "shift", "edr"}


def checksum(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("frozen", ["text", "image"])
def test_only_the_intended_parameters_train(
    digits_context: MethodContext, backbone: Backbone, frozen: str
) -> None:
    before = checksum(backbone.model)
    eye = torch.eye(digits_context.embed_dim)
    ratio = {"text": {"ratio_text": 0.0}, "image": {"ratio_image": 0.0}}[frozen]
    method, _ = fit(digits_context, epochs=2, **ratio)
    assert checksum(backbone.model) == before
    still, trained = (
        (method.text_adapter, method.image_adapter)
        if frozen == "text"
        else (method.image_adapter, method.text_adapter)
    )
    assert all(p is not still for p in method.trainable_parameters())
    assert torch.equal(still, eye)
    assert (trained.detach() - eye).abs().max() > 1e-5
    # Only CRoFT's own matrices are state: nothing of the frozen encoders was copied in.
    assert set(method.state_dict()) == {"image_adapter", "text_adapter", "generator"}
    # The generator takes its own steps in the (default) worst-case branch.
    assert [id(p) for p in method.trainable_parameters()] == [id(trained)]


@pytest.mark.parametrize(
    "overrides",
    [
        {"ratio_image": 1.5},
        {"ratio_text": -0.1},
        {"edr_reduction": "max"},
        {"edr_energy": "max"},
        {"n_ctx": -1},
        {"n_ctx": 17},
        {"lambda1": -1.0},
        {"lambda2": 2e4},
        {"gen_steps": 21},
        {"gen_steps": 1.5},
        {"edr_on_shifted": "maybe"},
    ],
)
def test_bad_values_are_config_errors(overrides: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        resolve_hparams("croft", overrides)


def test_reference_training_defaults() -> None:
    hp = resolve_hparams("croft")
    reference = {"lr": 0.002, "optimizer": "sgd", "warmup_epochs": 1, "warmup_lr": 1e-5}
    reference |= {"batch_size": 32, "epochs": 30, "shots": 16, "n_ctx": 0, "gen_lr": 0.002}
    reference |= {"edr_energy": "mean", "edr_reduction": "sum", "lambda1": 5.0, "lambda2": 1.0}
    assert {key: hp[key] for key in reference} == reference


@pytest.mark.parametrize("ctx_init", ["", "a photo of the"])
def test_learned_context_trains_through_the_text_adapter(
    digits_context: MethodContext, backbone: Backbone, ctx_init: str
) -> None:
    before = checksum(backbone.model)
    method, hp = build(digits_context, n_ctx=4, ctx_init=ctx_init)
    assert method.prompt_learner is not None
    start = method.prompt_learner.context.detach().clone()
    train(method, digits_context.train, hp | {"epochs": 2})
    assert (method.prompt_learner.context.detach() - start).abs().max() > 1e-6
    features = digits_context.train.clean[:10]
    assert method.logits(features).shape == (10, len(digits_context.classnames))
    assert checksum(backbone.model) == before
    with pytest.raises(ConfigError):
        build(digits_context, n_ctx=2, ctx_init="a photo of the")
