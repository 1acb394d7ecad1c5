"""Evaluation shared by every method: logits and embeddings from cached features, an OOD
score, and the validation and test metrics of the protocol in `croft_search.selection`."""

from __future__ import annotations

import dataclasses

import torch

from croft_search.features import SplitFeatures
from croft_search.metrics import accuracy, ood_metrics
from croft_search.scores import OODScore, get_score, score_parameters
from trainables.base import Method, TrainData

EVAL_BATCH = 1024
# The reference's caps (CoOp/datasets/PACS_Caltech101.py and the other *_<open set>.py) and
# the k it sweeps for KNN (scripts/CRoFT/test_setup2_knn.py).
REFERENCE_ID_PER_CLASS = 500
REFERENCE_OOD_PER_CLASS = 100
REFERENCE_KNN_KS = (1, 5, 10, 25, 50, 100, 200, 300, 400, 500)


@torch.no_grad()
def predict(
    method: Method, features: torch.Tensor, domains: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, embeddings) of raw features [N, d].

    Batch-dependent methods (DPLCLIP) see one domain per batch, as at test time in the
    reference: rows are grouped by ``domains`` when given, else the set is one domain."""
    method.eval()
    device = _device(method)
    if features.shape[0] == 0:
        empty = torch.empty(0, 0)
        return empty, empty
    groups = [torch.arange(len(features))]
    if domains is not None and method.batch_dependent:
        domains = domains.cpu()
        groups = [torch.nonzero(domains == d).flatten() for d in torch.unique(domains)]
    logits: list[tuple[torch.Tensor, torch.Tensor]] = []
    embeddings: list[torch.Tensor] = []
    for rows in groups:
        for start in range(0, len(rows), EVAL_BATCH):
            index = rows[start : start + EVAL_BATCH]
            batch = features[index].to(device)
            logits.append((index, method.logits(batch, None).float().cpu()))
            embeddings.append(method.embed(batch).float().cpu())
    order = torch.cat([index for index, _ in logits])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    return torch.cat([value for _, value in logits])[inverse], torch.cat(embeddings)[inverse]


def _device(method: Method) -> torch.device:
    for tensor in (*method.parameters(), *method.buffers()):
        return tensor.device
    return torch.device("cpu")


# Evaluation combines `predict`'s outputs, on the CPU, with these: features may live on
# a device, their labels and indices are brought to the CPU.
_SPLIT_LABELS = ("train_labels", "train_domains", "val_labels", "val_domains", "test_labels",
                 "test_open_set_ids", "test_open_classes")  # fmt: skip


def _labels_on_cpu(split: SplitFeatures) -> SplitFeatures:
    moved = {name: getattr(split, name) for name in _SPLIT_LABELS}
    moved = {name: value.cpu() for name, value in moved.items() if value is not None}
    return dataclasses.replace(split, **moved)


def build_score(method: Method, name: str | None, train: TrainData) -> OODScore:
    """The OOD score ``name`` (the method's default when None), fitted where it needs the
    training embeddings (KNN, Mahalanobis); a score of CLIP's cosines gets the model's
    logit scale."""
    name = name or method.default_score
    params = {"logit_scale": method.logit_scale} if "logit_scale" in score_parameters(name) else {}
    score = get_score(name, **params)
    if score.needs_fit:
        _, embeddings = predict(method, train.clean, train.domains)
        score.fit(embeddings, train.labels.cpu())
    return score


def _apply(score: OODScore, logits: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    return score.score(logits, embeddings if score.needs_features else None)


def capped(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Row indices keeping at most ``per_class`` rows of each label, a seeded draw (Dassl's
    generate_fewshot_dataset(num_shots=per_class)), in row order."""
    keep = []
    for label in torch.unique(labels).tolist():
        rows = torch.nonzero(labels == label).flatten()
        generator = torch.Generator().manual_seed(seed * 7919 + int(label) + 1)
        keep.append(rows[torch.randperm(len(rows), generator=generator)[:per_class]])
    if not keep:
        return torch.empty(0, dtype=torch.long)
    return torch.cat(keep).sort().values


def reference_knn_bank(split: SplitFeatures, seed: int) -> TrainData:
    """The reference's KNN feature bank: its "val" loader, 500 images per class of the
    source domains' whole training split (not the few-shot subset). Under the reference
    protocol every feature-fitted score is fitted on it for the test metrics."""
    index = capped(split.train_labels, REFERENCE_ID_PER_CLASS, seed)
    clean = split.train_clean[index]
    return TrainData(clean[:, None], clean, split.train_labels[index], split.train_domains[index])


def validation_accuracy(method: Method, split: SplitFeatures) -> float:
    split = _labels_on_cpu(split)
    logits, _ = predict(method, split.val, split.val_domains)
    return accuracy(logits, split.val_labels)


def _test_detection(
    split: SplitFeatures,
    score: OODScore,
    test: tuple[torch.Tensor, torch.Tensor],
    open_set: tuple[torch.Tensor, torch.Tensor],
    protocol: str,
    seed: int,
) -> dict[str, float]:
    """test_auroc, test_fpr95, test_aupr_in, test_aupr_out under ``protocol`` from the
    (logits, embeddings) of the target domain and of the test open sets; with several test
    open sets, also each set's as ``test_<metric>_<set>``, the plain keys their mean."""
    logits, embeddings = test
    open_logits, open_embeddings = open_set
    id_rows = torch.arange(len(logits))
    if protocol == "reference":
        id_rows = capped(split.test_labels, REFERENCE_ID_PER_CLASS, seed)
    names = split.test_open_names or ("",)
    set_ids = split.test_open_set_ids
    if set_ids is None:
        set_ids = torch.zeros(len(split.test_open), dtype=torch.long)
    is_knn = score.name == "knn"
    convention = {"ours": "ours", "openood": "openood"}.get(
        protocol, "metric_utils" if is_knn else "dassl"
    )
    id_scores = _apply(score, logits[id_rows], embeddings[id_rows])
    if protocol == "reference" and not is_knn:
        # The energy path keeps only the correctly classified ID images.
        correct = logits[id_rows].argmax(-1) == split.test_labels[id_rows]
        id_scores = id_scores[correct]
    per_set: dict[str, dict[str, float]] = {}
    for index, name in enumerate(names):
        rows = torch.nonzero(set_ids == index).flatten()
        if protocol == "reference" and split.test_open_classes is not None:
            rows = rows[capped(split.test_open_classes[rows], REFERENCE_OOD_PER_CLASS, seed)]
        ood_scores = _apply(score, open_logits[rows], open_embeddings[rows])
        per_set[name] = ood_metrics(id_scores, ood_scores, convention)
    metrics = {
        f"test_{key}": sum(m[key] for m in per_set.values()) / len(per_set)
        for key in next(iter(per_set.values()))
    }
    if len(per_set) > 1:
        for name, values in per_set.items():
            metrics |= {f"test_{key}_{name}": value for key, value in values.items()}
    return metrics


def evaluate(
    method: Method,
    split: SplitFeatures,
    score: OODScore,
    include_test: bool = True,
    protocol: str = "ours",
    seed: int = 0,
) -> dict[str, float]:
    """Validation metrics (source val split vs validation open set) and, with
    ``include_test``, test metrics (target domain vs test open set) under ``protocol``
    (`croft_search.contract.EVAL_PROTOCOLS`; validation always follows ours, so selection
    never changes)."""
    metrics: dict[str, float] = {}
    split = _labels_on_cpu(split)
    logits, embeddings = predict(method, split.val, split.val_domains)
    metrics["val_acc"] = accuracy(logits, split.val_labels)
    for index, domain in enumerate(split.domains):
        rows = split.val_domains == index
        if rows.any():
            metrics[f"val_acc_{domain}"] = accuracy(logits[rows], split.val_labels[rows])
    open_logits, open_embeddings = predict(method, split.val_open)
    detection = ood_metrics(
        _apply(score, logits, embeddings), _apply(score, open_logits, open_embeddings)
    )
    metrics |= {"val_auroc": detection["auroc"], "val_fpr95": detection["fpr95"]}
    if include_test:
        test = predict(method, split.test)
        open_set = predict(method, split.test_open)
        metrics["test_acc"] = accuracy(test[0], split.test_labels)
        test_score = score
        if protocol == "reference" and score.needs_fit:
            # The reference fits its feature score on its own bank, for the test only; the
            # validation score stays fitted on the training set, so selection is unchanged.
            bank = reference_knn_bank(split, seed)
            _, bank_embeddings = predict(method, bank.clean, bank.domains)
            test_score = get_score(score.name, **score.params()).fit(bank_embeddings, bank.labels)
        metrics |= _test_detection(split, test_score, test, open_set, protocol, seed)
        if protocol == "reference" and score.name == "knn":
            # The reference prints every k of its sweep (and picks none): one bank, each k.
            for k in REFERENCE_KNN_KS:
                swept = get_score("knn", k=k).fit(bank_embeddings, bank.labels)
                values = _test_detection(split, swept, test, open_set, protocol, seed)
                metrics[f"test_knn{k}_auroc"] = values["test_auroc"]
                metrics[f"test_knn{k}_fpr95"] = values["test_fpr95"]
    return metrics
