"""The one training loop every method shares: optimiser, constant warm-up then cosine
schedule (as Dassl/CoOp), shuffled mini-batches over cached features with one random
augmented view per image and step, a per-epoch report callback that can stop training."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from trainables.base import Method, TrainData

# Returns True to stop training after this epoch (early stopping, ASHA).
EpochCallback = Callable[[int, dict[str, float]], bool | None]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the trial is recorded as failed."""


def learning_rate(epoch: int, hp: dict[str, Any]) -> float:
    """Constant ``warmup_lr`` for ``warmup_epochs``, then cosine decay from ``lr`` over the
    epochs (Dassl's ConstantWarmupScheduler wrapping CosineAnnealingLR)."""
    if epoch < hp["warmup_epochs"]:
        return hp["warmup_lr"]
    return 0.5 * hp["lr"] * (1 + math.cos(math.pi * (epoch - hp["warmup_epochs"]) / hp["epochs"]))


def build_optimizer(
    params: list[torch.nn.Parameter], hp: dict[str, Any], fused: bool = True
) -> torch.optim.Optimizer:
    """The trial's optimiser. ``fused=False`` for methods that step it with some parameters'
    gradients absent: torch's fused SGD cannot take a mix of parameters with and without
    momentum buffers, where the default implementation skips those without a gradient."""
    # The fused kernels update every parameter in one call: on the small matrices of
    # cached-feature methods the per-parameter loop's overhead is most of the step.
    fused = fused and fusable(params)
    if hp["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=hp["lr"], weight_decay=hp["weight_decay"], fused=fused)
    return torch.optim.SGD(
        params,
        lr=hp["lr"],
        momentum=hp["momentum"],
        weight_decay=hp["weight_decay"],
        fused=fused,
    )


def fusable(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused optimiser kernels take these parameters (floating point, on
    one CPU or CUDA device); otherwise the optimisers' default implementation runs."""
    devices = {p.device for p in params}
    return (
        len(devices) == 1
        and next(iter(devices)).type in ("cpu", "cuda")
        and all(p.is_floating_point() for p in params)
    )


def epoch_draws(
    generator: torch.Generator, n: int, n_views: int, epoch: int, hp: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch's draws from ``generator``: the shuffled rows of the ``n`` training images
    that the epoch's batches hold (all, or whole batches only with ``drop_last``) and one
    augmented view per row. Drawn as every loop draws them: the permutation, then the
    views, one per row in batch order (a population's members draw from their own)."""
    order = torch.randperm(n, generator=generator)
    end = n - n % hp["batch_size"] if hp["drop_last"] and n >= hp["batch_size"] else n
    if hp["view_order"] == "epoch":
        views = torch.full((end,), epoch % n_views, dtype=torch.long)
    else:
        views = torch.randint(n_views, (end,), generator=generator)
    return order[:end], views


def epoch_batches(
    generator: torch.Generator, n: int, n_views: int, epoch: int, hp: dict[str, Any]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(rows, view of each row) of every mini-batch of one epoch (`epoch_draws`)."""
    order, views = epoch_draws(generator, n, n_views, epoch, hp)
    for start in range(0, len(order), hp["batch_size"]):
        yield order[start : start + hp["batch_size"]], views[start : start + hp["batch_size"]]


def train_epochs(method: Method, data: TrainData, hp: dict[str, Any]) -> Iterator[dict[str, float]]:
    """Train ``method`` in place, yielding one log row (lr, mean loss parts) after each
    epoch, so callers can evaluate, report, stop early or step several trials in lockstep."""
    torch.manual_seed(hp["seed"])
    method.setup()
    params = method.trainable_parameters()
    if not params or hp["epochs"] == 0 or len(data) == 0:
        method.eval()
        return
    optimizer = build_optimizer(params, hp, fused=not method.partial_steps)
    generator = torch.Generator().manual_seed(hp["seed"])
    n, n_views = data.views.shape[:2]
    device = params[0].device

    def update(loss: torch.Tensor) -> None:
        for param in params:
            param.grad = None
        loss.backward(retain_graph=True)
        optimizer.step()

    for epoch in range(hp["epochs"]):
        method.train()
        lr = learning_rate(epoch, hp)
        for group in optimizer.param_groups:
            group["lr"] = lr
        totals: dict[str, float] = {}
        steps = 0
        for index, view in epoch_batches(generator, n, n_views, epoch, hp):
            features = data.views[index, view].to(device)
            labels = method.targets(data.labels[index], index).to(device)
            domains = data.domains[index].to(device)
            loss, parts = method.training_loss(features, labels, domains, update)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise TrainingDiverged(f"loss became {loss_value} in epoch {epoch}")
            # What optimizer.zero_grad(set_to_none=True) does, without its profiling hook.
            for param in params:
                param.grad = None
            loss.backward()
            optimizer.step()
            for key, value in parts.items():
                totals[key] = totals.get(key, 0.0) + value
            steps += 1
        method.eval()
        yield {"epoch": epoch, "lr": lr, **{k: v / steps for k, v in totals.items()}}


def train(
    method: Method,
    data: TrainData,
    hp: dict[str, Any],
    on_epoch: EpochCallback | None = None,
) -> list[dict[str, float]]:
    """Train ``method`` to the end (or until ``on_epoch`` returns True); returns the log."""
    history = []
    for row in train_epochs(method, data, hp):
        history.append(row)
        if on_epoch is not None and on_epoch(int(row["epoch"]), row):
            break
    return history
