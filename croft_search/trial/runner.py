"""One trial: a method with one configuration, trained from cached features on one or more
leave-one-domain-out splits, evaluated by the validation protocol. `run_trial(config)` is
what the search runs for every sample, and what `python -m croft_search.train` runs once."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from croft_search.backbones import Backbone, load_backbone
from croft_search.config import data_root
from croft_search.contract import (
    DEFAULT_CROP_SCALE,
    EMBEDDED_BACKBONE,
    TRIAL_SETTINGS,
    check_setting,
    open_set_names,
)
from croft_search.data import get_dataset_spec, positions, sample_shots
from croft_search.errors import ConfigError
from croft_search.features import FeatureCache, SplitFeatures
from croft_search.prompts import class_prompts
from croft_search.selection import objective
from croft_search.trial.evaluate import (
    build_score,
    capped,
    evaluate,
    validation_accuracy,
)
from croft_search.trial.loop import train_epochs
from trainables.base import REFERENCE_SCORE, Method, MethodContext, TrainData
from trainables.registry import get_method, resolve_hparams
from trainables.text import FrozenTextEncoder

# Called after every epoch with the validation metrics so far; True stops the trial.
ReportCallback = Callable[[dict[str, float]], bool | None]


@dataclass
class TrialResources:
    """What every trial of one search shares, loaded once: the frozen backbone (for the text
    encoder of prompt learners) and the cached features of each split."""

    backbone: Backbone
    splits: dict[str, SplitFeatures]
    class_text: torch.Tensor
    template: str
    dataset: str = ""

    @classmethod
    def load(
        cls,
        dataset: str,
        targets: Sequence[str],
        backbone: str = EMBEDDED_BACKBONE,
        pretrained: str | None = "default",
        views: int = 8,
        view_seed: int = 0,
        crop_scale: float = DEFAULT_CROP_SCALE,
        root: str | None = None,
        cache_dir: str | None = None,
        device: str = "cpu",
        progress: bool = False,
        test_open_sets: Sequence[str] | None = None,
        eval_protocol: str = "ours",
    ) -> TrialResources:
        spec = get_dataset_spec(dataset, root)
        loaded = load_backbone(backbone, pretrained, device=device)
        cache = FeatureCache(loaded, data_root(root), cache_dir=cache_dir, progress=progress)
        # The reference draws its test OOD images from every split list of the open set.
        open_splits = ("train", "val", "test") if eval_protocol == "reference" else ("test",)
        splits = {
            target: cache.split_features(
                spec.name,
                target,
                views=views,
                view_seed=view_seed,
                crop_scale=crop_scale,
                test_open_sets=test_open_sets,
                test_open_splits=open_splits,
            )
            for target in targets
        }
        classnames = next(iter(splits.values())).classnames
        class_text = cache.text_features(class_prompts(spec.prompt_template, classnames))
        return cls(loaded, splits, class_text, spec.prompt_template, spec.name)

    def text_encoder(self) -> FrozenTextEncoder:
        return FrozenTextEncoder(self.backbone)


_RESOURCES: dict[tuple, TrialResources] = {}


# The trial settings that decide which features a trial needs.
FEATURE_SETTINGS = (
    "dataset", "backbone", "pretrained", "views", "view_seed", "crop_scale", "data_root",
    "cache_dir", "device", "eval_protocol",
)  # fmt: skip


def load_resources(
    settings: Mapping[str, Any], targets: Sequence[str], progress: bool = False
) -> TrialResources:
    """The features and backbone that trials with these settings (`TRIAL_SETTINGS`, defaults
    filled in) need for ``targets``."""
    return TrialResources.load(
        settings["dataset"],
        targets,
        backbone=settings["backbone"],
        pretrained=settings["pretrained"],
        views=settings["views"],
        view_seed=settings["view_seed"],
        crop_scale=settings["crop_scale"],
        root=settings["data_root"],
        cache_dir=settings["cache_dir"],
        device=settings["device"],
        progress=progress,
        test_open_sets=open_set_names(settings) or None,
        eval_protocol=settings["eval_protocol"],
    )


def resources_for(settings: Mapping[str, Any], targets: Sequence[str]) -> TrialResources:
    """Resources for these settings, kept per process so repeated trials load nothing."""
    key = tuple(settings[k] for k in FEATURE_SETTINGS)
    key += tuple(targets) + tuple(open_set_names(settings))
    if key not in _RESOURCES:
        _RESOURCES[key] = load_resources(settings, targets)
    return _RESOURCES[key]


def split_config(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trial settings with defaults filled in, method hyper-parameters as given)."""
    settings = {key: config.get(key, default) for key, default in TRIAL_SETTINGS.items()}
    hparams = {key: value for key, value in config.items() if key not in TRIAL_SETTINGS}
    if not settings["method"]:
        raise ConfigError("a trial needs a method (config key 'method')")
    for key, value in settings.items():
        settings[key] = check_setting(key, value)
    return settings, hparams


