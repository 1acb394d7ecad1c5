"""The embedded digits benchmark: layout through the real loaders, determinism, build
bookkeeping, and the pre-training corpus's disjointness from the benchmark."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from croft_search.data import (
    build_digits,
    get_dataset_spec,
    load_domain_split,
    load_image,
    load_open_set,
    pretrain_corpus,
)
from croft_search.data import digits as digits_module
from croft_search.data.digit_shapes import shape_pool
from croft_search.data.digits_layout import DIGIT_NAMES, DOMAINS
from croft_search.errors import DataError

ID_CLASSES = ("zero", "one", "two", "three", "four", "five")
BENCHMARK_FOLDERS = ("digits", "digits_open_val", "digits_open_test")


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file of the benchmark's folders, by path relative to `root`."""
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for folder in BENCHMARK_FOLDERS
        for path in sorted((root / folder).rglob("*"))
        if path.is_file()
    }


def benchmark_pixels(root: Path) -> set[bytes]:
    return {
        np.asarray(Image.open(path).convert("RGB")).tobytes()
        for folder in BENCHMARK_FOLDERS
        for path in (root / folder).rglob("*.png")
    }


def test_registry_matches_the_builder() -> None:
    spec = get_dataset_spec("digits")
    assert spec.domains == DOMAINS == ("photo", "sketch", "cartoon", "painting")
    assert spec.hflip is False


def test_every_split_file_loads_through_the_real_loader(digits_root: Path) -> None:
    val_of_image: dict[Path, bool] = {}
    for target in DOMAINS:
        split = load_domain_split("digits", digits_root, target)
        assert split.classnames == ID_CLASSES
        assert len(split.test) == 6 * 60 and {s.domain for s in split.test} == {target}
        sources = split.train + split.val
        assert len(sources) == 3 * 6 * 60
        assert {s.domain for s in sources} == set(DOMAINS) - {target}
        assert len(split.val) == 3 * 6 * 12
        assert not {s.path for s in split.train} & {s.path for s in split.val}
        for sample in split.val + split.train:
            # A source image is validation in every file or in none.
            in_val = sample in split.val
            assert val_of_image.setdefault(sample.path, in_val) == in_val
    images = [load_image(sample.path) for sample in split.test[::60]]
    assert {(image.mode, image.size) for image in images} == {("RGB", (32, 32))}


def test_open_sets_hold_disjoint_unseen_classes_in_every_domain(digits_root: Path) -> None:
    val_set = load_open_set("digits_open_val", digits_root)
    test_set = load_open_set("digits_open_test", digits_root)
    assert val_set.classnames == ("seven", "six")
    assert test_set.classnames == ("eight", "nine")
    assert not set(val_set.classnames) & set(test_set.classnames)
    assert not (set(val_set.classnames) | set(test_set.classnames)) & set(ID_CLASSES)
    for open_set in (val_set, test_set):
        assert len(open_set.samples) == 2 * 4 * 30
        assert {s.label for s in open_set.samples} == {-1}
        assert {s.domain for s in open_set.samples} == set(DOMAINS)
        assert all(s.path.name.startswith(f"{s.domain}_") for s in open_set.samples)


def test_benchmark_image_is_what_the_builder_wrote(digits_root: Path) -> None:
    written = digits_root / "digits" / "images" / "painting" / "three" / "painting_007.png"
    expected = np.asarray(digits_module.benchmark_image(0, "painting", 3, 7))
    assert np.array_equal(np.asarray(Image.open(written)), expected)


def test_manifest_records_the_build(digits_root: Path) -> None:
    manifest = json.loads((digits_root / "digits" / "BUILD.json").read_text())
    assert manifest["seed"] == 0 and manifest["builder_version"] == digits_module.BUILDER_VERSION
    assert manifest["images"] == {"digits": 1440, "digits_open_val": 240, "digits_open_test": 240}
    assert sum(1 for _ in (digits_root / "digits" / "images").rglob("*.png")) == 1440


