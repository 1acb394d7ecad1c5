"""Benchmark: encoding throughput of the frozen image encoder, and how much faster a trial gets
its features from the Parquet cache than by re-encoding the same images (same run, same
machine).

    python bench/feature_cache.py [--backbone tiny-digits] [--pretrained default] [--views 2]
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
from croft_search.features import CLEAN_VIEW, FeatureCache, augmented_view_kind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--backbone", default="tiny-digits")
    parser.add_argument(
        "--pretrained", default="default", help="'random' times an untrained model (same speed)"
    )
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.set_num_threads(max(1, torch.get_num_threads()))
    pretrained = None if args.pretrained == "random" else args.pretrained
    backbone = load_backbone(args.backbone, pretrained)
    spec = get_dataset_spec(args.dataset)
    root = data_root(args.data_root)
    load_domain_split(spec.name, root, spec.domains[0])  # builds embedded data if needed

    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = Path(tmp)
        filling = FeatureCache(backbone, root, cache_dir, progress=False)
        started = time.perf_counter()
        units = filling.prepare_dataset(spec.name, views=args.views)
        encode_seconds = time.perf_counter() - started
        encoded = filling.encoded_images

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
    print(f"backbone {backbone.identity}, dataset {spec.name}, threads {torch.get_num_threads()}")
    print(f"image views encoded: {encoded} ({n_clean} clean + {n_aug} augmented)")
    print(
        f"encode (decode PNG + transform + forward): {encode_seconds:.2f} s "
        f"= {encoded / encode_seconds:.0f} images/s"
    )
    print(
        f"load from Parquet cache (best of {args.repeats}): {load_best * 1000:.1f} ms "
        f"= {encoded / load_best:.0f} image views/s"
    )
    print(f"ratio re-encode / cached load: {encode_seconds / load_best:.0f}x")


if __name__ == "__main__":
    main()