def target_domains(dataset: str, target: str | Sequence[str]) -> list[str]:
    """The leave-one-domain-out targets: one name, a list, or "all"."""
    spec = get_dataset_spec(dataset)
    if isinstance(target, str):
        target = list(spec.target_domains) if target == "all" else [target]
    if not target:
        raise ConfigError("target_domain is empty; name a domain, several, or 'all'")
    return [spec.canonical_domain(t) for t in target]


def few_shot_train(
    split: SplitFeatures, shots: int, seed: int, per: str = "class_and_domain"
) -> TrainData:
    """The seeded k-shot training subset of a split (k per class and source domain, or as
    ``per`` says: `croft_search.data.SHOTS_PER`)."""
    row = positions(split.train_samples)
    chosen = sample_shots(split.train_samples, shots or None, seed, per)
    index = torch.as_tensor([row[s] for s in chosen], dtype=torch.long)
    return TrainData(
        views=split.train_views[index],
        clean=split.train_clean[index],
        labels=split.train_labels[index],
        domains=split.train_domains[index],
        source=split.train_views,
        rows=index,
    )


def few_shot_val(split: SplitFeatures, shots: int, seed: int) -> SplitFeatures:
    """The split with its validation set cut to ``shots`` images per class over the pooled
    source domains (Dassl's generate_fewshot_dataset on the val list), seeded; 0 keeps it."""
    if shots <= 0:
        return split
    index = capped(split.val_labels, shots, seed)
    return replace(
        split,
        val=split.val[index],
        val_labels=split.val_labels[index],
        val_domains=split.val_domains[index],
    )


def build_method(
    name: str,
    hp: dict[str, Any],
    resources: TrialResources,
    split: SplitFeatures,
    data: TrainData,
    device: torch.device,
) -> Method:
    """A freshly initialised method (seeded by ``hp["seed"]``) for one split."""
    context = MethodContext(
        classnames=split.classnames,
        template=resources.template,
        class_text=resources.class_text.to(device),
        logit_scale=resources.backbone.logit_scale,
        embed_dim=resources.backbone.embed_dim,
        train=data,
        device=device,
        dataset=resources.dataset,
        make_text_encoder=resources.text_encoder,
    )
    torch.manual_seed(hp["seed"])
    return get_method(name)(context, hp).to(device)


def run_trial(
    config: Mapping[str, Any],
    resources: TrialResources | None = None,
    report: ReportCallback | None = None,
) -> dict[str, Any]:
    """Train and evaluate one configuration; returns its metrics.

    With several target domains the splits train in lockstep, so the per-epoch report (for
    early stopping) is the mean over splits; final metrics are the means, plus every
    per-target figure as ``<target>/<metric>``."""
    settings, overrides = split_config(config)
    method_cls = get_method(settings["method"])
    hp = resolve_hparams(settings["method"], overrides, settings["recipe"])
    score_name = score_for(settings, method_cls)
    targets = target_domains(settings["dataset"], settings["target_domain"])
    resources = resources or resources_for(settings, targets)
    missing = [t for t in targets if t not in resources.splits]
    if missing:
        raise ConfigError(f"the loaded features hold no split for target domain(s) {missing}")

    device = torch.device(settings["device"])
    protocol = settings["eval_protocol"]
    started = time.perf_counter()
    runs = []
    for target in targets:
        split = few_shot_val(resources.splits[target], settings["val_shots"], hp["seed"])
        data = few_shot_train(split, hp["shots"], hp["seed"], settings["shots_per"])
        method = build_method(settings["method"], hp, resources, split, data, device)
        runs.append((target, split, data, method, train_epochs(method, data, hp)))
    best = [_BestEpoch() for _ in runs] if settings["checkpoint"] == "best_val" else None

    history: list[dict[str, float]] = []
    for epoch_rows in _lockstep([run[4] for run in runs]):
        if best is not None:
            for keeper, (_, split, _, method, _) in zip(best, runs, strict=True):
                keeper.offer(method, split, len(history))
        row = mean_rows(epoch_rows)
        if report is not None:
            validation = [
                evaluate(method, split, build_score(method, score_name, data), False)
                for _, split, data, method, _ in runs
            ]
            row |= mean_rows(validation)
            row["objective"] = objective(row, "val", settings["objective_weight"])
            history.append(row)
            if report(row):
                break
        else:
            history.append(row)
    train_seconds = time.perf_counter() - started

    per_target = {}
    for index, (target, split, data, method, _) in enumerate(runs):
        if best is not None:
            best[index].restore(method)
        per_target[target] = final_metrics(method, split, data, score_name, protocol, hp["seed"])
        if best is not None and best[index].epoch >= 0:
            per_target[target]["val_best_epoch"] = float(best[index].epoch)
    return trial_result(settings, score_name, per_target, len(history), train_seconds, resources)


