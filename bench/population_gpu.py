"""Populations at scale on PACS-shaped features: CRoFT (n_ctx 0) trials per hour one at a
time with `run_trial` and as populations of K, and the device memory per member, side by
side in one run. The features are random (512-d, 7 classes, 3 source domains of 16 shots
each: 336 training images, 30 epochs by default), shaped like ViT-B/16 features of PACS,
so the figures measure the arithmetic a real PACS search does, not its accuracy.

    python bench/population_gpu.py                        # CUDA when present, else the CPU
    python bench/population_gpu.py --device cpu --sizes 1,4,16 --trials 16

On CUDA the sizes default to 1, 16, 64, 256 and 1,024 and the features live on the device; on
the CPU to 1, 4 and 16 (a CPU run says so in its first line). Memory per member is the
peak allocated during a population over K (CUDA only).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from croft_search.data.base import Sample
from croft_search.features import SplitFeatures
from croft_search.trial.population import run_population
from croft_search.trial.runner import TrialResources, run_trial

CLASSES = tuple(f"class{c}" for c in range(7))
DOMAINS = ("art_painting", "cartoon", "photo", "sketch")
TARGET = "sketch"
# PACS's logit scale after CLIP's training (exp of the learned temperature, clamped at 100).
LOGIT_SCALE = 100.0


@dataclass
class RandomFeatureBackbone:
    """What a trial reads of a backbone when no prompt is learned: the embedding width, the
    logit scale and the name its results record."""

    embed_dim: int
    identity: str = "random-pacs-shaped"
    logit_scale: float = LOGIT_SCALE


def pacs_shaped(dim: int, shots: int, views: int, device: str, seed: int = 0) -> TrialResources:
    """Random features with PACS's shape: class means plus per-domain offsets plus noise, so
    training has something to fit; ``shots`` training images per class and source domain."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    means, offsets = randn(len(CLASSES), dim), 0.5 * randn(len(DOMAINS), dim)

    def images(domain: int, per_class: int, extra: tuple[int, ...] = ()) -> tuple:
        labels = torch.arange(len(CLASSES)).repeat_interleave(per_class)
        noise = randn(len(labels), *extra, dim)
        base = means[labels] + offsets[domain]
        return (base.view(len(labels), *(1 for _ in extra), dim) + noise), labels

    sources = [d for d in DOMAINS if d != TARGET]
    train_views, train_labels, train_domains, samples = [], [], [], []
    for index, domain in enumerate(sources):
        feats, labels = images(DOMAINS.index(domain), shots, (views,))
        train_views.append(feats)
        train_labels.append(labels)
        train_domains.append(torch.full_like(labels, index))
        samples += [Sample(Path(f"{domain}/{int(y)}/{i}.jpg"), int(y), CLASSES[int(y)], domain)
                    for i, y in enumerate(labels)]  # fmt: skip
    val, val_labels = images(0, 8)
    test, test_labels = images(DOMAINS.index(TARGET), 50)
    views_tensor = torch.cat(train_views)
    split = SplitFeatures(
        classnames=CLASSES,
        domains=tuple(sources),
        train_clean=views_tensor[:, 0].clone(),
        train_views=views_tensor,
        train_labels=torch.cat(train_labels),
        train_domains=torch.cat(train_domains),
        val=val,
        val_labels=val_labels,
        val_domains=torch.zeros_like(val_labels),
        test=test,
        test_labels=test_labels,
        val_open=randn(100, dim),
        test_open=randn(300, dim),
        target_domain=TARGET,
        backbone_identity="random-pacs-shaped",
        train_samples=tuple(samples),
    )
    on_device = {
        name: value.to(device)
        for name, value in vars(split).items()
        if isinstance(value, torch.Tensor)
    }
    split = SplitFeatures(**{**vars(split), **on_device})
    class_text = means + 0.3 * randn(len(CLASSES), dim)
    return TrialResources(
        backbone=RandomFeatureBackbone(dim),  # type: ignore[arg-type]
        splits={TARGET: split},
        class_text=class_text.to(device),
        template="a photo of a {}.",
        dataset="pacs-shaped",
    )


def configs(count: int, epochs: int, shots: int, device: str) -> list[dict]:
    """Members differing in what a population lets differ: seed, learning rate, momentum,
    weight decay, CRoFT's weights and ratios."""
    return [
        {"method": "croft", "dataset": "PACS", "target_domain": TARGET, "device": device,
         "n_ctx": 0, "epochs": epochs, "shots": shots, "seed": index,
         "lr": 0.001 * (1 + index % 8), "momentum": 0.9 if index % 2 else 0.5,
         "weight_decay": 5e-4 * (index % 3), "lambda1": 1.0 + index % 5,
         "lambda2": 0.5 * (1 + index % 4), "ratio_image": 0.2 + 0.1 * (index % 6)}
        for index in range(count)
    ]  # fmt: skip


def synchronise(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default=None, help="population sizes, comma-separated")
    parser.add_argument("--trials", type=int, default=16,
                        help="trials per size, rounded up to whole populations")  # fmt: skip
    parser.add_argument("--alone", type=int, default=4, help="trials run one at a time")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    sizes = [int(s) for s in (args.sizes or ("1,16,64,256,1024" if cuda else "1,4,16")).split(",")]
    if min(sizes) < 1 or min(args.alone, args.epochs, args.trials) < 1:
        parser.error("sizes, --trials, --alone and --epochs must be >= 1")
    if not cuda:
        torch.set_num_threads(1)
    resources = pacs_shaped(args.dim, args.shots, args.views, args.device)
    where = torch.cuda.get_device_name() if cuda else "CPU, one thread (no GPU: small K only)"
    print(f"{where}; CRoFT n_ctx 0, {args.dim}-d, 7 classes, "
          f"{3 * 7 * args.shots} training images, {args.epochs} epochs", flush=True)  # fmt: skip

    batch = configs(args.alone, args.epochs, args.shots, args.device)
    run_trial(batch[0], resources)  # first-call costs out of the timing
    synchronise(args.device)
    started = time.perf_counter()
    for config in batch[: args.alone]:
        run_trial(config, resources)
    synchronise(args.device)
    alone = 3600 * args.alone / (time.perf_counter() - started)
    rows = [{"K": 1, "mode": "run_trial", "trials_per_hour": alone, "speedup": 1.0}]
    print(f"run_trial one at a time: {alone:12,.0f} trials/hour")
    for size in sizes:
        count = -(-args.trials // size) * size  # whole populations
        members = configs(count, args.epochs, args.shots, args.device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        started = time.perf_counter()
        for start in range(0, count, size):
            run_population(members[start : start + size], resources)
        synchronise(args.device)
        rate = 3600 * count / (time.perf_counter() - started)
        row = {"K": size, "mode": "population", "trials_per_hour": rate, "speedup": rate / alone}
        memory = ""
        if cuda:
            row["mib_per_member"] = (torch.cuda.max_memory_allocated() - base) / size / 2**20
            memory = f", {row['mib_per_member']:.1f} MiB per member"
        rows.append(row)
        print(f"population K={size:5d}: {rate:12,.0f} trials/hour ({rate / alone:5.1f}x){memory}",
              flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"device": where, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
