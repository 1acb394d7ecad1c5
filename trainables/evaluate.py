"""Evaluation shared by every method: logits and embeddings from cached features, an OOD
score, and the validation and test metrics of the protocol in `croft_search.selection`."""

from __future__ import annotations

from typing import Any

import torch

from croft_search.features import SplitFeatures
from croft_search.metrics import accuracy, ood_metrics
from croft_search.scores import OODScore, get_score
from trainables.base import Method, TrainData

EVAL_BATCH = 1024


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


def build_score(method: Method, name: str | None, train: TrainData) -> OODScore:
    """The OOD score ``name`` (the method's default when None), fitted where it needs the
    training embeddings (KNN, Mahalanobis)."""
    name = name or method.default_score
    params: dict[str, Any] = {"logit_scale": method.logit_scale} if name == "mcm" else {}
    score = get_score(name, **params)
    if score.needs_fit:
        _, embeddings = predict(method, train.clean, train.domains)
        score.fit(embeddings, train.labels)
    return score


def _apply(score: OODScore, logits: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    return score.score(logits, embeddings if score.needs_fit else None)


def evaluate(
    method: Method,
    split: SplitFeatures,
    score: OODScore,
    include_test: bool = True,
) -> dict[str, float]:
    """Validation metrics (source val split vs validation open set) and, with
    ``include_test``, test metrics (target domain vs test open set)."""
    metrics: dict[str, float] = {}
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
        logits, embeddings = predict(method, split.test)
        metrics["test_acc"] = accuracy(logits, split.test_labels)
        open_logits, open_embeddings = predict(method, split.test_open)
        detection = ood_metrics(
            _apply(score, logits, embeddings), _apply(score, open_logits, open_embeddings)
        )
        metrics |= {f"test_{key}": value for key, value in detection.items()}
    return metrics
