"""The shared loop, the hyper-parameter registry, run_trial's validation protocol and the
`croft_search.train` command, exercised with a minimal method defined here."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from croft_search.backbones import load_backbone
from croft_search.errors import ConfigError
from croft_search.train import main as train_main
from croft_search.trial.loop import (
    TrainingDiverged,
    build_optimizer,
    epoch_batches,
    fusable,
    learning_rate,
)
from croft_search.trial.runner import TrialResources, run_trial
from trainables.base import HParam, Method
from trainables.registry import get_method, register_method, resolve_hparams

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@register_method
class ResidualHead(Method):
    """CLIP logits of the features plus a learnable residual map: enough to train."""

    name = "_test_residual_head"
    hparams = {"epochs": HParam(3, low=0, high=100), "scale": HParam(1.0, low=0.0, high=10.0)}
    default_score = "mcm"

    def __init__(self, context, hp):
        super().__init__(context, hp)
        self.residual = nn.Linear(context.embed_dim, context.embed_dim, bias=False)
        nn.init.zeros_(self.residual.weight)
        self.register_buffer("text", context.class_text.clone())

    def logits(self, features, domains=None):
        adapted = features + self.hp["scale"] * self.residual(F.normalize(features, dim=-1))
        return self.clip_logits(adapted, self.text)


@register_method
class Exploding(ResidualHead):
    name = "_test_exploding"

    def logits(self, features, domains=None):
        return super().logits(features) * float("nan")


@pytest.fixture(scope="module")
def resources(digits_root, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return TrialResources.load(
        "digits", ["sketch", "painting"], pretrained=None, views=2,
        root=str(digits_root), cache_dir=str(cache),
    )  # fmt: skip


def config(**overrides):
    return {"method": "_test_residual_head", "target_domain": "sketch", "shots": 4} | overrides


EXPECTED_KEYS = {
    "val_acc", "val_auroc", "val_fpr95", "test_acc", "test_auroc", "test_fpr95",
    "test_aupr_in", "test_aupr_out", "objective", "train_seconds",
}  # fmt: skip


def test_run_trial_returns_every_metric_in_range(resources):
    result = run_trial(config(), resources)
    assert EXPECTED_KEYS <= set(result)
    for key in EXPECTED_KEYS - {"train_seconds"}:
        assert 0.0 <= result[key] <= 1.0, key
    assert result["selection"] == "val" and result["score"] == "mcm"
    assert result["epochs_run"] == 3
    assert result["objective"] == pytest.approx(0.5 * result["val_acc"] + 0.5 * result["val_auroc"])


def test_validation_metrics_never_see_test_data(resources):
    baseline = run_trial(config(), resources)
    split = resources.splits["sketch"]
    scrambled = TrialResources(
        resources.backbone,
        {"sketch": _replace(split, test=torch.randn_like(split.test),
                            test_open=torch.randn_like(split.test_open))},
        resources.class_text, resources.template,
    )  # fmt: skip
    changed = run_trial(config(), scrambled)
    for key in ("val_acc", "val_auroc", "val_fpr95", "objective"):
        assert changed[key] == baseline[key], key
    assert changed["test_acc"] != baseline["test_acc"]


def test_oracle_selection_uses_test_metrics_and_says_so(resources):
    result = run_trial(config(selection="oracle"), resources)
    assert result["selection"] == "oracle"
    assert result["objective"] == pytest.approx(
        0.5 * result["test_acc"] + 0.5 * result["test_auroc"]
    )


def test_same_seed_same_result_other_seed_other_result(resources):
    a = run_trial(config(seed=3), resources)
    b = run_trial(config(seed=3), resources)
    c = run_trial(config(seed=4), resources)
    assert a["val_acc"] == b["val_acc"] and a["test_auroc"] == b["test_auroc"]
    assert (c["val_auroc"], c["test_auroc"]) != (a["val_auroc"], a["test_auroc"])


def test_report_callback_sees_each_epoch_and_can_stop(resources):
    rows = []

    def report(row):
        rows.append(row)
        return len(rows) == 2

    result = run_trial(config(epochs=10), resources, report=report)
    assert result["epochs_run"] == 2
    assert [r["epoch"] for r in rows] == [0, 1]
    assert {"val_acc", "val_auroc", "objective", "lr", "ce"} <= set(rows[0])


def test_several_targets_train_in_lockstep_and_average(resources):
    cfg = config(target_domain=["sketch", "painting"])
    result = run_trial(cfg, resources)
    assert result["target_domains"] == "sketch,painting"
    mean = (result["sketch/test_acc"] + result["painting/test_acc"]) / 2
    assert result["test_acc"] == pytest.approx(mean)


def test_nan_training_fails_loudly(resources):
    with pytest.raises(TrainingDiverged, match="nan"):
        run_trial(config(method="_test_exploding"), resources)


def test_encoders_do_not_change(resources):
    before = {k: v.clone() for k, v in resources.backbone.model.state_dict().items()}
    run_trial(config(epochs=2), resources)
    after = resources.backbone.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_learning_rate_schedule_warmup_then_cosine():
    hp = {"lr": 0.1, "epochs": 4, "warmup_epochs": 1, "warmup_lr": 1e-5}
    assert learning_rate(0, hp) == 1e-5
    assert learning_rate(1, hp) == pytest.approx(0.1)
    assert learning_rate(3, hp) == pytest.approx(0.05 * (1 + math.cos(math.pi / 2)))


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_fused_optimiser_steps_like_the_default_one(name):
    hp = {**resolve_hparams("croft", {"optimizer": name, "weight_decay": 0.01}), "lr": 0.1}
    start = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    fused_weight, plain_weight = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    fused = build_optimizer([fused_weight], hp)
    assert fused.defaults["fused"] is True
    settings = {k: v for k, v in fused.defaults.items() if k != "decoupled_weight_decay"}
    plain = type(fused)([plain_weight], **{**settings, "fused": None})
    for step in range(3):
        for weight, optimizer in ((fused_weight, fused), (plain_weight, plain)):
            weight.grad = (step + 1.0) * weight.detach()
            optimizer.step()
    torch.testing.assert_close(fused_weight.detach(), plain_weight.detach())
    assert (fused_weight.detach() - start).abs().max() > 1e-3


def test_only_same_device_floating_parameters_are_fused():
    assert fusable([torch.zeros(2), torch.zeros(2, dtype=torch.float64)])
    assert not fusable([torch.zeros(2, dtype=torch.long)])
    assert not fusable([torch.zeros(2), torch.zeros(2, device="meta")])
    assert not fusable([torch.zeros(2, device="meta")])


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"lr_typo": 0.1}, "unknown hyper-parameter(s) lr_typo"),
        ({"lr": "fast"}, "must be of type float"),
        ({"lr": -1.0}, "below its minimum"),
        ({"epochs": 2.5}, "must be of type int"),
        ({"optimizer": "lbfgs"}, "must be one of sgd, adamw"),
    ],
)
def test_bad_hyperparameters(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_hparams("_test_residual_head", overrides)


def test_hyperparameters_are_coerced_from_strings():
    hp = resolve_hparams("_test_residual_head", {"lr": "1e-3", "epochs": "4"})
    assert hp["lr"] == 1e-3 and hp["epochs"] == 4


def test_unknown_method():
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        get_method("nope")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "nope"], "unknown method 'nope'"),
        (["--set", "bogus=1"], "unknown hyper-parameter(s) bogus"),
        (["--set", "lr=fast"], "must be of type float"),
        (["--set", "lr"], "--set expects key=value"),
        (["--target-domain", "moon"], "unknown domain 'moon'"),
        (["--score", "vibes"], "unknown OOD score 'vibes'"),
        (["--set", "dataset=PACS"], "with its own flag"),
    ],
)
def test_train_command_bad_input_is_one_line(extra, message, tmp_path, capsys):
    argv = ["--method", "_test_residual_head", "--target-domain", "sketch", *extra]
    with pytest.raises(SystemExit) as exit_info:
        train_main([*argv, "--cache-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


def test_train_command_writes_json(digits_root, tmp_path, capsys):
    weights = tmp_path / "random.pt"
    torch.save(load_backbone("tiny-digits", pretrained=None).model.state_dict(), weights)
    out = tmp_path / "metrics.json"
    argv = [
        "--method", "_test_residual_head", "--target-domain", "cartoon", "--views", "1",
        "--pretrained", str(weights), "--data-root", str(digits_root),
        "--cache-dir", str(tmp_path / "cache"), "--set", "shots=2", "--set", "epochs=1",
        "--json", str(out),
    ]  # fmt: skip
    assert train_main(argv) == 0
    metrics = json.loads(out.read_text())
    assert EXPECTED_KEYS <= set(metrics)
    assert metrics["target_domains"] == "cartoon" and metrics["epochs_run"] == 1
    assert "test_auroc" in capsys.readouterr().out

    # "all": every leave-one-domain-out split, each one's figures and their means.
    argv[argv.index("cartoon")] = "all"
    assert train_main(argv) == 0
    metrics = json.loads(out.read_text())
    domains = ("photo", "sketch", "cartoon", "painting")
    assert metrics["target_domains"] == ",".join(domains)
    for key in ("test_acc", "test_auroc", "val_acc", "val_auroc"):
        mean = sum(metrics[f"{d}/{key}"] for d in domains) / len(domains)
        assert metrics[key] == pytest.approx(mean), key
    assert metrics["objective"] == pytest.approx(
        0.5 * metrics["val_acc"] + 0.5 * metrics["val_auroc"]
    )


def _replace(split, **changes):
    from dataclasses import replace

    return replace(split, **changes)


def test_scores_get_logit_scale_and_features_by_what_they_declare(resources):
    # build_score supplies the model's logit_scale to a score whose parameters name it, and
    # evaluation hands test features to a score that reads them (needs_features), fitted
    # or not.
    from croft_search.scores import OODScore, score_parameters
    from croft_search.trial.evaluate import build_score, evaluate
    from croft_search.trial.runner import build_method, few_shot_train

    class FeatureNorm(OODScore):
        name = "_test_feature_norm"
        needs_features = True

        def score(self, logits, features=None):
            return -features.norm(dim=1)

    split = resources.splits["sketch"]
    data = few_shot_train(split, 4, seed=0)
    hp = resolve_hparams("_test_residual_head", {})
    method = build_method("_test_residual_head", hp, resources, split, data, torch.device("cpu"))
    assert "logit_scale" in score_parameters("mcm") and "logit_scale" not in score_parameters("msp")
    assert build_score(method, "mcm", data).logit_scale == method.logit_scale
    metrics = evaluate(method, split, FeatureNorm(), include_test=False)
    assert 0.0 <= metrics["val_auroc"] <= 1.0


def test_set_values_read_alike_in_every_command():
    from croft_search.search.space import read_cli_value
    from croft_search.train import parse_assignments

    values = parse_assignments(["lr=1e-3", "flag=true", "grid=[0, 1]", "name=text", "empty="])
    assert values == {"lr": 0.001, "flag": True, "grid": [0, 1], "name": "text", "empty": ""}
    assert isinstance(values["lr"], float)  # plain YAML 1.1 would keep "1e-3" a string
    assert all(read_cli_value(raw) == values[key] for key, raw in
               (("lr", "1e-3"), ("flag", "true"), ("name", "text")))  # fmt: skip


@pytest.mark.parametrize("name", ["views", "score", "device", "eval_protocol", "variant", "seeds"])
def test_a_method_cannot_take_a_trial_setting_name(name):
    # Such a hyper-parameter would be routed to the trial settings (or the space) silently.
    class Clashing(ResidualHead):
        hparams = {**ResidualHead.hparams, name: HParam(1, low=0, high=10)}

    Clashing.name = f"_test_clash_{name}"
    with pytest.raises(ConfigError, match=f"declares hyper-parameter.s. {name}, names of trial"):
        register_method(Clashing)


@pytest.mark.parametrize(
    "n, batch_size, drop_last, view_order",
    [(50, 8, False, "random"), (50, 8, True, "random"), (7, 8, True, "random"),
     (50, 16, False, "epoch")],
)  # fmt: skip
def test_an_epoch_draws_its_shuffle_then_each_batchs_views(n, batch_size, drop_last, view_order):
    """The loop's draws, batch by batch as Dassl's loader makes them: a permutation of the
    rows, then each batch's views from the same generator, epoch after epoch."""
    hp = {"batch_size": batch_size, "drop_last": drop_last, "view_order": view_order}
    got = torch.Generator().manual_seed(5)
    want = torch.Generator().manual_seed(5)
    for epoch in range(3):
        batches = list(epoch_batches(got, n, 4, epoch, hp))
        order = torch.randperm(n, generator=want)
        starts = range(0, n - n % batch_size if drop_last and n >= batch_size else n, batch_size)
        assert len(batches) == len(starts) > 0
        for (rows, views), start in zip(batches, starts, strict=True):
            expected = order[start : start + batch_size]
            assert torch.equal(rows, expected)
            if view_order == "epoch":
                assert torch.equal(views, torch.full_like(expected, epoch % 4))
            else:
                assert torch.equal(views, torch.randint(4, (len(expected),), generator=want))
