"""The embedded digits benchmark: a small multi-domain, open-set benchmark built offline
and deterministically from scikit-learn's handwritten digits and matplotlib's fonts,
written in exactly the PACS layout:

    ROOT/digits/images/<domain>/<class>/<domain>_<index>.png     (ID classes 0-5)
    ROOT/digits/test_on_<domain>.json                            (one per domain)
    ROOT/digits/BUILD.json                                       (written last)
    ROOT/digits_open_val/<class>/<domain>_<index>.png            (6, 7: validation OOD)
    ROOT/digits_open_test/<class>/<domain>_<index>.png           (8, 9: test OOD)

`pretrain_corpus` renders the tiny CLIP's pre-training images in the same four styles
from the reserved, disjoint share of the shape sources (see digit_shapes.py).
"""

from __future__ import annotations

import functools
import json
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from croft_search.data.build_io import exclusive_lock, publish, remove_stale_staging
from croft_search.data.digit_shapes import (
    RESERVED_SPLIT_SEED,
    ShapePool,
    digit_mask,
    font_names,
    shape_pool,
)
from croft_search.data.digit_styles import IMAGE_SIZE, render_style
from croft_search.data.digits_layout import (
    DIGIT_NAMES,
    DOMAINS,
    FOLDER,
    ID_DIGITS,
    ID_IMAGES_PER_CLASS_PER_DOMAIN,
    OPEN_IMAGES_PER_CLASS_PER_DOMAIN,
    OPEN_TEST_DIGITS,
    OPEN_TEST_FOLDER,
    OPEN_VAL_DIGITS,
    OPEN_VAL_FOLDER,
    PRETRAIN_IMAGES_PER_CLASS_PER_DOMAIN,
    VAL_SHARE,
)
from croft_search.errors import DataError

# Bump whenever any change alters the written bytes (shapes, styles, counts, layout):
# the manifest comparison is what tells an existing build to be replaced.
BUILDER_VERSION = 1
MANIFEST = "BUILD.json"

# Every image draws from its own random stream, keyed by (seed, stream, domain, digit,
# index), so it does not depend on build order, and the benchmark's jitter never shares
# a stream with the pre-training corpus's, whatever the two seeds.
_BENCHMARK_STREAM = 1
_VAL_ASSIGNMENT_STREAM = 2
_PRETRAIN_STREAM = 3

_STAGING_PREFIX = ".digits-build-"
_LOCK_FILE = ".digits-build.lock"


def build_digits(root: Path, seed: int = 0, force: bool = False) -> Path:
    """Build the digits benchmark under `root` (skipped when a complete build of the same
    seed and version is there, unless `force`); returns `root/digits`."""
    root = Path(root).expanduser().absolute()
    expected = _manifest(seed)
    try:
        with exclusive_lock(root / _LOCK_FILE):
            if force or not _is_built(root, expected):
                _build(root, seed, expected)
    except OSError as err:
        raise DataError(
            f"cannot build the digits benchmark under {root}: {err.strerror or err}; "
            f"pass --data-root (or set CROFT_DATA) to a writable folder"
        ) from None
    return root / FOLDER


def _build(root: Path, seed: int, manifest: dict) -> None:
    """Render into a staging folder, then publish; the manifest goes in last."""
    remove_stale_staging(root, _STAGING_PREFIX)
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=root))
    try:
        _write_benchmark(staging, seed)
        _write_text(staging / FOLDER / MANIFEST, json.dumps(manifest, indent=2))
        publish(
            staging,
            root,
            (OPEN_VAL_FOLDER, OPEN_TEST_FOLDER, FOLDER),
            manifest=root / FOLDER / MANIFEST,
        )
    finally:
        remove_stale_staging(root, _STAGING_PREFIX)


def pretrain_corpus(
    seed: int = 0, per_class_per_domain: int = PRETRAIN_IMAGES_PER_CLASS_PER_DOMAIN
) -> list[tuple[Image.Image, int, str]]:
    """(image, digit 0-9, domain) for all ten digits in all four domains, rendered from
    the pre-training share of the shape sources, never from the benchmark's."""
    pool = shape_pool("pretrain")
    return [
        (_render(pool, _PRETRAIN_STREAM, seed, domain, digit, index), digit, domain)
        for domain, digit, index in _grid(range(10), per_class_per_domain)
    ]


def benchmark_image(seed: int, domain: str, digit: int, index: int) -> Image.Image:
    """Image `index` of `digit` in `domain` of the benchmark built with `seed` (ID and
    open-set digits alike), exactly as build_digits writes it."""
    return _render(shape_pool("benchmark"), _BENCHMARK_STREAM, seed, domain, digit, index)


