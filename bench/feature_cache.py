"""Benchmark: encoding throughput of the frozen image encoder with 0, 1 and 2 decoding worker
processes side by side, and how much faster a trial gets its features from the Parquet cache
than by re-encoding the same images (same run, same machine).

    python bench/feature_cache.py [--backbone tiny-digits] [--pretrained default] [--views 2]
    python bench/feature_cache.py --workers 0,1,2,4
    python bench/feature_cache.py --device cuda   # ViT-B-16, random init, every core decoding

On CUDA the backbone defaults to a random-init ViT-B-16 (same arithmetic as the real one, no
download) in float16 autocast, and the worker counts to 0, prepare's default and every usable
core. Each worker count fills its own empty cache; every count must give the same features.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from croft_search.backbones import load_backbone
from croft_search.config import data_root
from croft_search.data import get_dataset_spec, load_domain_split
from croft_search.encoding import default_workers, usable_cores
from croft_search.errors import BackboneError
from croft_search.features import CLEAN_VIEW, CachedFeatures, FeatureCache, augmented_view_kind

CUDA_BACKBONE = "ViT-B-16"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument(
        "--backbone", default=None, help=f"default: tiny-digits, {CUDA_BACKBONE} on CUDA"
    )
    parser.add_argument(
        "--pretrained",
        default=None,
        help="'random' times an untrained model (same speed); default: the shipped weights "
        "of tiny-digits, random on CUDA",
    )
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--workers", default=None, help="comma-separated worker counts (default: 0,1,2 on CPU)"
    )
    args = parser.parse_args()
    cuda = torch.device(args.device).type == "cuda"
    args.backbone = args.backbone or (CUDA_BACKBONE if cuda else "tiny-digits")
    args.pretrained = args.pretrained or ("random" if cuda else "default")
    if args.workers is None:
        counts = [0, default_workers(args.device), usable_cores()] if cuda else [0, 1, 2]
    else:
        counts = [int(count) for count in args.workers.split(",")]
    args.workers = list(dict.fromkeys(counts))
    return args


def fill(
    backbone, root: Path, cache_dir: Path, args: argparse.Namespace, workers: int
) -> tuple[dict[tuple[str, str], CachedFeatures], int, float]:
    """Encode the dataset into an empty cache: (units, image views encoded, seconds)."""
    cache = FeatureCache(
        backbone, root, cache_dir, batch_size=args.batch_size, progress=False, workers=workers
    )
    started = time.perf_counter()
    units = cache.prepare_dataset(args.dataset, views=args.views)
    return units, cache.encoded_images, time.perf_counter() - started


def warm_up(backbone, root: Path) -> str:
    """One forward pass first, so kernel selection and allocator growth are not timed; the
    precision the encoding computes in."""
    with tempfile.TemporaryDirectory() as tmp:
        encoder = FeatureCache(backbone, root, Path(tmp), progress=False).encoder
        encoder.encode_batch(torch.zeros(2, 3, backbone.image_size, backbone.image_size))
    return encoder.precision


def main() -> None:
    args = parse_args()
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print(f"skipped: --device {args.device} asks for CUDA, which this machine lacks")
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))
    pretrained = None if args.pretrained == "random" else args.pretrained
    try:
        backbone = load_backbone(args.backbone, pretrained, device=args.device)
    except BackboneError as err:
        print(f"skipped: cannot load {args.backbone} ({err})")
        return
    spec = get_dataset_spec(args.dataset)
    root = data_root(args.data_root)
    load_domain_split(spec.name, root, spec.domains[0])  # builds embedded data if needed
    precision = warm_up(backbone, root)

    with tempfile.TemporaryDirectory() as tmp:
        timings = {}
        for workers in args.workers:
            filled, encoded, seconds = fill(
                backbone, root, Path(tmp) / f"w{workers}", args, workers
            )
            if not timings:
                units, encode_seconds, cache_dir = filled, seconds, Path(tmp) / f"w{workers}"
            same = all(torch.equal(filled[key].features, units[key].features) for key in units)
            timings[workers] = (seconds, encoded / seconds, same)

        load_seconds = []
        for _ in range(args.repeats):
            reading = FeatureCache(backbone, root, cache_dir, progress=False)
            started = time.perf_counter()
            again = reading.prepare_dataset(spec.name, views=args.views)
            load_seconds.append(time.perf_counter() - started)
            assert reading.encoded_images == 0, "second pass must be a cache hit"
            assert all(torch.equal(again[k].features, units[k].features) for k in units)
        load_best = min(load_seconds)

    n_clean = sum(len(u.paths) for (_, kind), u in units.items() if kind == CLEAN_VIEW)
    n_aug = sum(
        u.features.shape[0] * u.features.shape[1]
        for (_, kind), u in units.items()
        if kind == augmented_view_kind(args.views, 0)
    )
    print(
        f"backbone {backbone.identity} on {backbone.device} ({precision}), "
        f"dataset {spec.name}, threads {torch.get_num_threads()}, cores {usable_cores()}, "
        f"batch {args.batch_size}"
    )
    print(f"image views encoded: {encoded} ({n_clean} clean + {n_aug} augmented)")
    print("encode (decode + transform + forward), by decoding worker processes:")
    print(f"{'workers':>9}{'seconds':>10}{'images/s':>10}  same features as {args.workers[0]}")
    for workers, (seconds, rate, same) in timings.items():
        print(f"{workers:>9}{seconds:>10.2f}{rate:>10.0f}  {'yes' if same else 'NO'}")
    print(
        f"load from Parquet cache (best of {args.repeats}): {load_best * 1000:.1f} ms "
        f"= {encoded / load_best:.0f} image views/s"
    )
    ratio = encode_seconds / load_best
    print(f"ratio re-encode ({args.workers[0]} workers) / cached load: {ratio:.0f}x")


if __name__ == "__main__":
    main()
