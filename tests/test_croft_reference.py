"""CRoFT's variants: the reference variant against a transcription of the authors' training
step (CoOp/trainers/CRoFT.py, written out here in its own form), each switch on a small
case worked out by hand or by finite differences, and the general autograd step against the
hand-written objective where every switch has the paper's value."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from croft_search.backbones import load_backbone
from croft_search.errors import ConfigError
from croft_search.trial.loop import train
from trainables import croft_variants
from trainables.base import MethodContext, TrainData
from trainables.croft import CRoFT
from trainables.registry import get_method, resolve_hparams
from trainables.text import FrozenTextEncoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DIM, CLASSES = 6, 3
LOOP = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "warmup_epochs": 0, "epochs": 1}


def tiny(dataset: str = "PACS", batch: int = 6, **overrides: Any) -> tuple[CRoFT, TrainData]:
    """A float64 CRoFT with d = 6, K = 3, adapters off the identity, and one training batch
    (one view per image) as its training data."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(batch, DIM, generator=generator, dtype=torch.float64) * 3
    labels = torch.arange(batch) % CLASSES
    data = TrainData(
        views=features[:, None], clean=features, labels=labels, domains=torch.zeros_like(labels)
    )
    backbone = load_backbone("tiny-digits", pretrained=None)
    context = MethodContext(
        classnames=("zero", "one", "two"),
        template="{}",
        make_text_encoder=lambda: FrozenTextEncoder(backbone),
        class_text=torch.randn(CLASSES, DIM, generator=generator, dtype=torch.float64) * 2,
        logit_scale=20.0,
        embed_dim=DIM,
        train=data,
        device=torch.device("cpu"),
        dataset=dataset,
    )
    hp = resolve_hparams("croft", {"batch_size": batch, **LOOP, **overrides})
    method = get_method("croft")(context, hp).double()
    with torch.no_grad():
        method.image_adapter.add_(0.3 * torch.randn(DIM, DIM, generator=generator))
        method.text_adapter.add_(0.3 * torch.randn(DIM, DIM, generator=generator))
        if method.generator is not None:
            method.generator.add_(0.3 * torch.randn(DIM, DIM, generator=generator))
    return method, data


