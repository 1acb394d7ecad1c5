"""The protocol trial settings (shots_per, val_shots, checkpoint, eval_protocol,
test_open_sets) and the metric conventions they use, against hand-worked values and the
reference code's rules (docs/croft_reference.md)."""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn

from croft_search.backbones import load_backbone
from croft_search.data import Sample, sample_shots
from croft_search.errors import ConfigError, DataError
from croft_search.features import FeatureCache, SplitFeatures
from croft_search.metrics import (
    fpr_at_percentile,
    fpr_at_recall_nearest,
    ood_metrics,
)
from croft_search.prepare import main as prepare_main
from croft_search.scores import get_score
from croft_search.search.space import load_space
from croft_search.train import main as train_main
from croft_search.trial.evaluate import REFERENCE_KNN_KS, capped, evaluate, reference_knn_bank
from croft_search.trial.loop import train_epochs
from croft_search.trial.runner import TrialResources, few_shot_val, run_trial
from trainables.base import HParam, Method, MethodContext, TrainData
from trainables.registry import get_method, method_names, register_method, resolve_hparams

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------- metric conventions

# 20 ID scores 1..20 and five OOD scores, worked by hand:
#   ours: 95% recall needs 19 IDs, threshold 2; OOD >= 2: 19.5, 10.5, 2.5 -> 3/5.
#   dassl: numpy's 5th percentile of 1..20 is 1.95; OOD > 1.95 adds 1.97 -> 4/5.
#   metric_utils: recall 19/20 is met exactly at thresholds 2 and 1.97; the reversed curve
#     meets 1.97 (4 false positives) first -> 4/5.
#   openood: OOD positive; 95% of 5 OOD needs all 5, so everything at or below 19.5 is
#     called OOD, 19 of 20 IDs -> 0.95.
#   AUROC: ID above each OOD: 1 + 10 + 19 + 20 + 18 = 68 of 100 pairs.
HAND_IDS = np.arange(1.0, 21.0)
HAND_OOD = np.array([19.5, 10.5, 1.97, 0.5, 2.5])


def test_fpr95_conventions_on_hand_worked_scores():
    expected = {"ours": 0.6, "dassl": 0.8, "metric_utils": 0.8, "openood": 0.95}
    for convention, fpr95 in expected.items():
        metrics = ood_metrics(HAND_IDS, HAND_OOD, convention)
        assert metrics["fpr95"] == pytest.approx(fpr95), convention
        assert metrics["auroc"] == pytest.approx(0.68), convention
    assert fpr_at_percentile(HAND_IDS, HAND_OOD) == pytest.approx(0.8)
    assert fpr_at_recall_nearest(HAND_IDS, HAND_OOD) == pytest.approx(0.8)


def test_openood_auprs_are_trapezoidal_areas():
    # Ranked by score: OOD 3, ID 2, OOD 1, ID 0. ID positive, thresholds from the top:
    # (recall, precision) = (0, 0), (1/2, 1/2), (1/2, 1/3), (1, 1/2), plus the end point
    # (0, 1); the trapezoids over recall: 0 + (1/2 + 1/3) / 4 + 0 ... = 1/8 + 5/24 = 1/3.
    # OOD positive ranks by -score the same way round (ID, OOD, ID, OOD): 1/3 too.
    ids, ood = np.array([2.0, 0.0]), np.array([3.0, 1.0])
    metrics = ood_metrics(ids, ood, "openood")
    assert metrics["aupr_in"] == pytest.approx(1 / 3)
    assert metrics["aupr_out"] == pytest.approx(1 / 3)
    assert metrics["auroc"] == pytest.approx(0.25)
    # Average precision (ours) is the step sum instead: ID positive 1/2 * 1/2 + 1/2 * 1/2.
    assert ood_metrics(ids, ood)["aupr_in"] == pytest.approx(0.5)