def _write_benchmark(staging: Path, seed: int) -> None:
    rows: dict[str, list[tuple[str, list]]] = {domain: [] for domain in DOMAINS}
    image_dir = staging / FOLDER / "images"
    for domain, digit, index in _grid(ID_DIGITS, ID_IMAGES_PER_CLASS_PER_DOMAIN):
        relpath = f"{domain}/{DIGIT_NAMES[digit]}/{domain}_{index:03d}.png"
        _save_png(benchmark_image(seed, domain, digit, index), image_dir / relpath)
        part = "val" if index in _val_indices(seed, domain, digit) else "train"
        rows[domain].append((part, [relpath, digit, DIGIT_NAMES[digit]]))
    open_sets = ((OPEN_VAL_FOLDER, OPEN_VAL_DIGITS), (OPEN_TEST_FOLDER, OPEN_TEST_DIGITS))
    for folder, digits in open_sets:
        for domain, digit, index in _grid(digits, OPEN_IMAGES_PER_CLASS_PER_DOMAIN):
            relpath = f"{DIGIT_NAMES[digit]}/{domain}_{index:03d}.png"
            _save_png(benchmark_image(seed, domain, digit, index), staging / folder / relpath)
    for target in DOMAINS:
        sources = [domain for domain in DOMAINS if domain != target]
        split = {
            part: [row for domain in sources for in_part, row in rows[domain] if in_part == part]
            for part in ("train", "val")
        }
        split["test"] = [row for _, row in rows[target]]
        _write_text(staging / FOLDER / f"test_on_{target}.json", _split_json(split))


def _render(
    pool: ShapePool, stream: int, seed: int, domain: str, digit: int, index: int
) -> Image.Image:
    rng = np.random.default_rng([seed, stream, DOMAINS.index(domain), digit, index])
    return render_style(domain, digit_mask(digit, pool, rng), rng)


def _grid(digits: Sequence[int], per_class: int) -> Iterator[tuple[str, int, int]]:
    for domain in DOMAINS:
        for digit in digits:
            for index in range(per_class):
                yield domain, digit, index


@functools.lru_cache(maxsize=256)
def _val_indices(seed: int, domain: str, digit: int) -> frozenset[int]:
    """The fixed, seeded VAL_SHARE of one (domain, class): validation in every split file
    where the domain is a source, so train and val never swap images between files."""
    rng = np.random.default_rng([seed, _VAL_ASSIGNMENT_STREAM, DOMAINS.index(domain), digit])
    count = round(ID_IMAGES_PER_CLASS_PER_DOMAIN * VAL_SHARE)
    return frozenset(int(i) for i in rng.permutation(ID_IMAGES_PER_CLASS_PER_DOMAIN)[:count])


def _manifest(seed: int) -> dict:
    domains = len(DOMAINS)
    id_count, open_count = ID_IMAGES_PER_CLASS_PER_DOMAIN, OPEN_IMAGES_PER_CLASS_PER_DOMAIN
    return {
        "builder": __name__,
        "builder_version": BUILDER_VERSION,
        "seed": seed,
        "image_size": IMAGE_SIZE,
        "domains": list(DOMAINS),
        "id_classes": [DIGIT_NAMES[d] for d in ID_DIGITS],
        "open_val_classes": [DIGIT_NAMES[d] for d in OPEN_VAL_DIGITS],
        "open_test_classes": [DIGIT_NAMES[d] for d in OPEN_TEST_DIGITS],
        "id_images_per_class_per_domain": id_count,
        "open_images_per_class_per_domain": open_count,
        "images": {
            FOLDER: domains * len(ID_DIGITS) * id_count,
            OPEN_VAL_FOLDER: domains * len(OPEN_VAL_DIGITS) * open_count,
            OPEN_TEST_FOLDER: domains * len(OPEN_TEST_DIGITS) * open_count,
        },
        "handwritten_split_seed": RESERVED_SPLIT_SEED,
        "fonts": font_names(shape_pool("benchmark")),
    }


def _is_built(root: Path, expected: dict) -> bool:
    try:
        found = json.loads((root / FOLDER / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    folders_present = all((root / f).is_dir() for f in (OPEN_VAL_FOLDER, OPEN_TEST_FOLDER))
    return found == expected and folders_present


def _save_png(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")


def _split_json(split: dict[str, list[list]]) -> str:
    """One row per line: readable and diffable, unlike one long line or json's indent."""
    parts = [
        f'"{part}": [\n' + ",\n".join(json.dumps(row) for row in rows) + "\n]"
        for part, rows in split.items()
    ]
    return "{\n" + ",\n".join(parts) + "\n}"


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n", encoding="utf-8")