def reference_step(
    method: CRoFT, data: TrainData, dataset: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ``forward_backward`` of the reference trainer on one batch, transcribed: its
    Adapter (x @ fc.T), OODImgGen (x @ G), feature_perturbation, EDR (the 1e-4 delta shared
    by both adapters, f @ (W + delta)) and Dassl's model_backward_and_update (every
    optimiser, the graph retained). Its 1e-6 added to every norm is left out (0 here)."""
    hp = method.hp
    wi, wt, gen = (
        p.detach().clone().requires_grad_(True)
        for p in (method.image_adapter, method.text_adapter, method.generator)
    )
    options = {"lr": hp["lr"], "momentum": hp["momentum"], "weight_decay": hp["weight_decay"]}
    optimizers = [torch.optim.SGD([wi, wt], **options), torch.optim.SGD([gen], **options)]
    ri, rt, scale = method.ratio_image, method.ratio_text, method.logit_scale
    lambda1, lambda2 = hp["lambda1"], hp["lambda2"]
    f, g, y = data.clean, method.class_text, data.labels

    def norm(v: torch.Tensor) -> torch.Tensor:
        return v / v.norm(dim=-1, keepdim=True)

    def update(loss: torch.Tensor) -> None:
        for optimizer in optimizers:
            optimizer.zero_grad()
        loss.backward(retain_graph=True)
        for optimizer in optimizers:
            optimizer.step()

    x = norm(ri * (f @ wi.t()) + (1 - ri) * f)
    t = norm(rt * (g @ wt.t()) + (1 - rt) * g)
    f_zs, g_zs = norm(f), norm(g)
    logits = scale * x @ t.t()
    label_matrix = y.unsqueeze(1) == y.unsqueeze(0)

    def feature_perturbation() -> tuple[torch.Tensor, torch.Tensor]:
        cov = norm(x @ gen + x)
        loss = F.cross_entropy(scale * cov @ t.t(), y)
        return loss + lambda1 * (label_matrix * (cov @ x.t())).mean(), cov

    for _ in range(hp["gen_steps"]):
        update(feature_perturbation()[0])
    cov_zs = feature_perturbation()[1]
    disalign = (label_matrix * (cov_zs @ f_zs.t())).mean()
    cov = ri * cov_zs + (1 - ri) * (cov_zs @ wi)
    rows_zs, rows = f_zs, x
    if "VLCS" not in dataset and hp["gen_steps"] > 0:
        loss1 = F.cross_entropy(scale * cov @ t.t(), y) - lambda1 * disalign
        rows_zs, rows = torch.vstack([f_zs, cov_zs]), torch.vstack([x, cov])
    else:
        loss1 = F.cross_entropy(scale * cov_zs @ t.t(), y)
    delta = 0.0001 * torch.ones_like(wi)
    delta.requires_grad_(True)
    pred = torch.exp(rows @ t.t())
    new_i = norm(ri * (rows_zs @ (wi + delta)) + (1 - ri) * rows_zs)
    new_t = norm(rt * (g_zs @ (wt + delta)) + (1 - rt) * g_zs)
    pred_delta = torch.exp(new_i @ new_t.t()) - pred
    grad = torch.autograd.grad(pred_delta.mean(), delta, create_graph=True)[0]
    loss = F.cross_entropy(logits, y) + loss1 + lambda2 * (grad**2).sum()
    update(loss)
    return wi.detach(), wt.detach(), gen.detach()


@pytest.mark.parametrize("dataset", ["PACS", "VLCS"])
@pytest.mark.parametrize(
    "overrides",
    [
        {"lambda1": 5.0, "gen_steps": 1},
        {"lambda1": 5.0, "gen_steps": 3},
        {"lambda1": 5.0, "gen_steps": 0},
        {"lambda1": 0.0, "gen_steps": 1},
        {"lambda1": 15.0, "lambda2": 100.0, "gen_steps": 1, "ratio_image": 0.6},
    ],
)
def test_reference_variant_steps_as_the_authors_trainer(
    dataset: str, overrides: dict[str, Any]
) -> None:
    method, data = tiny(dataset, implementation="reference", **overrides)
    want = reference_step(method, data, dataset)
    train(method, data, method.hp)
    got = (method.image_adapter, method.text_adapter, method.generator)
    for name, a, b in zip(("Wi", "Wt", "G"), got, want, strict=True):
        torch.testing.assert_close(a.detach(), b, rtol=1e-9, atol=1e-12, msg=name)
    # Not trivially equal: every matrix moved.
    fresh, _ = tiny(dataset, implementation="reference", **overrides)
    for name, a, b in zip(("Wi", "Wt", "G"), got, fresh.parameters(), strict=True):
        assert (a.detach() - b.detach()).abs().max() > 1e-5, name


def test_the_reference_generator_moves_with_the_adapters_and_the_paper_one_alone() -> None:
    """Item 3/4: the reference steps every optimiser on the generator's loss (momentum and
    weight decay included); the paper's generator takes plain SGD steps at gen_lr alone."""
    for variant, adapters_move in (("paper", False), ("reference", True)):
        method, data = tiny(implementation=variant, gen_steps=2, lr=0.0, warmup_epochs=0)
        start = [p.detach().clone() for p in (method.image_adapter, method.generator)]
        losses = []

        def update(loss: torch.Tensor, method: CRoFT = method, losses: list = losses) -> None:
            losses.append(float(loss.detach()))
            params = method.trainable_parameters()
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            with torch.no_grad():
                for param, grad in zip(params, grads, strict=True):
                    if grad is not None:
                        param.sub_(0.1 * grad)

        method.training_loss(data.clean, data.labels, data.domains, update)
        assert len(losses) == (2 if variant == "reference" else 0)
        moved = (method.image_adapter.detach() - start[0]).abs().max() > 1e-6
        assert bool(moved) == adapters_move, variant
        assert (method.generator.detach() - start[1]).abs().max() > 1e-6


def test_lc_normalisation_by_hand() -> None:
    """Item 1: same-class pairs (0,0), (0,1), (1,0), (1,1), (2,2) of labels [a, a, b]."""
    shifted = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    partner = torch.tensor([[2.0, 0.0], [1.0, 3.0], [0.0, 4.0]])
    labels = torch.tensor([0, 0, 1])
    # shifted @ partner.T on the pairs: 2 + 1 + 0 + 3 + 4 = 10
    pairs = croft_variants.same_class_mean(shifted, partner, labels, "pairs")
    every = croft_variants.same_class_mean(shifted, partner, labels, "all")
    assert float(pairs) == pytest.approx(10 / 5)
    assert float(every) == pytest.approx(10 / 9)