def _hendrycks_fpr(ids: np.ndarray, ood: np.ndarray, level: float = 0.95) -> float:
    """fpr_and_fdr_at_recall of the reference's CoOp/metric_utils.py, restated step by step
    (ID positive, distinct thresholds from the highest score down)."""
    scores = np.concatenate([ids, ood])
    positive = np.concatenate([np.ones(len(ids), bool), np.zeros(len(ood), bool)])
    order = np.argsort(scores, kind="mergesort")[::-1]
    scores, positive = scores[order], positive[order]
    thresholds = [i for i in range(len(scores) - 1) if scores[i] != scores[i + 1]]
    thresholds.append(len(scores) - 1)
    curve = []
    for end in thresholds:
        tp = int(positive[: end + 1].sum())
        curve.append((tp / len(ids), end + 1 - tp))
    last = next(i for i, (recall, _) in enumerate(curve) if recall == curve[-1][0])
    kept = curve[last::-1] + [(1.0, 0)]
    best = min(range(len(kept)), key=lambda i: (abs(kept[i][0] - level), i))
    return kept[best][1] / len(ood)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.integers(-6, 6), min_size=1, max_size=25),
    st.lists(st.integers(-6, 6), min_size=1, max_size=25),
)
def test_nearest_recall_fpr_matches_the_reference_rule(ids, ood):
    ids, ood = np.array(ids, float) / 2, np.array(ood, float) / 2
    assert fpr_at_recall_nearest(ids, ood) == pytest.approx(_hendrycks_fpr(ids, ood))


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.floats(-5, 5), min_size=1, max_size=30),
    st.lists(st.floats(-5, 5), min_size=1, max_size=30),
)
def test_percentile_fpr_matches_its_definition(ids, ood):
    ids, ood = np.array(ids), np.array(ood)
    ranked = np.sort(ids)
    position = 0.05 * (len(ranked) - 1)
    low = int(np.floor(position))
    high = min(low + 1, len(ranked) - 1)
    threshold = ranked[low] + (position - low) * (ranked[high] - ranked[low])
    expected = sum(o > threshold for o in ood) / len(ood)
    assert fpr_at_percentile(ids, ood) == pytest.approx(expected)


def test_unknown_convention_is_one_line():
    with pytest.raises(ConfigError, match="unknown metric convention 'hendrycks'"):
        ood_metrics(HAND_IDS, HAND_OOD, "hendrycks")


# ------------------------------------------------------------------------------ shot sampling


def pacs_like(per_group: int = 20, small_class: int | None = None) -> list[Sample]:
    """7 classes x 3 source domains, ``per_group`` images each (4 for ``small_class``)."""
    return [
        Sample(Path(f"/d/{domain}/{label}/{index}.png"), label, f"c{label}", domain)
        for domain in ("art_painting", "cartoon", "photo")
        for label in range(7)
        for index in range(4 if label == small_class else per_group)
    ]


def test_dassl_balance_draws_per_domain_whatever_the_class():
    samples = pacs_like()
    picked = sample_shots(samples, 16, seed=0, per="dassl_balance")
    # int(16 / 3) = 5 images from each domain for each of the 7 classes.
    assert len(picked) == 7 * 3 * 5
    assert Counter(s.domain for s in picked) == {"art_painting": 35, "cartoon": 35, "photo": 35}
    assert set(picked) <= set(samples)
    # Each class's draw ignores the class, so the classes come out unbalanced and an image
    # can be drawn twice; this happens for most seeds.
    draws = [sample_shots(samples, 16, seed=seed, per="dassl_balance") for seed in range(8)]
    assert any(len(set(d)) < len(d) for d in draws)
    assert any(len(set(Counter(s.label for s in d).values())) > 1 for d in draws)
    # Reproducible and independent of the input order.
    shuffled = list(samples)
    random.Random(1).shuffle(shuffled)
    assert sample_shots(shuffled, 16, seed=0, per="dassl_balance") == picked
    assert sample_shots(samples, 16, seed=1, per="dassl_balance") != picked


def test_dassl_balance_at_four_shots_or_fewer_draws_per_class():
    samples = pacs_like()
    for shots in (1, 4):
        picked = sample_shots(samples, shots, seed=0, per="dassl_balance")
        assert picked == sample_shots(samples, shots, seed=0, per="class")
        assert Counter(s.label for s in picked) == dict.fromkeys(range(7), shots)


