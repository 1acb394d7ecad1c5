"""`python -m croft_search.prepare`: build the embedded data if needed, encode every image of a
dataset once with a frozen backbone and store the features in the cache."""

from __future__ import annotations

import time
from collections.abc import Sequence

from croft_search.backbones import check_crop_scale, load_backbone
from croft_search.config import data_root, feature_cache_dir
from croft_search.contract import DEFAULT_CROP_SCALE, EMBEDDED_BACKBONE, EMBEDDED_DATASET
from croft_search.data import get_dataset_spec, load_domain_split
from croft_search.encoding import check_workers, default_workers
from croft_search.errors import ConfigError, OneLineArgumentParser, exit_on_user_error
from croft_search.features import CLEAN_VIEW, FeatureCache, augmented_view_kind


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(prog="python -m croft_search.prepare", description=__doc__)
    parser.add_argument("--dataset", default=EMBEDDED_DATASET, help="domain-split dataset name")
    parser.add_argument("--backbone", default=EMBEDDED_BACKBONE, help="open_clip model name")
    parser.add_argument(
        "--pretrained",
        default="default",
        help="pretrained tag (e.g. openai) or local checkpoint path; 'default' picks the "
        "shipped weights of the embedded model or the model's OpenAI tag",
    )
    parser.add_argument("--views", type=int, default=8, help="augmented views per training image")
    parser.add_argument("--view-seed", type=int, default=0, help="seed of the augmented views")
    parser.add_argument(
        "--crop-scale",
        type=float,
        default=DEFAULT_CROP_SCALE,
        help="smallest area fraction of an augmented view's crop (the reference: 0.08)",
    )
    parser.add_argument("--data-root", default=None, help="dataset root (default: $CROFT_DATA)")
    parser.add_argument("--cache-dir", default=None, help="feature cache (default: $CROFT_CACHE)")
    parser.add_argument("--device", default="cpu", help="torch device for encoding")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes that decode and augment images (0: the encoding process; default: "
        "0 on CPU, where the forward pass needs every core, up to 4 on CUDA)",
    )
    return parser


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.views < 0:
        raise ConfigError(f"--views must be >= 0, got {args.views}")
    check_crop_scale(args.crop_scale)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers is not None:
        check_workers(args.workers)
    root = data_root(args.data_root)
    spec = get_dataset_spec(args.dataset, root)
    if spec.kind != "domain_split":
        raise ConfigError(f"{spec.name} is an open-set dataset; prepare a domain-split dataset")
    # Check the data (and build embedded data) before loading a possibly large backbone.
    load_domain_split(spec.name, root, spec.target_domains[0])
    backbone = load_backbone(args.backbone, args.pretrained, device=args.device)
    workers = default_workers(backbone.device) if args.workers is None else args.workers
    cache = FeatureCache(
        backbone,
        root,
        cache_dir=args.cache_dir or feature_cache_dir(),
        batch_size=args.batch_size,
        workers=workers,
    )
    started = time.perf_counter()
    units = cache.prepare_dataset(
        spec.name, views=args.views, view_seed=args.view_seed, crop_scale=args.crop_scale
    )
    open_counts = {
        name: len(cache.open_set_features([name], split))
        for split, names in (("val", spec.val_open_sets), ("test", spec.test_open_sets))
        for name in names
    }
    seconds = time.perf_counter() - started

    aug_kind = augmented_view_kind(args.views, args.view_seed, args.crop_scale)
    print(f"dataset {spec.name} at {cache.data_root / spec.folder}")
    print(f"backbone {backbone.identity} (feature dim {backbone.embed_dim})")
    print(f"{'domain':<16}{'images':>8}{'train images':>14}{'views':>7}")
    for domain in spec.domains:
        clean = units[(domain, CLEAN_VIEW)]
        augmented = units.get((domain, aug_kind))
        n_train = len(augmented.paths) if augmented else 0
        print(f"{domain:<16}{len(clean.paths):>8}{n_train:>14}{args.views:>7}")
    for name, count in open_counts.items():
        print(f"{'open set ' + name:<30}{count:>8}")
    print(
        f"encoded {cache.encoded_images} image views in {seconds:.1f} s "
        f"({'cache hit' if cache.encoded_images == 0 else 'cache filled'}, "
        f"{workers} decoding worker{'s' if workers != 1 else ''})"
    )
    print(f"cache: {cache.cache_dir}")
    return 0


if __name__ == "__main__":
    main()
