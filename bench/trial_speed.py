"""Benchmark: one CRoFT trial trained from the feature cache against the same trial done the
reference way, where every batch's images go through the frozen image encoder at every step
(decode, augment, encode). Both sides run the same method, shared loop, seed and batches, and
the same evaluation; only where the training features come from differs. The two sides take
turns for ``--rounds`` rounds, so a change in this machine's speed hits both alike; the
ratio is that of their medians.

    python bench/trial_speed.py [--method croft] [--target-domain photo] [--epochs 30]
    python bench/trial_speed.py --backbone ViT-B-16 --pretrained random --epochs 3 --views 1
    python bench/trial_speed.py --set lambda1=0 --set lambda2=0   # CRoFT without its parts
    python bench/trial_speed.py --count-ops   # also PyTorch operations per training step

The second form times the same comparison with a real CLIP-sized image encoder (random
weights encode exactly as fast as trained ones), for contrast with the tiny embedded model.
For CRoFT (unless --set implementation=... picks one) each round also times the cached trial
under implementation=reference, whose step runs by plain autograd, against the paper's
hand-written objective.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from croft_search.data import get_dataset_spec, load_image, sample_few_shot
from croft_search.features import SplitFeatures
from croft_search.train import parse_assignments
from croft_search.trial.evaluate import build_score, evaluate
from croft_search.trial.loop import train
from croft_search.trial.runner import TrialResources, build_method, few_shot_train
from trainables.base import TrainData
from trainables.registry import resolve_hparams


class EncodeEveryStep:
    """Stands in for ``TrainData.views``: indexing [rows, views] decodes, augments and encodes
    those images there and then, as the reference code does for every batch."""

    def __init__(
        self,
        resources: TrialResources,
        split: SplitFeatures,
        shots: int,
        seed: int,
        n_views: int,
        hflip: bool,
    ) -> None:
        self.backbone = resources.backbone
        # The same rows, in the same order, as few_shot_train picks.
        self.paths = [s.path for s in sample_few_shot(split.train_samples, shots, seed)]
        self.transform = self.backbone.train_transform(hflip)
        self.shape = (len(self.paths), n_views, self.backbone.embed_dim)
        self.images_encoded = 0

    def __getitem__(self, key: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        rows, _ = key
        batch = torch.stack([self.transform(load_image(self.paths[int(i)])) for i in rows])
        self.images_encoded += len(rows)
        return self.backbone.encode_images(batch.to(self.backbone.device)).float().cpu()


def timed_trial(
    method: str, hp: dict, resources: TrialResources, split: SplitFeatures, data: TrainData
) -> tuple[float, dict]:
    started = time.perf_counter()
    model = build_method(method, hp, resources, split, data, torch.device("cpu"))
    train(model, data, hp)
    metrics = evaluate(model, split, build_score(model, None, data))
    return time.perf_counter() - started, metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", default="croft")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--target-domain", default="photo")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--backbone", default="tiny-digits")
    parser.add_argument("--pretrained", default="default")
    parser.add_argument("--views", type=int, default=8, help="cached augmented views per image")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="hyper-parameter override, e.g. lambda2=0 to time CRoFT without EDR",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (a search trial gets its CPUs' worth)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="cached/re-encoding pairs timed")
    parser.add_argument(
        "--count-ops",
        action="store_true",
        help="also count the PyTorch operations of one cached training step (view ops included)",
    )
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    torch.set_num_threads(args.threads)

    overrides = {"epochs": args.epochs, "shots": args.shots, **parse_assignments(args.set)}
    hp = resolve_hparams(args.method, overrides)
    resources = TrialResources.load(
        args.dataset,
        [args.target_domain],
        backbone=args.backbone,
        pretrained=args.pretrained,
        views=args.views,
        progress=True,
    )
    split = resources.splits[args.target_domain]
    cached_data = few_shot_train(split, hp["shots"], hp["seed"])
    on_the_fly = EncodeEveryStep(
        resources,
        split,
        hp["shots"],
        hp["seed"],
        cached_data.views.shape[1],
        get_dataset_spec(args.dataset).hflip,
    )
    reference_data = TrainData(
        on_the_fly,
        cached_data.clean,
        cached_data.labels,  # type: ignore[arg-type]
        cached_data.domains,
    )

    autograd_hp = None
    if args.method == "croft" and "implementation" not in overrides:
        autograd_hp = resolve_hparams("croft", {**overrides, "implementation": "reference"})
        timed_trial(args.method, autograd_hp, resources, split, cached_data)
    timed_trial(args.method, hp, resources, split, cached_data)  # warm-up: first-call overheads
    cached_times, reference_times, autograd_times = [], [], []
    for _ in range(args.rounds):
        seconds, cached = timed_trial(args.method, hp, resources, split, cached_data)
        cached_times.append(seconds)
        seconds, reference = timed_trial(args.method, hp, resources, split, reference_data)
        reference_times.append(seconds)
        if autograd_hp is not None:
            seconds, _ = timed_trial(args.method, autograd_hp, resources, split, cached_data)
            autograd_times.append(seconds)
    cached_seconds = statistics.median(cached_times)
    reference_seconds = statistics.median(reference_times)
    images_per_trial = on_the_fly.images_encoded // args.rounds

    print(
        f"{args.method} trial on {args.dataset}, target {args.target_domain}: {hp['epochs']} "
        f"epochs, {hp['shots']} shots ({len(cached_data)} training images), "
        f"{torch.get_num_threads()} threads, backbone {resources.backbone.identity}"
    )
    print(
        f"from cached features: {cached_seconds:8.2f} s   test acc {cached['test_acc']:.3f}"
        f"   (median of {_seconds(cached_times)})"
    )
    print(
        f"encoding every step:  {reference_seconds:8.2f} s   test acc {reference['test_acc']:.3f}"
        f"   (median of {_seconds(reference_times)}; {images_per_trial} images decoded,"
        " augmented and encoded a trial)"
    )
    ratios = ", ".join(f"{r / c:.1f}x" for c, r in zip(cached_times, reference_times, strict=True))
    print(f"speed-up of the cache: {reference_seconds / cached_seconds:.1f}x   (rounds: {ratios})")
    steps = hp["epochs"] * math.ceil(len(cached_data) / hp["batch_size"])
    print(f"cached trial per training step: {1000 * cached_seconds / steps:.2f} ms ({steps} steps)")
    if autograd_times:
        autograd_seconds = statistics.median(autograd_times)
        print(
            f"implementation=reference (plain autograd), cached: {autograd_seconds:.2f} s, "
            f"{autograd_seconds / cached_seconds:.1f}x the paper's hand-written objective "
            f"(median of {_seconds(autograd_times)})"
        )
    if args.count_ops:
        per_step = operations_per_step(args.method, hp, resources, split, cached_data)
        print(f"PyTorch operations a cached training step: {per_step:.0f}")


class _OperationCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.count += 1
        return func(*args, **(kwargs or {}))


def operations_per_step(
    method: str, hp: dict, resources: TrialResources, split: SplitFeatures, data: TrainData
) -> float:
    """ATen operations (forward, backward, optimiser) per training step over one epoch."""
    one_epoch = {**hp, "epochs": 1}
    model = build_method(method, one_epoch, resources, split, data, torch.device("cpu"))
    with _OperationCounter() as counter:
        train(model, data, one_epoch)
    return counter.count / math.ceil(len(data) / hp["batch_size"])


def _seconds(times: list[float]) -> str:
    return ", ".join(f"{t:.2f}" for t in times) + " s"


if __name__ == "__main__":
    main()