def test_dassl_balance_keeps_every_image_of_a_small_class():
    samples = pacs_like(small_class=6)  # class 6 has 3 x 4 = 12 < 16 images
    picked = sample_shots(samples, 16, seed=0, per="dassl_balance")
    small = [s for s in samples if s.label == 6]
    assert len(picked) == 6 * 3 * 5 + len(small)
    assert Counter(picked)[small[0]] >= 1 and all(s in picked for s in small)


def test_shots_per_class_and_per_class_and_domain():
    samples = pacs_like()
    per_class = sample_shots(samples, 16, seed=0, per="class")
    assert Counter(s.label for s in per_class) == dict.fromkeys(range(7), 16)
    both = sample_shots(samples, 16, seed=0)
    assert Counter((s.label, s.domain) for s in both) == {
        (label, domain): 16 for label in range(7) for domain in ("art_painting", "cartoon", "photo")
    }
    assert sample_shots(samples, 0, seed=0, per="dassl_balance") == tuple(
        sorted(samples, key=lambda s: (s.domain, s.label, s.path.as_posix()))
    )


def test_unknown_shots_per_is_one_line():
    with pytest.raises(ConfigError, match="shots_per 'domain' unknown"):
        sample_shots(pacs_like(), 4, seed=0, per="domain")


def test_capped_keeps_at_most_k_per_class_seeded():
    labels = torch.tensor([0] * 700 + [1] * 20 + [2] * 500)
    kept = capped(labels, 500, seed=1)
    assert Counter(labels[kept].tolist()) == {0: 500, 1: 20, 2: 500}
    assert torch.equal(kept, kept.sort().values) and len(set(kept.tolist())) == len(kept)
    assert torch.equal(capped(labels, 500, seed=1), kept)
    assert not torch.equal(capped(labels, 500, seed=2), kept)


# --------------------------------------------------------------------- a split built by hand


class RawLogits(Method):
    """The cached features are the logits: every score is then worked out by hand."""

    name = "_protocol_raw_logits"

    def logits(self, features, domains=None):
        return features


def hand_split() -> SplitFeatures:
    """Two classes; ID test rows whose max logits are 3, 2, 1, 4, 5 (the 2 and the 5 are
    misclassified); two test open sets: "near" (scores 2.5, 0.5) and "far" (150 images of
    class 0 at score 10, 10 of class 1 at -10)."""
    test = torch.tensor([[3.0, 0], [0, 2], [1, 0], [0, 4], [5, 0]])
    near = torch.tensor([[2.5, 0], [0, 0.5]])
    far = torch.cat([torch.full((150, 2), 10.0), torch.full((10, 2), -10.0)])
    return SplitFeatures(
        classnames=("a", "b"),
        domains=("s",),
        train_clean=test,
        train_views=test[:, None],
        train_labels=torch.tensor([0, 0, 0, 1, 1]),
        train_domains=torch.zeros(5, dtype=torch.long),
        val=test,
        val_labels=torch.tensor([0, 0, 0, 1, 1]),
        val_domains=torch.zeros(5, dtype=torch.long),
        test=test,
        test_labels=torch.tensor([0, 0, 0, 1, 1]),
        val_open=near,
        test_open=torch.cat([near, far]),
        target_domain="t",
        backbone_identity="hand",
        test_open_names=("near", "far"),
        test_open_set_ids=torch.tensor([0] * 2 + [1] * 160),
        test_open_classes=torch.tensor([0, 1] + [0] * 150 + [1] * 10),
    )


def raw_logits_method(split: SplitFeatures) -> Method:
    data = TrainData(split.train_views, split.train_clean, split.train_labels, split.train_domains)
    context = MethodContext(
        classnames=split.classnames, template="{}", class_text=torch.zeros(2, 2),
        logit_scale=1.0, embed_dim=2, train=data, device=torch.device("cpu"),
    )  # fmt: skip
    return RawLogits(context, {})