def finite_difference_gradient(function, matrix: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    out = torch.zeros_like(matrix)
    for index in range(matrix.numel()):
        step = torch.zeros(matrix.numel(), dtype=matrix.dtype)
        step[index] = eps
        step = step.view_as(matrix)
        out.view(-1)[index] = (function(matrix + step) - function(matrix - step)) / (2 * eps)
    return out


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("transpose", [False, True])
def test_edr_perturbation_shared_delta_and_product_by_finite_differences(
    shared: bool, transpose: bool
) -> None:
    """Item 6: the penalty is the squared gradient of the mean energy at theta + delta,
    with one delta for both adapters (|gi + gt|^2) or one each (|gi|^2 + |gt|^2), and the
    adapters applied as f @ W.T or f @ W; the gradients here by central differences."""
    switches = {"edr_shared_delta": shared, "edr_transpose": transpose, "edr_delta": 1e-4}
    method, data = tiny(implementation="custom", lambda1=0.0, **switches)
    wi, wt = method.image_adapter.detach(), method.text_adapter.detach()
    f, g = data.clean, method.class_text
    ri, rt = method.ratio_image, method.ratio_text

    def energy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ma, mb = (a.T, b.T) if transpose else (a, b)
        image = F.normalize(ri * f @ ma + (1 - ri) * f, dim=-1)
        text = F.normalize(rt * g @ mb + (1 - rt) * g, dim=-1)
        return torch.exp(image @ text.T).mean()

    at = 1e-4 * torch.ones_like(wi)
    gi = finite_difference_gradient(lambda m: energy(m, wt + at), wi + at)
    gt = finite_difference_gradient(lambda m: energy(wi + at, m), wt + at)
    want = (gi + gt).pow(2).sum() if shared else gi.pow(2).sum() + gt.pow(2).sum()
    got = croft_variants.edr_term(method, f, method.raw_text(), None, None)
    assert float(got.detach()) == pytest.approx(float(want), rel=1e-6)
    assert float(want) > 1e-8


def test_stacked_shifted_rows_take_one_mean_over_both_blocks() -> None:
    """Item 6: with xc stacked, E is the mean over 2B x K, so the penalty is |(gx + gc)/2|^2,
    against |gx|^2 + |gc|^2 for two penalties."""
    switches = {"edr_stack_shifted": True, "edr_shifted_readapt": True}
    method, data = tiny(implementation="custom", lambda1=5.0, gen_steps=1, **switches)
    shifted = F.normalize(torch.randn(6, DIM, dtype=torch.float64), dim=-1)
    stacked = croft_variants.edr_term(method, data.clean, method.raw_text(), shifted, None)
    alone = method.hp | {"edr_stack_shifted": False}
    method.hp = alone
    separate = [
        croft_variants.edr_term(method, rows, method.raw_text(), None, None)
        for rows in (data.clean, shifted)
    ]
    # Both blocks' gradients from the separate penalties' own terms, recombined by hand.
    wi, wt = method.image_adapter, method.text_adapter

    def gradients(rows: torch.Tensor) -> list[torch.Tensor]:
        image = F.normalize(rows + method.ratio_image * rows @ (wi - torch.eye(DIM)).T, dim=-1)
        raw = method.raw_text()
        text = F.normalize(raw + method.ratio_text * raw @ (wt - torch.eye(DIM)).T, dim=-1)
        return list(torch.autograd.grad(torch.exp(image @ text.T).mean(), [wi, wt]))

    gx, gc = gradients(data.clean), gradients(shifted)
    want_stacked = sum(((a + b) / 2).pow(2).sum() for a, b in zip(gx, gc, strict=True))
    want_separate = [sum(g.pow(2).sum() for g in grads) for grads in (gx, gc)]
    torch.testing.assert_close(stacked.detach(), want_stacked.detach(), rtol=1e-9, atol=0.0)
    for got, want in zip(separate, want_separate, strict=True):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-9, atol=0.0)


PAPER_BRANCHES = [
    {"lambda1": 0.0},
    {"lambda1": 5.0, "gen_steps": 1},
    {"lambda1": 5.0, "gen_steps": 0},
    {"lambda1": 5.0, "edr_energy": "sum", "edr_reduction": "mean"},
    {"lambda1": 5.0, "edr_on_shifted": False},
    {"lambda1": 5.0, "ratio_image": 0.0},
    {"lambda1": 5.0, "ratio_text": 0.0},
]


