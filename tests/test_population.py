"""Populations: every member of a population trains and scores as it does alone.

For each method that batches, K members differing in seed, learning rate, momentum and
weight decay are trained as one population; each member's per-epoch loss log must equal
the shared loop's log for that member alone (`train_epochs`, over at least 50 steps) to
1e-5 relative, and its metrics what `run_trial` gives for its config to 1e-4. Then what a
population refuses, each a one-line error."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from croft_search.errors import ConfigError
from croft_search.trial.loop import TrainingDiverged, train_epochs
from croft_search.trial.population import (
    RUNG_OBJECTIVES,
    Halving,
    population_epochs,
    population_refusal,
    run_population,
    train_population,
)
from croft_search.trial.runner import (
    TrialResources,
    build_method,
    few_shot_train,
    few_shot_val,
    run_trial,
    split_config,
)
from trainables.base import HParam, MemberStep, Method
from trainables.registry import register_method, resolve_hparams

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TARGET = "sketch"
METRICS = ("val_acc", "val_auroc", "val_fpr95", "test_acc", "test_auroc", "test_fpr95")
# 3 source domains x 6 classes x shots images; batch sizes chosen for >= 50 steps in all.
BATCHABLE = {
    "zsclip": {"method": "zsclip"},
    "linear_probe": {"method": "linear_probe"},
    "plp": {"method": "plp", "epochs": 6, "shots": 16, "batch_size": 32},  # AdamW
    "tip_adapter_f": {"method": "tip_adapter_f", "epochs": 6, "shots": 16, "batch_size": 32},
    "clip_adapter": {"method": "clip_adapter", "epochs": 6, "shots": 16},
    "coop": {"method": "coop", "epochs": 6, "shots": 16, "n_ctx": 2, "ctx_init": ""},
    # One context per class: the members' prompts run under vmap, not on the stacks.
    "coop_class_specific": {"method": "coop", "epochs": 6, "shots": 16, "n_ctx": 2,
                            "ctx_init": "", "class_specific": True},
    "cocoop": {"method": "cocoop", "epochs": 6, "shots": 2, "batch_size": 4, "n_ctx": 2,
               "ctx_init": ""},
    # CRoFT's worst-case branch (the paper's default), its joint branch, without a
    # generator, and with learned prompts; its own weights and ratios differ per member.
    "croft": {"method": "croft", "epochs": 6, "shots": 16},
    "croft_joint": {"method": "croft", "epochs": 6, "shots": 16, "gen_steps": 0},
    "croft_no_generator": {"method": "croft", "epochs": 6, "shots": 16, "lambda1": 0.0},
    "croft_prompts": {"method": "croft", "epochs": 6, "shots": 16, "n_ctx": 2, "ctx_init": "",
                      "edr_energy": "sum", "edr_reduction": "mean"},
}  # fmt: skip
MEMBERS = (
    {"seed": 0, "lr": 0.002, "momentum": 0.9, "weight_decay": 5e-4},
    {"seed": 1, "lr": 0.01, "momentum": 0.0, "weight_decay": 0.1},
    {"seed": 7, "lr": 0.0005, "momentum": 0.5, "weight_decay": 0.0},
)
CROFT_MEMBERS = (
    {"lambda1": 5.0, "lambda2": 1.0, "ratio_image": 0.2, "ratio_text": 0.5, "gen_lr": 0.002},
    {"lambda1": 1.0, "lambda2": 20.0, "ratio_image": 0.6, "ratio_text": 0.1, "gen_lr": 0.05},
    {"lambda1": 12.0, "lambda2": 0.1, "ratio_image": 0.05, "ratio_text": 0.9, "gen_lr": 0.01},
)


@pytest.fixture(scope="module")
def resources(digits_root, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    # The shipped model: a random-init one scores ID and OOD images alike, where a weight
    # moving by float rounding reorders near-ties and AUROC tests nothing but the noise.
    return TrialResources.load("digits", [TARGET], views=2,
                               root=str(digits_root), cache_dir=str(cache))  # fmt: skip


def configs(case: str, target: str | list[str] = TARGET) -> list[dict]:
    base = {"target_domain": target, "views": 2, **BATCHABLE[case]}
    own = CROFT_MEMBERS if base["method"] == "croft" else ({},) * len(MEMBERS)
    members = [{**base, **member, **extra} for member, extra in zip(MEMBERS, own, strict=True)]
    if base.get("lambda1") == 0.0:
        members = [{**member, "lambda1": 0.0} for member in members]
    return members


def built(config: dict, resources: TrialResources, target: str = TARGET):
    """A member's method and data, built as run_trial builds them."""
    settings, overrides = split_config(config)
    hp = resolve_hparams(settings["method"], overrides, settings["recipe"])
    split = few_shot_val(resources.splits[target], settings["val_shots"], hp["seed"])
    data = few_shot_train(split, hp["shots"], hp["seed"], settings["shots_per"])
    method = build_method(settings["method"], hp, resources, split, data, torch.device("cpu"))
    return method, data, hp


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.parametrize("method", sorted(BATCHABLE))
def test_each_member_trains_as_it_does_alone(method, resources):
    members = [built(c, resources) for c in configs(method)]
    logs = train_population(
        [m for m, _, _ in members], [d for _, d, _ in members], [h for _, _, h in members]
    )
    for config, log in zip(configs(method), logs, strict=True):
        alone, data, hp = built(config, resources)
        expected = list(train_epochs(alone, data, hp))
        assert len(log) == len(expected)
        if expected:
            steps = -(-len(data) // hp["batch_size"]) * len(expected)
            assert steps >= 50, f"{method}: only {steps} steps compared"
        for got, want in zip(log, expected, strict=True):
            assert got.keys() == want.keys()
            for key, value in want.items():
                assert relative(got[key], value) < 1e-5, (method, got["epoch"], key)


@pytest.mark.parametrize("method", ["croft", "plp"])
def test_members_train_alike_from_one_shared_source_or_their_own_copies(method, resources):
    """Subsets of one split share its rows in the population's device pool; training sets
    that say nothing of their source are pooled as they are. Both train alike."""
    shared = [built(c, resources) for c in configs(method)]
    own = [built(c, resources) for c in configs(method)]
    assert all(d.source is shared[0][1].source is not None for _, d, _ in shared)
    logs = [
        train_population([m for m, _, _ in members], datas, [h for _, _, h in members])
        for members, datas in (
            (shared, [d for _, d, _ in shared]),
            (own, [dataclasses.replace(d, source=None, rows=None) for _, d, _ in own]),
        )
    ]
    assert logs[0] == logs[1]


@pytest.mark.parametrize("method", sorted(BATCHABLE))
def test_each_member_scores_what_run_trial_gives(method, resources):
    results = run_population(configs(method), resources)
    for config, result in zip(configs(method), results, strict=True):
        alone = run_trial(config, resources)
        for key in METRICS:
            assert result[key] == pytest.approx(alone[key], abs=1e-4), (method, key)
        assert result["protocol"] == alone["protocol"]
        assert result["epochs_run"] == alone["epochs_run"]
    # The members are different trials.
    assert len({round(r["val_auroc"], 6) for r in results}) > 1 or method in (
        "zsclip",
        "linear_probe",
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "method", ["croft", "croft_joint", "croft_prompts", "coop", "clip_adapter", "plp"]
)
def test_a_population_on_cuda_scores_what_run_trial_gives_there(method, resources):
    # The members' learning rates, momenta, weights and ratios are [K] tensors: on the
    # parameters' device, or a CUDA population fails on its first step.
    # The resources were loaded for the CPU: a prompt learner's text tower, which no method
    # owns, follows the prompts to the device.
    cuda = [{**config, "device": "cuda"} for config in configs(method)]
    try:
        results = run_population(cuda, resources)
        for config, result in zip(cuda, results, strict=True):
            alone = run_trial(config, resources)
            for key in METRICS:
                assert result[key] == pytest.approx(alone[key], abs=1e-4), (method, key)
    finally:
        resources.backbone.to("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["croft", "coop"])
def test_features_living_on_cuda_score_as_on_the_cpu(method, resources):
    def on_cuda(split):
        return dataclasses.replace(split, **{
            name: value.cuda() for name, value in vars(split).items()
            if isinstance(value, torch.Tensor)
        })  # fmt: skip

    moved = dataclasses.replace(
        resources, splits={name: on_cuda(split) for name, split in resources.splits.items()}
    )
    cuda = {**configs(method)[0], "device": "cuda"}
    try:
        expected = run_trial(cuda, resources)  # features on the CPU, the trial on CUDA
        for result in (run_trial(cuda, moved), run_population([cuda, cuda], moved)[1]):
            for key in METRICS:
                assert result[key] == pytest.approx(expected[key], abs=1e-4), (method, key)
    finally:
        resources.backbone.to("cpu")


@pytest.mark.parametrize(
    "config, reason",
    [
        ({"method": "croft", "implementation": "reference"}, "method croft"),
        ({"method": "dplclip"}, "method dplclip"),
        ({"method": "clip_adapter", "checkpoint": "best_val"}, "best_val"),
    ],
)
def test_what_does_not_batch_says_why(config, reason):
    assert reason in population_refusal(config)
    with pytest.raises(ConfigError, match=f"cannot train as a population: .*{reason}"):
        run_population([config, config])


def test_members_may_differ_only_in_the_member_hyper_parameters(resources):
    first, second = configs("clip_adapter")[:2]
    with pytest.raises(ConfigError, match="may differ only in lr, momentum"):
        run_population([first, {**second, "epochs": 2}], resources)
    with pytest.raises(ConfigError, match="may differ only in"):
        run_population([first, {**second, "ratio": 0.5}], resources)
    croft = configs("croft")
    with pytest.raises(ConfigError, match="lambda1, lambda2, .*none turns zero"):
        run_population([croft[0], {**croft[1], "lambda1": 0.0}], resources)
    assert run_population([], resources) == []


@register_method
class Steep(Method):
    """Exponentiated logits: a large learning rate overflows them to inf."""

    name = "_test_population_steep"
    hparams = {"epochs": HParam(3, low=0, high=100)}

    def __init__(self, context, hp):
        super().__init__(context, hp)
        self.head = nn.Linear(context.embed_dim, len(context.classnames))

    def logits(self, features, domains=None):
        return torch.exp(self.head(features))


@register_method
class StackedHead(Method):
    """A linear head whose population step takes the members' stacks as they are."""

    name = "_test_population_stacked"
    hparams = {"epochs": HParam(3, low=0, high=100)}
    seen: list[tuple[int, ...]] = []

    def population_broadcasts(self):
        return True

    def __init__(self, context, hp):
        super().__init__(context, hp)
        self.weight = nn.Parameter(torch.zeros(len(context.classnames), context.embed_dim))

    def logits(self, features, domains=None):
        return features @ self.weight.mT

    def population_loss(self, values, features, labels, domains):
        StackedHead.seen.append((features.dim(), self.weight.dim()))
        picked = torch.log_softmax(self.logits(features), -1).gather(-1, labels.unsqueeze(-1))
        ce = -picked.squeeze(-1).mean(-1)
        return MemberStep(ce, {"ce": ce})


def test_a_method_that_broadcasts_gets_the_stacks_and_each_member_its_own_result(resources):
    members = [{"method": StackedHead.name, "target_domain": TARGET, "views": 2, **member}
               for member in MEMBERS]  # fmt: skip
    StackedHead.seen.clear()
    results = run_population(members, resources)
    # [K, B, d] features and [K, classes, d] weights: no vmap between them.
    assert set(StackedHead.seen) == {(3, 3)}
    for config, result in zip(members, results, strict=True):
        alone = run_trial(config, resources)
        for key in METRICS:
            assert result[key] == pytest.approx(alone[key], abs=1e-4), key


@register_method
class RowSpaceHead(Method):
    """Class weights R W^T from fixed class rows R [C, d] and a trained W [d, d]: W is read
    only through R W^T, which the method declares (`population_row_spaces`)."""

    name = "_test_population_row_space"
    hparams = {"epochs": HParam(3, low=0, high=100)}
    seen: list[tuple[int, ...]] = []

    def population_broadcasts(self):
        return True

    def population_row_spaces(self):
        return {"weight": self.rows}

    def __init__(self, context, hp):
        super().__init__(context, hp)
        self.register_buffer("rows", context.class_text.detach().clone())
        self.weight = nn.Parameter(torch.eye(context.embed_dim))

    def logits(self, features, domains=None):
        return 20 * features @ (self.rows @ self.weight.mT).mT

    def population_loss(self, values, features, labels, domains):
        product = values["weight"].detach().requires_grad_(True)  # R W^T, [K, C, d]
        RowSpaceHead.seen.append(tuple(product.shape))
        picked = torch.log_softmax(20 * features @ product.mT, -1).gather(-1, labels[..., None])
        ce = -picked.squeeze(-1).mean(-1)
        (grad,) = torch.autograd.grad(ce.sum(), product)
        return MemberStep(ce.detach(), {"ce": ce.detach()}, gradients={"weight": grad})


def test_a_row_space_parameter_trains_as_the_dense_one_alone(resources):
    """A parameter a method declares in a row space trains by the population's SGD as
    torch's SGD trains the whole matrix alone (momentum and weight decay per member), and
    each member's module gets the dense matrix back."""
    members = [{"method": RowSpaceHead.name, "target_domain": TARGET, "views": 2, **member}
               for member in MEMBERS]  # fmt: skip
    RowSpaceHead.seen.clear()
    built_members = [built(config, resources) for config in members]
    logs = train_population(*(list(column) for column in zip(*built_members, strict=True)))
    dim, classes = resources.backbone.embed_dim, built_members[0][0].rows.shape[0]
    assert set(RowSpaceHead.seen) == {(len(members), classes, dim)}
    for config, log, (trained, _, _) in zip(members, logs, built_members, strict=True):
        alone, data, hp = built(config, resources)
        expected = list(train_epochs(alone, data, hp))
        assert [row["ce"] for row in log] == pytest.approx([r["ce"] for r in expected], rel=1e-5)
        torch.testing.assert_close(trained.weight, alone.weight, rtol=1e-5, atol=1e-6)
        assert (alone.weight - torch.eye(dim)).abs().max() > 1e-3


@register_method
class RowSpaceWithoutGradient(RowSpaceHead):
    """Declares a row space but hands back no gradient for it."""

    name = "_test_population_row_space_no_gradient"

    def population_loss(self, values, features, labels, domains):
        step = super().population_loss(values, features, labels, domains)
        return MemberStep(step.loss, step.parts)


def test_a_row_space_parameter_without_its_gradient_is_named(resources):
    members = [{"method": RowSpaceWithoutGradient.name, "target_domain": TARGET, "views": 2,
                **member} for member in MEMBERS]  # fmt: skip
    with pytest.raises(RuntimeError, match="no gradient for the row-space parameter.* weight"):
        run_population(members, resources)


def test_croft_declares_its_text_adapter_in_the_template_features_row_space(resources):
    """With the template's text features the text adapter only acts on them; with learned
    prompts (features that move) or an adapter that does not train, nothing is declared."""
    template = built(configs("croft")[0], resources)[0]
    (rows,) = template.population_row_spaces().values()
    assert list(template.population_row_spaces()) == ["text_adapter"]
    torch.testing.assert_close(rows, template.raw_text())
    prompts = built(configs("croft_prompts")[0], resources)[0]
    fixed = built({**configs("croft")[0], "ratio_text": 0.0}, resources)[0]
    assert prompts.population_row_spaces() == fixed.population_row_spaces() == {}


def test_a_diverging_member_is_named(resources):
    base = {"method": Steep.name, "target_domain": TARGET, "views": 2}
    members = [{**base, "lr": 1e-6}, {**base, "lr": 10.0, "momentum": 0.99}]
    with pytest.raises(TrainingDiverged, match="member 1: loss became"):
        run_population(members, resources)


def test_successive_halving_stops_members_at_the_rungs_with_what_they_reached(resources):
    base = {"method": "croft", "target_domain": TARGET, "views": 2, "epochs": 4, "shots": 4}
    members = [
        {**base, **member, "lambda2": lam}
        for member, lam in zip(
            (*MEMBERS, {"seed": 3, "lr": 0.004}), (0.5, 2.0, 8.0, 30.0), strict=True
        )
    ]
    halving = Halving.asha(grace_period=1, reduction_factor=2, max_t=4)
    assert halving.rungs == (1, 2)
    results = run_population(members, resources, halving)
    stopped = [r for r in results if r.get("status") == "stopped"]
    assert sorted(r["epochs_run"] for r in stopped) == [1, 1, 2]
    # Every member, stopped or not, carries one share of the population's training time.
    assert len({r["train_seconds"] for r in results}) == 1 and results[0]["train_seconds"] > 0
    for config, result in zip(members, results, strict=True):
        epochs = result["epochs_run"]
        # The trial alone, its report stopping it after the same epochs (as ASHA would).
        alone = run_trial(config, resources, report=lambda row, e=epochs: row["epoch"] + 1 >= e)
        for key in ("val_acc", "val_auroc", "objective"):
            assert result[key] == pytest.approx(alone[key], abs=1e-4), (epochs, key)
        assert ("test_acc" in result) == (result.get("status") != "stopped")
    # At the first rung the two stopped had the lower validation objectives.
    first_rung = [r for r in stopped if r["epochs_run"] == 1]
    survivors = [m for m, r in zip(members, results, strict=True) if r["epochs_run"] > 1]
    at_one = [run_trial(m, resources, report=lambda row: True)["objective"] for m in survivors]
    assert max(r["objective"] for r in first_rung) <= min(at_one) + 1e-12


def test_asha_cutoff_from_earlier_trials_at_a_rung():
    """Beside the population's own halving, a member must reach the top third (factor 3)
    of what earlier trials reached at the rung: sorted [0.8, 0.9, 0.95], the 2/3 quantile
    at position 2 * 2/3 lies a third of the way from 0.9 to 0.95, at 0.9167."""
    halving = Halving((5,), 3, {5: (0.9, 0.8, 0.95)})
    assert halving.survivors(5, {0: 0.5, 1: 0.85}) == []
    assert halving.survivors(5, {0: 0.5, 1: 0.92}) == [1]
    assert halving.survivors(5, {0: 0.5, 1: 0.91}) == []  # its own values set no bar
    assert halving.survivors(15, {0: 0.5, 1: 0.85}) == [1]  # nothing seen there yet
    assert Halving((5,), 3).survivors(5, {k: 0.1 * k for k in range(7)}) == [6, 5]


def test_halving_holds_members_to_what_earlier_trials_reached_at_the_rung(resources):
    base = {"method": "croft", "target_domain": TARGET, "views": 2, "epochs": 3, "shots": 4}
    members = [{**base, "seed": seed} for seed in (0, 1)]
    free = run_population(members, resources, Halving((1,), 2))
    assert sorted(r["epochs_run"] for r in free) == [1, 3]
    for result in free:  # each carries what it reached at the rung
        assert set(result[RUNG_OBJECTIVES]) == {1}
        if result.get("status") == "stopped":
            assert result[RUNG_OBJECTIVES][1] == result["objective"]
    # Earlier trials all reached more (objectives are at most 1): both stop at the rung.
    held = run_population(members, resources, Halving((1,), 2, {1: (2.0, 2.0, 2.0)}))
    assert [(r.get("status"), r["epochs_run"]) for r in held] == [("stopped", 1)] * 2
    # Earlier trials all reached less: the population halves as it does alone.
    low = run_population(members, resources, Halving((1,), 2, {1: (-1.0,) * 5}))
    assert [r["epochs_run"] for r in low] == [r["epochs_run"] for r in free]


@pytest.mark.parametrize("out", [1, 0])  # 0: the member whose module runs every step
def test_a_stopped_member_leaves_the_program_with_the_weights_it_had(out, resources):
    """Halving takes a member out after an epoch it reads (a rung): it gets no more log
    rows, its module keeps the weights of that epoch, in evaluation mode, and the others
    go on as alone."""
    members = [built(c, resources) for c in configs("croft")]
    active = torch.ones(len(members), dtype=torch.bool)
    epochs = population_epochs([m for m, _, _ in members], [d for _, d, _ in members],
                               [h for _, _, h in members], active, read_after=(1,))  # fmt: skip
    logs = [next(epochs)]
    active[out] = False
    logs += list(epochs)
    assert [row is None for row in logs[1]] == [k == out for k in range(3)]
    stopped, data, hp = built(configs("croft")[out], resources)
    list(train_epochs(stopped, data, {**hp, "epochs": 1}))
    for name, value in stopped.state_dict().items():
        got = members[out][0].state_dict()[name]
        torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-6)
    assert not any(method.training for method, _, _ in members)
    for k in {0, 1, 2} - {out}:
        alone, data, hp = built(configs("croft")[k], resources)
        expected = list(train_epochs(alone, data, hp))
        assert len(expected) == len(logs) > 2
        for got, want in zip((epoch[k] for epoch in logs), expected, strict=True):
            assert relative(got["ce"], want["ce"]) < 1e-5


@pytest.fixture(scope="module")
def two_targets(digits_root, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache2")
    return TrialResources.load("digits", ["sketch", "painting"], views=2,
                               root=str(digits_root), cache_dir=str(cache))  # fmt: skip


def test_halving_over_several_target_domains_ranks_by_their_mean(two_targets):
    """A member trains one split per target domain in lockstep, as run_trial does; the
    rung compares the mean over the splits, which run_trial reports."""
    base = {"method": "croft", "target_domain": ["sketch", "painting"], "views": 2,
            "epochs": 3, "shots": 4}  # fmt: skip
    members = [{**base, "seed": seed, "lambda2": lam} for seed, lam in ((0, 0.5), (1, 20.0))]
    results = run_population(members, two_targets, Halving((1,), 2))
    assert sorted(r.get("status", "ok") for r in results) == ["ok", "stopped"]
    for config, result in zip(members, results, strict=True):
        epochs = result["epochs_run"]
        alone = run_trial(config, two_targets, report=lambda row, e=epochs: row["epoch"] + 1 >= e)
        for key in ("val_acc", "val_auroc", "objective"):
            assert result[key] == pytest.approx(alone[key], abs=1e-4), (epochs, key)
        if result.get("status") != "stopped":
            assert result["sketch/test_acc"] == pytest.approx(alone["sketch/test_acc"], abs=1e-4)


@pytest.mark.parametrize("method", ["croft", "croft_prompts", "tip_adapter_f"])
def test_members_of_different_target_domains_train_in_one_program_as_alone(method, two_targets):
    """A program may hold members of several target domains (a population's splits train
    as one): each trains on its own domain's rows as it does alone."""
    pairs = [(c, t) for t in ("sketch", "painting") for c in configs(method)[:2]]
    members = [built(c, two_targets, t) for c, t in pairs]
    assert members[0][1].source is not members[-1][1].source
    logs = train_population(
        [m for m, _, _ in members], [d for _, d, _ in members], [h for _, _, h in members]
    )
    for (config, target), log in zip(pairs, logs, strict=True):
        alone, data, hp = built(config, two_targets, target)
        expected = list(train_epochs(alone, data, hp))
        assert len(log) == len(expected) > 0
        for got, want in zip(log, expected, strict=True):
            for key, value in want.items():
                assert relative(got[key], value) < 1e-5, (method, target, key)


@pytest.mark.parametrize("method", sorted(BATCHABLE))
def test_each_member_over_several_target_domains_scores_what_run_trial_gives(method, two_targets):
    members = configs(method, ["sketch", "painting"])
    results = run_population(members, two_targets)
    for config, result in zip(members, results, strict=True):
        alone = run_trial(config, two_targets)
        for key in ("val_acc", "val_auroc", "sketch/test_acc", "painting/test_auroc",
                    "painting/test_fpr95"):  # fmt: skip
            assert result[key] == pytest.approx(alone[key], abs=1e-4), (method, key)


def test_target_domains_apart_or_in_one_program_score_alike(two_targets):
    members = configs("croft_prompts", ["sketch", "painting"])
    together = run_population(members, two_targets)
    apart = run_population(members, two_targets, rows_per_program=1)
    for joined, alone in zip(together, apart, strict=True):
        for key in ("val_acc", "val_auroc", "sketch/test_acc", "painting/test_fpr95"):
            assert joined[key] == pytest.approx(alone[key], abs=1e-4), key