def test_eval_protocols_on_a_hand_worked_split():
    split = hand_split()
    method = raw_logits_method(split)
    score = get_score("maxlogit")
    ours = evaluate(method, split, score, protocol="ours")
    reference = evaluate(method, split, score, protocol="reference")
    openood = evaluate(method, split, score, protocol="openood")
    # ours: all five IDs; near: ID above 2.5: 3, 4, 5; above 0.5: all -> 8/10. far: only the
    # 10 OOD at -10 are below any ID -> 50/800. FPR95 takes every ID (threshold 1).
    assert ours["test_auroc_near"] == pytest.approx(0.8)
    assert ours["test_auroc_far"] == pytest.approx(50 / 800)
    assert ours["test_fpr95_near"] == pytest.approx(0.5)
    assert ours["test_fpr95_far"] == pytest.approx(150 / 160)
    # reference: the correctly classified IDs only (3, 1, 4), the far set capped at 100
    # images of class 0 (its 10 of class 1 stay): near 5/6, far 30/330; Dassl's threshold
    # is the 5th percentile of (1, 3, 4) = 1.2.
    assert reference["test_auroc_near"] == pytest.approx(5 / 6)
    assert reference["test_auroc_far"] == pytest.approx(30 / 330)
    assert reference["test_fpr95_near"] == pytest.approx(0.5)
    assert reference["test_fpr95_far"] == pytest.approx(100 / 110)
    # openood: our sampling, OOD-positive FPR: near needs both OOD (the 0.5 one), calling the
    # IDs 2 and 1 OOD -> 2/5; far needs 152 of 160, so every ID is called OOD -> 1.
    assert openood["test_auroc_near"] == pytest.approx(0.8)
    assert openood["test_fpr95_near"] == pytest.approx(0.4)
    assert openood["test_fpr95_far"] == pytest.approx(1.0)
    for result in (ours, reference, openood):
        for key in ("auroc", "fpr95", "aupr_in", "aupr_out"):
            mean = (result[f"test_{key}_near"] + result[f"test_{key}_far"]) / 2
            assert result[f"test_{key}"] == pytest.approx(mean), key
        # Validation never changes with the protocol: selection stays the same.
        assert result["val_auroc"] == ours["val_auroc"] and result["val_acc"] == 0.6
        assert result["test_acc"] == pytest.approx(0.6)


def test_few_shot_val_cuts_the_validation_split_per_class():
    split = hand_split()
    cut = few_shot_val(split, 2, seed=0)
    assert Counter(cut.val_labels.tolist()) == {0: 2, 1: 2}
    rows = [split.val.tolist().index(row) for row in cut.val.tolist()]
    assert split.val_labels[rows].tolist() == cut.val_labels.tolist()
    assert torch.equal(cut.test, split.test) and torch.equal(cut.train_clean, split.train_clean)
    assert few_shot_val(split, 0, seed=0) is split


# ------------------------------------------------------------------------ whole trials, digits


@register_method
class _Jumpy(Method):
    """CLIP logits plus noise drawn afresh after every training step (a buffer counts the
    steps, so a checkpoint holds it): validation accuracy goes up and down by epoch."""

    name = "_protocol_jumpy"
    hparams = {"epochs": HParam(6, low=0, high=100)}

    def __init__(self, context, hp):
        super().__init__(context, hp)
        self.scale = nn.Parameter(torch.ones(()))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("text", context.class_text.clone())

    def training_loss(self, features, labels, domains, update=None):
        self.steps += 1
        return super().training_loss(features, labels, domains, update)

    def logits(self, features, domains=None):
        generator = torch.Generator().manual_seed(int(self.steps))
        noise = torch.randn(len(features), len(self.text), generator=generator)
        return self.scale * self.clip_logits(features, self.text) + 4.0 * noise