@pytest.mark.parametrize("overrides", PAPER_BRANCHES)
def test_autograd_step_with_paper_switches_is_the_hand_written_objective(
    overrides: dict[str, Any],
) -> None:
    method, data = tiny(implementation="paper", **overrides)
    assert method.hand_written
    params = method.trainable_parameters()
    f, y = data.clean, data.labels
    want, want_parts = method.training_loss(f, y, data.domains)  # G steps first, by hand
    got, got_parts = croft_variants.training_loss(method, f, y, inner_steps=False)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert set(got_parts) == set(want_parts)
    grads = zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params), strict=True)
    for a, b in grads:
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_paper_generator_steps_match_in_both_implementations() -> None:
    hand, data = tiny(implementation="paper", lambda1=5.0, gen_steps=3, gen_lr=0.05)
    twin, _ = tiny(implementation="paper", lambda1=5.0, gen_steps=3, gen_lr=0.05)
    hand.training_loss(data.clean, data.labels, data.domains)
    croft_variants.training_loss(twin, data.clean, data.labels)
    moved = hand.generator.detach()
    torch.testing.assert_close(moved, twin.generator.detach(), rtol=1e-12, atol=1e-14)
    start = tiny(implementation="paper", lambda1=5.0)[0].generator.detach()
    assert (moved - start).abs().max() > 1e-4


def test_reference_lambda1_zero_keeps_the_generator_and_vlcs_drops_the_worst_case() -> None:
    paper, _ = tiny(implementation="paper", lambda1=0.0)
    reference, _ = tiny(implementation="reference", lambda1=0.0)
    assert paper.generator is None and reference.generator is not None
    assert reference.worst_case
    vlcs, _ = tiny("VLCS", implementation="reference", lambda1=5.0)
    assert vlcs.generator is not None and not vlcs.worst_case and vlcs.generator_in_main_step
    vlcs_paper, _ = tiny("VLCS", implementation="paper", lambda1=5.0)
    assert vlcs_paper.worst_case


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"implementation": "authors"},
            "implementation='authors' must be one of paper, reference, custom",
        ),
        (
            {"implementation": "reference", "lc_norm": "pairs"},
            "lc_norm='pairs' contradicts implementation=reference",
        ),
        (
            {"implementation": "paper", "edr_delta": 1e-4},
            "edr_delta=0.0001 contradicts implementation=paper",
        ),
        (
            {"implementation": "custom", "lc_norm": "some"},
            "lc_norm='some' must be one of pairs, all",
        ),
        ({"implementation": "custom", "gen_in_main_step": True}, "needs gen_optimizer=main"),
    ],
)
def test_bad_variant_settings_are_one_line_errors(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match="^[^\n]*$") as error:
        resolve_hparams("croft", overrides)
    assert message in str(error.value)


def test_variant_presets_fill_every_switch_and_custom_mixes_them() -> None:
    reference = resolve_hparams("croft", {"implementation": "reference"})
    assert {s.name: reference[s.name] for s in croft_variants.SWITCHES} == croft_variants.preset(
        "reference"
    )
    same = resolve_hparams("croft", {"implementation": "reference", "lc_norm": "all"})
    assert same["lc_norm"] == "all"
    mixed = resolve_hparams("croft", {"implementation": "custom", "lc_norm": "all"})
    assert mixed["lc_norm"] == "all" and mixed["edr_delta"] == 0.0
    assert croft_variants.is_paper(resolve_hparams("croft"))


SINGLE_SWITCH_ARMS = [
    {switch.name: switch.reference} for switch in croft_variants.SWITCHES
    if switch.name != "gen_in_main_step"
] + [{"gen_optimizer": "main", "gen_in_main_step": True}]  # fmt: skip


@pytest.mark.parametrize("arm", SINGLE_SWITCH_ARMS, ids=lambda arm: "+".join(arm))
def test_every_single_switch_trains_for_several_epochs(arm: dict[str, Any]) -> None:
    # One switch at the reference's value, the rest at the paper's: the arms of
    # ablation_croft_digits. Several epochs and batches, so that the optimiser sees steps
    # where some parameters have no gradient after others gained momentum.
    method, data = tiny(batch=4, implementation="custom", epochs=3, batch_size=2, **arm)
    before = {name: p.detach().clone() for name, p in method.named_parameters()}
    history = train(method, data, method.hp)
    assert len(history) == 3
    assert all(torch.isfinite(torch.tensor(row["ce"])) for row in history)
    moved = [name for name, p in method.named_parameters() if not torch.equal(p, before[name])]
    assert "image_adapter" in moved and "generator" in moved