def final_metrics(method: Method, split: SplitFeatures, data: TrainData, score_name: str,
                  protocol: str, seed: int) -> dict[str, float]:  # fmt: skip
    """A trained method's validation and test metrics on one split."""
    score = build_score(method, score_name, data)
    return evaluate(method, split, score, include_test=True, protocol=protocol, seed=seed)


def trial_result(
    settings: Mapping[str, Any],
    score_name: str,
    per_target: Mapping[str, dict[str, float]],
    epochs_run: int,
    train_seconds: float,
    resources: TrialResources,
) -> dict[str, Any]:
    """A trial's result from its splits' metrics: their means, each split's figures as
    ``<target>/<metric>`` where there are several, the objective and the trial's labels."""
    targets = list(per_target)
    result: dict[str, Any] = mean_rows(list(per_target.values()))
    for target, metrics in per_target.items():
        if len(targets) > 1:
            result |= {f"{target}/{key}": value for key, value in metrics.items()}
    result["objective"] = objective(result, settings["selection"], settings["objective_weight"])
    if any(isinstance(v, float) and math.isnan(v) for v in result.values()):
        raise FloatingPointError("the trial produced NaN metrics")
    result |= {
        "selection": settings["selection"],
        "score": score_name,
        "target_domains": ",".join(targets),
        "epochs_run": epochs_run,
        "train_seconds": train_seconds,
        "backbone_identity": resources.backbone.identity,
        "protocol": protocol_label(settings),
    }
    return result


def score_for(settings: Mapping[str, Any], method_cls: type[Method]) -> str:
    """The OOD score a trial reports: the configured one, else the recipe's default (energy
    under the reference recipe, the method's own otherwise)."""
    if settings["score"]:
        return settings["score"]
    return REFERENCE_SCORE if settings["recipe"] == "reference" else method_cls.default_score


def protocol_label(settings: Mapping[str, Any]) -> str:
    """The protocol settings of a trial in one string, recorded beside its metrics."""
    names = ",".join(open_set_names(settings)) or "default"
    return (
        f"eval={settings['eval_protocol']};checkpoint={settings['checkpoint']};"
        f"shots_per={settings['shots_per']};val_shots={settings['val_shots']};"
        f"crop_scale={settings['crop_scale']:g};recipe={settings['recipe']};"
        f"test_open_sets={names}"
    )


class _BestEpoch:
    """Dassl's best_val checkpoint: the weights of the epoch with the highest validation
    accuracy (strictly higher, so the earliest of tied epochs), never a test metric."""

    def __init__(self) -> None:
        self.accuracy = -math.inf
        self.epoch = -1
        self.state: dict[str, torch.Tensor] | None = None

    def offer(self, method: Method, split: SplitFeatures, epoch: int) -> None:
        accuracy = validation_accuracy(method, split)
        if accuracy > self.accuracy:
            self.accuracy, self.epoch = accuracy, epoch
            self.state = {k: v.detach().clone() for k, v in method.state_dict().items()}

    def restore(self, method: Method) -> None:
        if self.state is not None:
            method.load_state_dict(self.state)


def _lockstep(iterators: list) -> Any:
    """Advance every training generator one epoch at a time; stop when all are done."""
    while True:
        rows = []
        for iterator in iterators:
            row = next(iterator, None)
            if row is not None:
                rows.append(row)
        if not rows:
            return
        yield rows


def mean_rows(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    keys = dict.fromkeys(k for row in rows for k in row)
    means = {}
    for key in keys:
        values = [row[key] for row in rows if key in row]
        means[key] = sum(values) / len(values)
    return means