@pytest.fixture(scope="module")
def resources(digits_root, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    common = {"pretrained": "default", "views": 2, "root": str(digits_root), "cache_dir": cache}
    sets = ["digits_open_test", "digits_open_val"]
    return {
        "ours": TrialResources.load("digits", ["sketch"], **common),
        "two_sets": TrialResources.load("digits", ["sketch"], test_open_sets=sets, **common),
        "reference": TrialResources.load("digits", ["sketch"], eval_protocol="reference", **common),
    }


def config(**overrides):
    trial = {"method": "clip_adapter", "target_domain": "sketch", "shots": 4, "epochs": 2}
    return trial | overrides


def epochs_seen(resources, **overrides):
    rows = []
    result = run_trial(config(**overrides), resources, report=lambda row: rows.append(row))
    return result, [row["val_acc"] for row in rows]


def test_best_val_checkpoint_reports_the_best_validation_epoch(resources):
    jumpy = {"method": "_protocol_jumpy", "epochs": 6}
    result, accuracies = epochs_seen(resources["ours"], checkpoint="best_val", **jumpy)
    best = int(np.argmax(accuracies))  # the first of tied epochs, as Dassl's strict ">"
    assert best not in (0, len(accuracies) - 1)  # neither the first nor the last epoch
    assert result["val_best_epoch"] == best
    assert result["val_acc"] == pytest.approx(accuracies[best])
    last, accuracies_last = epochs_seen(resources["ours"], checkpoint="last", **jumpy)
    assert accuracies_last == accuracies
    assert last["val_acc"] == pytest.approx(accuracies[-1]) and "val_best_epoch" not in last
    assert "checkpoint=best_val" in result["protocol"]


def test_val_shots_changes_validation_only_through_the_validation_split(resources):
    whole = run_trial(config(), resources["ours"])
    cut = run_trial(config(val_shots=2), resources["ours"])
    assert cut["test_acc"] == whole["test_acc"] and cut["test_auroc"] == whole["test_auroc"]
    assert cut["val_acc"] != whole["val_acc"] or cut["val_auroc"] != whole["val_auroc"]
    assert "val_shots=2" in cut["protocol"]


def test_several_test_open_sets_give_each_set_and_their_mean(resources):
    result = run_trial(config(), resources["two_sets"])
    for key in ("auroc", "fpr95"):
        per_set = [result[f"test_{key}_digits_open_test"], result[f"test_{key}_digits_open_val"]]
        assert result[f"test_{key}"] == pytest.approx(sum(per_set) / 2)
    alone = run_trial(config(), resources["ours"])
    assert alone["test_auroc"] == pytest.approx(result["test_auroc_digits_open_test"])
    label = run_trial(config(test_open_sets="digits_open_test,digits_open_val"),
                      resources["two_sets"])["protocol"]  # fmt: skip
    assert "test_open_sets=digits_open_test,digits_open_val" in label


def test_reference_protocol_sweeps_k_for_knn(resources):
    result = run_trial(config(score="knn", eval_protocol="reference"), resources["reference"])
    for k in REFERENCE_KNN_KS:
        assert 0.0 <= result[f"test_knn{k}_auroc"] <= 1.0
        assert 0.0 <= result[f"test_knn{k}_fpr95"] <= 1.0
    # The score reported as test_auroc is the default k of the sweep's bank.
    assert result["test_auroc"] == pytest.approx(result["test_knn10_auroc"])
    ours = run_trial(config(score="knn"), resources["ours"])
    assert "test_knn10_auroc" not in ours
    assert ours["val_auroc"] == result["val_auroc"]  # validation follows ours either way


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"eval_protocol": "nope"}, "eval_protocol='nope' is not allowed"),
        ({"checkpoint": "first"}, "checkpoint='first' is not allowed"),
        ({"shots_per": "domain"}, "shots_per='domain' is not allowed"),
        ({"val_shots": -1}, "val_shots must be an integer >= 0"),
        ({"val_shots": 1.5}, "val_shots must be an integer >= 0"),
        ({"test_open_sets": "PACS"}, "PACS is not an open-set dataset"),
        ({"test_open_sets": "Imagenette"}, "unknown dataset 'Imagenette'"),
    ],
)
def test_bad_protocol_values(resources, overrides, message):
    with pytest.raises(ConfigError, match=message):
        run_trial(config(**overrides), resources["ours"])