def test_same_seed_builds_byte_identical_files(digits_root: Path, tmp_path: Path) -> None:
    # The loader builds a missing embedded dataset on demand, with seed 0.
    load_domain_split("digits", tmp_path, "sketch")
    assert tree_hashes(tmp_path) == tree_hashes(digits_root)
    assert not list(tmp_path.glob(".digits-build-*"))  # no staging left behind


def test_another_seed_draws_other_images_and_splits() -> None:
    # Rendering through the builder's own per-image function instead of a third full
    # build keeps this file fast; build_digits writes exactly these images.
    for domain in DOMAINS:
        for digit in range(10):
            seed0, seed1 = (
                np.asarray(digits_module.benchmark_image(seed, domain, digit, 0)).tobytes()
                for seed in (0, 1)
            )
            assert seed0 != seed1
    assert digits_module._val_indices(0, "photo", 0) != digits_module._val_indices(1, "photo", 0)


def test_build_is_idempotent_and_detects_an_interrupted_build(
    digits_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert build_digits(digits_root) == digits_root / "digits"  # already there: a no-op

    renders = []
    monkeypatch.setattr(
        digits_module,
        "_write_benchmark",
        lambda staging, seed: renders.append(_fake_benchmark(staging)),
    )
    build_digits(tmp_path)
    build_digits(tmp_path)
    assert len(renders) == 1
    build_digits(tmp_path, force=True)
    assert len(renders) == 2
    build_digits(tmp_path, seed=1)  # another seed replaces the build
    assert len(renders) == 3
    assert json.loads((tmp_path / "digits" / "BUILD.json").read_text())["seed"] == 1
    (tmp_path / "digits" / "BUILD.json").unlink()  # what a killed build leaves
    (tmp_path / ".digits-build-stale").mkdir()
    build_digits(tmp_path, seed=1)
    assert len(renders) == 4 and (tmp_path / "digits" / "BUILD.json").is_file()
    assert not list(tmp_path.glob(".digits-build-*"))


def _fake_benchmark(staging: Path) -> None:
    for folder in BENCHMARK_FOLDERS:
        (staging / folder).mkdir(parents=True)


def test_unwritable_root_is_a_one_line_data_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(DataError, match="writable folder") as caught:
        build_digits(blocker / "data")
    assert str(blocker / "data") in str(caught.value) and "\n" not in str(caught.value)


def test_pretrain_corpus_covers_all_digits_and_domains_deterministically() -> None:
    corpus = pretrain_corpus(seed=0, per_class_per_domain=3)
    assert len(corpus) == 10 * 4 * 3
    assert {(digit, domain) for _, digit, domain in corpus} == {
        (digit, domain) for digit in range(10) for domain in DOMAINS
    }
    assert {(image.mode, image.size) for image, _, _ in corpus} == {("RGB", (32, 32))}
    again = pretrain_corpus(seed=0, per_class_per_domain=3)
    assert [np.asarray(a[0]).tobytes() for a in corpus] == [
        np.asarray(b[0]).tobytes() for b in again
    ]
    other_seed = pretrain_corpus(seed=1, per_class_per_domain=3)
    assert np.asarray(other_seed[0][0]).tobytes() != np.asarray(corpus[0][0]).tobytes()


def test_pretraining_never_sees_a_benchmark_shape_or_image(digits_root: Path) -> None:
    benchmark, pretrain = shape_pool("benchmark"), shape_pool("pretrain")
    for digit in range(10):
        assert not set(benchmark.handwritten_indices[digit]) & set(
            pretrain.handwritten_indices[digit]
        )
        assert len(pretrain.handwritten_indices[digit]) >= 80
    assert pretrain.fonts and not set(benchmark.fonts) & set(pretrain.fonts)
    seen = benchmark_pixels(digits_root)
    corpus = pretrain_corpus(seed=0, per_class_per_domain=10)
    assert not any(np.asarray(image).tobytes() in seen for image, _, _ in corpus)


def test_classnames_are_the_digit_words() -> None:
    assert DIGIT_NAMES[:6] == ID_CLASSES and len(set(DIGIT_NAMES)) == 10