def test_test_ratios_replace_the_trained_ones_in_evaluation_only() -> None:
    # The reference's open-set test scripts reload a model trained at (0.2, 0.5) with
    # ratio 0.5 and ratio_text 0.0: the text side is then zero-shot.
    method, data = tiny(test_ratio_image=0.5, test_ratio_text=0.0)
    plain, _ = tiny()
    method.eval()
    plain.eval()
    raw_text = method.raw_text()
    features = data.clean
    with torch.no_grad():
        image = F.normalize(0.5 * features @ method.image_adapter.T + 0.5 * features, dim=-1)
        expected = method.logit_scale * image @ F.normalize(raw_text, dim=-1).T
        torch.testing.assert_close(method.logits(features), expected)
        method.train()
        plain.train()
        torch.testing.assert_close(method.logits(features), plain.logits(features))


def _written_out(method: CRoFT, features: torch.Tensor) -> dict[str, torch.Tensor]:
    """x, t, xc and n(f) of one batch, from the weights, as the equations write them."""
    ri, rt = method.hp["ratio_image"], method.hp["ratio_text"]
    raw_text = method.raw_text()
    x = F.normalize(ri * features @ method.image_adapter.T + (1 - ri) * features, dim=-1)
    t = F.normalize(rt * raw_text @ method.text_adapter.T + (1 - rt) * raw_text, dim=-1)
    xc = F.normalize(x @ method.generator + x, dim=-1)
    return {"x": x, "t": t, "xc": xc, "zero_shot": F.normalize(features, dim=-1)}


def _pairs_mean(shifted: torch.Tensor, partner: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    same = (labels[:, None] == labels[None, :]).to(shifted.dtype)
    return (same * (shifted @ partner.T)).sum() / same.sum()


@pytest.mark.parametrize("readapt", [False, True])
@pytest.mark.parametrize("partner", ["adapted", "zero_shot"])
def test_worst_case_shift_term_target_and_partner_by_hand(readapt: bool, partner: str) -> None:
    method, data = tiny(
        implementation="custom", shift_readapt=readapt, shift_partner=partner,
        lambda1=15.0, lambda2=0.0, gen_steps=1,
    )  # fmt: skip
    parts = _written_out(method, data.clean)
    ri, scale = method.hp["ratio_image"], method.logit_scale
    target = parts["xc"]
    if readapt:  # CRoFT.py: ratio on the un-adapted part, W not transposed, no normalisation
        target = ri * parts["xc"] + (1 - ri) * parts["xc"] @ method.image_adapter
    lc = _pairs_mean(parts["xc"], parts["x"] if partner == "adapted" else parts["zero_shot"],
                     data.labels)  # fmt: skip
    expected = F.cross_entropy(scale * target @ parts["t"].T, data.labels) - 15.0 * lc
    _, terms = croft_variants.training_loss(method, data.clean, data.labels, inner_steps=False)
    torch.testing.assert_close(terms["shift"], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("term", ["ce_lc", "ce"])
def test_joint_shift_term_by_hand(term: str) -> None:
    method, data = tiny(
        implementation="custom", joint_shift_term=term, lambda1=5.0, lambda2=0.0, gen_steps=0
    )
    parts = _written_out(method, data.clean)
    expected = F.cross_entropy(method.logit_scale * parts["xc"] @ parts["t"].T, data.labels)
    if term == "ce_lc":
        expected = expected + 5.0 * _pairs_mean(parts["xc"], parts["x"], data.labels)
    _, terms = croft_variants.training_loss(method, data.clean, data.labels, inner_steps=False)
    torch.testing.assert_close(terms["shift"], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("in_main_step", [False, True])
def test_gen_in_main_step_decides_whether_the_main_loss_reaches_g(in_main_step: bool) -> None:
    method, data = tiny(
        implementation="custom", gen_optimizer="main", gen_in_main_step=in_main_step,
        lambda2=0.0, gen_steps=1,
    )  # fmt: skip
    loss, _ = croft_variants.training_loss(method, data.clean, data.labels, inner_steps=False)
    method.generator.grad = None
    loss.backward()
    if not in_main_step:
        assert method.generator.grad is None
        return
    parts = _written_out(method, data.clean)
    lc = _pairs_mean(parts["xc"], parts["x"], data.labels)
    shift = F.cross_entropy(method.logit_scale * parts["xc"] @ parts["t"].T, data.labels)
    (expected,) = torch.autograd.grad(shift - method.lambda1 * lc, [method.generator])
    torch.testing.assert_close(method.generator.grad, expected, rtol=1e-8, atol=1e-10)