@pytest.mark.parametrize(
    "fixed, message",
    [
        (
            "eval_protocol: nope",
            "fixed.eval_protocol: eval_protocol='nope' is not allowed; expected one of ours",
        ),
        (
            "checkpoint: first",
            "fixed.checkpoint: checkpoint='first' is not allowed; expected one of last",
        ),
    ],
)
def test_bad_protocol_values_in_a_space(tmp_path, fixed, message):
    path = tmp_path / "bad.yaml"
    path.write_text(f"method: croft\nfixed: {{epochs: 1, {fixed}}}\nnum_samples: 1\n")
    with pytest.raises(ConfigError, match=message):
        load_space(str(path))


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--eval-protocol", "nope", "argument --eval-protocol: invalid choice: 'nope'"),
        ("--checkpoint", "first", "argument --checkpoint: invalid choice: 'first'"),
        ("--val-shots", "some", "argument --val-shots: invalid int value: 'some'"),
    ],
)
def test_train_command_bad_protocol_flag_is_one_line(flag, value, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--method", "croft", flag, value, "--cache-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


def test_train_command_runs_the_reference_protocol(digits_root, tmp_path):
    out = tmp_path / "metrics.json"
    argv = [
        "--method", "_protocol_jumpy", "--target-domain", "sketch", "--views", "1",
        "--data-root", str(digits_root), "--cache-dir", str(tmp_path / "cache"),
        "--set", "epochs=2", "--eval-protocol", "reference", "--checkpoint", "best_val",
        "--shots-per", "class", "--val-shots", "3", "--json", str(out),
    ]  # fmt: skip
    assert train_main(argv) == 0
    metrics = json.loads(out.read_text())
    assert metrics["protocol"] == (
        "eval=reference;checkpoint=best_val;shots_per=class;val_shots=3;crop_scale=0.5;recipe=ours;"
        "test_open_sets=default"
    )
    assert metrics["val_best_epoch"] in (0.0, 1.0)


# ------------------------------------------------------------------- Caltech101 overlap removal


def write_caltech(root: Path, classes: list[str], lists: tuple[str, ...] = ("test",)) -> None:
    """Two images a class (three with three lists), image i in list ``lists[i % n]``."""
    folder = root / "caltech-101"
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    for label, classname in enumerate(classes):
        for index in range(max(2, len(lists))):
            relpath = f"{classname}/image_{index}.jpg"
            path = folder / "101_ObjectCategories" / relpath
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = np.full((8, 8, 3), 20 * label + 100 * index, dtype=np.uint8)
            Image.fromarray(pixels).save(path)
            split[lists[index % len(lists)]].append([relpath, label, classname])
    (folder / "split_zhou_Caltech101.json").write_text(json.dumps(split))


def test_caltech101_drops_the_classes_the_reference_removes(tmp_path):
    classes = ["airplane", "chair", "elephant", "face", "pizza", "trilobite"]
    write_caltech(tmp_path, classes)
    backbone = load_backbone("tiny-digits", pretrained=None)
    cache = FeatureCache(backbone, tmp_path, cache_dir=str(tmp_path / "cache"))
    # PACS: elephant (an ID class), face (person) and airplane (lost by its spelling there).
    kept = {"PACS": ["chair", "pizza", "trilobite"], "VLCS": ["elephant", "pizza", "trilobite"]}
    for id_dataset, names in kept.items():
        _, _, class_index = cache.open_set_rows(["Caltech101"], ("test",), id_dataset=id_dataset)
        assert sorted({classes[i] for i in class_index.tolist()}) == names, id_dataset
        assert len(class_index) == 2 * len(names)
    _, _, every = cache.open_set_rows(["Caltech101"], ("test",), id_dataset="digits")
    assert len(every) == 2 * len(classes)


def test_an_open_set_emptied_by_the_removal_is_a_data_error(tmp_path):
    write_caltech(tmp_path, ["elephant", "face"])
    backbone = load_backbone("tiny-digits", pretrained=None)
    cache = FeatureCache(backbone, tmp_path, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="open set Caltech101 .test. has no images left for PACS"):
        cache.open_set_rows(["Caltech101"], ("test",), id_dataset="PACS")


# ------------------------------------------------------------------------------ augmentation


@register_method
class _Recorder(Method):
    """Keeps the training features it is given; its one parameter makes the loop run."""

    name = "_protocol_recorder"

    def __init__(self, context, hp):
        super().__init__(context, hp)
        self.weight = nn.Parameter(torch.zeros(()))
        self.seen: list[torch.Tensor] = []

    def logits(self, features, domains=None):
        return features[:, :2] * self.weight

    def training_loss(self, features, labels, domains, update=None):
        self.seen.append(features[:, 0].detach().clone())
        return super().training_loss(features, labels, domains, update)


def views_seen(view_order: str, epochs: int = 5, n_views: int = 3) -> list[set[float]]:
    """The view indices each epoch trained on, for 10 images whose view v is all v."""
    views = torch.arange(n_views, dtype=torch.float).repeat(10, 1)[:, :, None].expand(-1, -1, 2)
    data = TrainData(views, views[:, 0], torch.zeros(10, dtype=torch.long), torch.zeros(10).long())
    context = MethodContext(
        classnames=("a", "b"), template="{}", class_text=torch.zeros(2, 2), logit_scale=1.0,
        embed_dim=2, train=data, device=torch.device("cpu"),
    )  # fmt: skip
    given = {"epochs": epochs, "batch_size": 4, "view_order": view_order}
    method = _Recorder(context, resolve_hparams("_protocol_recorder", given))
    list(train_epochs(method, data, method.hp))
    steps_per_epoch = 3  # 10 images in batches of 4
    return [
        set(torch.cat(method.seen[e * steps_per_epoch : (e + 1) * steps_per_epoch]).tolist())
        for e in range(epochs)
    ]


def test_view_order_epoch_gives_every_image_view_epoch_mod_views():
    assert views_seen("epoch") == [{0.0}, {1.0}, {2.0}, {0.0}, {1.0}]
    mixed = views_seen("random")
    assert all(len(seen) > 1 for seen in mixed)  # each step draws any view per image


@pytest.mark.parametrize("value", [0, 0.0, 1.5, -0.2, "wide", True])
def test_bad_crop_scale_is_one_line(resources, value):
    with pytest.raises(ConfigError, match="crop_scale must be a number in .0, 1."):
        run_trial(config(crop_scale=value), resources["ours"])


def test_bad_crop_scale_in_a_space_and_in_prepare(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("method: croft\nfixed: {epochs: 1, crop_scale: 2}\nnum_samples: 1\n")
    with pytest.raises(ConfigError, match="crop_scale must be a number in"):
        load_space(str(path))
    with pytest.raises(SystemExit) as exit_info:
        prepare_main(["--crop-scale", "0", "--cache-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "crop_scale must be a number in (0, 1]" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- recipes


def test_every_reference_recipe_resolves():
    for name in method_names():
        hp = resolve_hparams(name, {}, "reference")
        for key, value in get_method(name).reference_recipe.items():
            assert hp[key] == value, (name, key)


def test_reference_recipes_are_the_reference_configs():
    # CoOp/configs/trainers/*/ViT_ep30.yaml, CoOp/dassl/config/defaults.py and the scripts.
    tip = resolve_hparams("tip_adapter_f", {}, "reference")
    assert (tip["optimizer"], tip["lr"], tip["epochs"], tip["alpha"], tip["beta"]) == (
        "sgd", 0.001, 50, 1.0, 10.0,
    )  # fmt: skip
    assert tip["weight_decay"] == 0.1 and tip["batch_size"] == 32
    cocoop = resolve_hparams("cocoop", {}, "reference")
    assert (cocoop["n_ctx"], cocoop["batch_size"], cocoop["epochs"]) == (16, 4, 30)
    dplclip = resolve_hparams("dplclip", {}, "reference")
    assert dplclip["domain_context"] == "mlp_then_mean" and dplclip["cross_domain_logits"]
    croft = resolve_hparams("croft", {}, "reference")
    assert croft["implementation"] == "reference" and croft["lambda1"] == 15.0
    assert croft["lc_norm"] == "all" and croft["weight_decay"] == 0.1
    ours = resolve_hparams("tip_adapter_f", {})
    assert (ours["optimizer"], ours["epochs"]) == ("adamw", 20)


def test_a_configured_value_wins_over_the_recipe():
    tip = resolve_hparams("tip_adapter_f", {"lr": 0.01}, "reference")
    assert tip["lr"] == 0.01 and tip["epochs"] == 50
    croft = resolve_hparams("croft", {"implementation": "paper"}, "reference")
    assert croft["implementation"] == "paper" and croft["lc_norm"] == "pairs"


def test_the_reference_recipe_scores_by_energy(resources):
    result = run_trial(config(recipe="reference", epochs=1), resources["ours"])
    assert result["score"] == "energy" and "recipe=reference" in result["protocol"]
    assert run_trial(config(epochs=1), resources["ours"])["score"] == "mcm"
    chosen = run_trial(config(recipe="reference", epochs=1, score="msp"), resources["ours"])
    assert chosen["score"] == "msp"


def test_unknown_recipe_is_one_line(resources, tmp_path, capsys):
    with pytest.raises(ConfigError, match="recipe='authors' is not allowed"):
        run_trial(config(recipe="authors"), resources["ours"])
    with pytest.raises(ConfigError, match="recipe='authors' is not allowed"):
        resolve_hparams("croft", {}, "authors")
    with pytest.raises(SystemExit):
        train_main(["--method", "croft", "--recipe", "authors", "--cache-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert "argument --recipe: invalid choice: 'authors'" in err and len(err.splitlines()) == 1


def steps_taken(images: int, batch_size: int, drop_last: bool) -> int:
    views = torch.zeros(images, 1, 2)
    data = TrainData(views, views[:, 0], torch.zeros(images).long(), torch.zeros(images).long())
    context = MethodContext(
        classnames=("a", "b"), template="{}", class_text=torch.zeros(2, 2), logit_scale=1.0,
        embed_dim=2, train=data, device=torch.device("cpu"),
    )  # fmt: skip
    given = {"epochs": 1, "batch_size": batch_size, "drop_last": drop_last}
    method = _Recorder(context, resolve_hparams("_protocol_recorder", given))
    list(train_epochs(method, data, method.hp))
    return len(method.seen)


def test_drop_last_skips_the_incomplete_batch_as_dassl_does():
    # Dassl: drop_last = is_train and len(data) >= batch_size (CoOp/dassl/data/data_manager.py).
    assert steps_taken(105, 32, drop_last=True) == 3  # 9 images unseen in the epoch
    assert steps_taken(105, 32, drop_last=False) == 4
    assert steps_taken(96, 32, drop_last=True) == 3
    assert steps_taken(20, 32, drop_last=True) == 1  # smaller than a batch: kept
    assert resolve_hparams("croft", {}, "reference")["drop_last"] is True
    assert resolve_hparams("croft", {})["drop_last"] is False


def test_the_reference_pools_ood_images_from_every_split_list(tmp_path):
    write_caltech(tmp_path, ["pizza", "trilobite"], lists=("train", "val", "test"))
    cache = FeatureCache(load_backbone("tiny-digits", pretrained=None), tmp_path,
                         cache_dir=str(tmp_path / "cache"))  # fmt: skip
    pooled, set_ids, classes = cache.open_set_rows(["Caltech101"], ("train", "val", "test"))
    test_only, _, _ = cache.open_set_rows(["Caltech101"], ("test",))
    assert len(pooled) == 6 and len(test_only) == 2
    assert set_ids.tolist() == [0] * 6 and sorted(classes.tolist()) == [0, 0, 0, 1, 1, 1]


def test_the_reference_knn_bank_is_500_per_class_of_the_whole_train_split():
    split = hand_split()
    train = torch.randn(610, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0] * 600 + [1] * 10)
    split = replace(split, train_clean=train, train_views=train[:, None], train_labels=labels,
                    train_domains=torch.zeros(610, dtype=torch.long))  # fmt: skip
    bank = reference_knn_bank(split, seed=0)
    assert Counter(bank.labels.tolist()) == {0: 500, 1: 10}
    rows = {tuple(row) for row in train.tolist()}
    assert all(tuple(row) in rows for row in bank.clean.tolist())
    assert len({tuple(row) for row in bank.clean.tolist()}) == 510
