"""Dataset registry, split-file and open-set loaders, image decoding, few-shot sampling and
fingerprints, on tiny layouts written into tmp_path."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from croft_search.data import (
    DatasetSpec,
    Sample,
    dataset_fingerprint,
    dataset_names,
    get_dataset_spec,
    load_domain_split,
    load_image,
    load_open_set,
    positions,
    register_dataset,
    sample_few_shot,
)
from croft_search.data import registry as registry_module
from croft_search.data.fewshot import KEPT_SETS
from croft_search.errors import ConfigError, DataError

PACS_DOMAINS = ("art_painting", "cartoon", "photo", "sketch")
PACS_CLASSES = ("dog", "elephant")
# Every image mode the loader must turn into RGB, cycled over the fixture's files.
FIXTURE_MODES = ("L", "RGBA", "P", "RGB")


def write_image(path: Path, mode: str = "RGB", size: tuple[int, int] = (6, 5)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(len(path.name)).integers(0, 256, (size[1], size[0], 3))
    image = Image.fromarray(pixels.astype(np.uint8))
    image = image.convert(mode) if mode != "P" else image.quantize(colors=8)
    image.save(path, format="PNG")
    return path


def write_json(path: Path, content: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content), encoding="utf-8")
    return path


def make_domain_dataset(
    root: Path, folder: str, domains: tuple[str, ...], classes: tuple[str, ...] = PACS_CLASSES
) -> dict[str, list[list]]:
    """Write a PACS-layout dataset with 2 images per (domain, class); returns the rows of
    each domain. Half the rows carry a leading "images/", as some real split files do."""
    rows: dict[str, list[list]] = {domain: [] for domain in domains}
    counter = 0
    for domain in domains:
        for label, classname in enumerate(classes):
            for index in range(2):
                relpath = f"{domain}/{classname}/{index}.png"
                mode = FIXTURE_MODES[counter % len(FIXTURE_MODES)]
                write_image(root / folder / "images" / relpath, mode)
                listed = f"images/{relpath}" if counter % 2 else relpath
                rows[domain].append([listed, label, classname])
                counter += 1
    for target in domains:
        sources = [row for domain in domains if domain != target for row in rows[domain]]
        split = {"train": sources[::2], "val": sources[1::2], "test": rows[target]}
        write_json(root / folder / f"test_on_{target.lower()}.json", split)
    return rows


@pytest.fixture
def pacs_root(tmp_path: Path) -> Path:
    make_domain_dataset(tmp_path, "PACS", PACS_DOMAINS)
    return tmp_path


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made by a test vanish with it."""
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))


def split_path(root: Path, domain: str = "photo") -> Path:
    return root / "PACS" / f"test_on_{domain}.json"


def rewrite_split(root: Path, edit) -> Path:
    path = split_path(root)
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))
    return path


def raised(error_type: type[Exception], call, *args, **kwargs) -> str:
    """The message of the error `call` raises, checked to be a single line."""
    with pytest.raises(error_type) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- registry ---------------------------------------------------------------------------


def test_builtin_datasets_are_registered_with_their_default_open_sets() -> None:
    names = dataset_names()
    for name in (
        "PACS",
        "VLCS",
        "digits",
        "DTD",
        "Food101",
        "Caltech101",
        "digits_open_val",
        "digits_open_test",
    ):
        assert name in names
    pacs = get_dataset_spec("pacs")
    assert pacs.domains == PACS_DOMAINS
    assert (pacs.val_open_sets, pacs.test_open_sets) == (("Food101",), ("DTD",))
    assert get_dataset_spec("VLCS").domains == ("CALTECH", "LABELME", "PASCAL", "SUN")
    digits = get_dataset_spec("digits")
    assert digits.hflip is False and digits.builder is not None
    assert digits.val_open_sets == ("digits_open_val",)
    assert digits.test_open_sets == ("digits_open_test",)
    assert get_dataset_spec("Caltech101").image_subdir == "101_ObjectCategories"
    for name in ("DTD", "Food101", "Caltech101"):
        assert get_dataset_spec(name).split_file.startswith("split_zhou_")
        assert get_dataset_spec(name).kind == "open_set"


def test_unknown_dataset_lists_the_known_ones() -> None:
    message = raised(ConfigError, get_dataset_spec, "OfficeHomes")
    assert "OfficeHomes" in message and "PACS" in message and "digits" in message


@pytest.mark.usefixtures("isolated_registry")
def test_register_refuses_to_silently_replace_a_different_spec() -> None:
    spec = DatasetSpec(name="Toy", kind="open_set", folder="toy")
    register_dataset(spec)
    register_dataset(spec)  # the same spec again is harmless
    assert get_dataset_spec("TOY") is spec
    other = DatasetSpec(name="toy", kind="open_set", folder="elsewhere")
    assert "already registered" in raised(ConfigError, register_dataset, other)
    register_dataset(other, replace=True)
    assert get_dataset_spec("toy").folder == "elsewhere"


def test_spec_validation() -> None:
    assert "kind" in raised(ConfigError, DatasetSpec, name="x", kind="folder", folder="x")
    assert "domains" in raised(ConfigError, DatasetSpec, name="x", kind="domain_split", folder="x")


# --- domain splits ----------------------------------------------------------------------


def test_load_domain_split_reads_the_pacs_layout(pacs_root: Path) -> None:
    split = load_domain_split("PACS", pacs_root, "Photo")
    assert split.target_domain == "photo"
    assert split.source_domains == ("art_painting", "cartoon", "sketch")
    assert split.classnames == PACS_CLASSES
    assert split.split_file == (pacs_root / "PACS" / "test_on_photo.json").absolute()
    assert len(split.train) + len(split.val) == 12 and len(split.test) == 4
    assert {sample.domain for sample in split.test} == {"photo"}
    assert {sample.domain for sample in split.train + split.val} == set(split.source_domains)
    for sample in split.train + split.val + split.test:
        assert sample.path.is_absolute() and sample.path.is_file()
        assert sample.path.parent.name == sample.classname
        assert split.classnames[sample.label] == sample.classname
        assert "images/images" not in sample.path.as_posix()
    assert split.part("val") == split.val


def test_vlcs_split_files_use_lower_case_domains(tmp_path: Path) -> None:
    make_domain_dataset(tmp_path, "VLCS", ("CALTECH", "LABELME", "PASCAL", "SUN"))
    split = load_domain_split("VLCS", tmp_path, "caltech")
    assert split.target_domain == "CALTECH"
    assert split.split_file.name == "test_on_caltech.json"
    assert {sample.domain for sample in split.test} == {"CALTECH"}


def test_unknown_target_domain_lists_the_domains(pacs_root: Path) -> None:
    message = raised(ConfigError, load_domain_split, "PACS", pacs_root, "clipart")
    assert "clipart" in message and "art_painting, cartoon, photo, sketch" in message


def test_loaders_reject_the_other_layout(pacs_root: Path) -> None:
    assert "load_open_set" in raised(ConfigError, load_open_set, "PACS", pacs_root)
    assert "load_domain_split" in raised(ConfigError, load_domain_split, "DTD", pacs_root, "x")


def test_missing_dataset_folder_says_where_it_looked(tmp_path: Path) -> None:
    message = raised(DataError, load_domain_split, "PACS", tmp_path, "photo")
    assert f"dataset PACS not found at {tmp_path.absolute() / 'PACS'}" in message
    assert "--data-root" in message and "OoD-Bench" in message


def test_missing_split_file(pacs_root: Path) -> None:
    split_path(pacs_root).unlink()
    message = raised(DataError, load_domain_split, "PACS", pacs_root, "photo")
    assert "split file not found" in message and str(split_path(pacs_root)) in message


def test_split_file_that_is_not_json_reports_the_position(pacs_root: Path) -> None:
    split_path(pacs_root).write_text('{"train": [\n  ["a.png", 0, "dog"]\n  ["b.png"')
    message = raised(DataError, load_domain_split, "PACS", pacs_root, "photo")
    assert "is not valid JSON" in message and "line 3 column 3" in message
    assert str(split_path(pacs_root)) in message


def test_split_file_that_is_not_an_object(pacs_root: Path) -> None:
    write_json(split_path(pacs_root), [["a.png", 0, "dog"]])
    assert "JSON object" in raised(DataError, load_domain_split, "PACS", pacs_root, "photo")


def test_split_file_missing_a_part(pacs_root: Path) -> None:
    rewrite_split(pacs_root, lambda content: content.pop("val"))
    message = raised(DataError, load_domain_split, "PACS", pacs_root, "photo")
    assert "has no 'val' list" in message and "train, val, test" in message


@pytest.mark.parametrize(
    "bad_row",
    [
        ["photo/dog/0.png", 0],
        ["photo/dog/0.png", "0", "dog"],
        ["photo/dog/0.png", True, "dog"],
        ["photo/dog/0.png", -1, "dog"],
        ["photo/dog/0.png", 0, ""],
        "photo/dog/0.png",
        {"path": "photo/dog/0.png"},
    ],
)
def test_malformed_rows_name_the_part_and_row(pacs_root: Path, bad_row: object) -> None:
    rewrite_split(pacs_root, lambda content: content["test"].insert(1, bad_row))
    message = raised(DataError, load_domain_split, "PACS", pacs_root, "photo")
    assert "test row 1 must be [relpath, label >= 0, classname]" in message


def test_a_part_that_is_not_a_list(pacs_root: Path) -> None:
    rewrite_split(pacs_root, lambda content: content.update(val={"a": 1}))
    assert "'val' must be a list" in raised(
        DataError, load_domain_split, "PACS", pacs_root, "photo"
    )


@pytest.mark.parametrize("relpath", ["/etc/passwd", "../outside/x.png", "photo\\..\\..\\x.png"])
def test_rows_must_stay_inside_the_image_folder(pacs_root: Path, relpath: str) -> None:
    rewrite_split(pacs_root, lambda content: content["train"].append([relpath, 0, "dog"]))
    assert "must be relative" in raised(DataError, load_domain_split, "PACS", pacs_root, "photo")


def test_one_label_with_two_names(pacs_root: Path) -> None:
    rewrite_split(pacs_root, lambda content: content["test"][0].__setitem__(2, "puppy"))
    message = raised(DataError, load_domain_split, "PACS", pacs_root, "photo")
    assert "label 0 is named both 'dog' and 'puppy'" in message


def test_one_name_with_two_labels(pacs_root: Path) -> None:
    rewrite_split(
        pacs_root, lambda content: content["test"].append(["photo/dog/0.png", 2, "elephant"])
    )
    message = raised(DataError, load_domain_split, "PACS", pacs_root, "photo")
    assert "class 'elephant' has two labels, 1 and 2" in message


def test_labels_must_not_skip_a_class(pacs_root: Path) -> None:
    def shift_elephant(content: dict) -> None:
        for rows in content.values():
            for row in rows:
                row[1] = 2 if row[2] == "elephant" else row[1]

    rewrite_split(pacs_root, shift_elephant)
    message = raised(DataError, load_domain_split, "PACS", pacs_root, "photo")
    assert "no gaps" in message and "[1]" in message


def test_rows_must_start_with_a_known_domain(pacs_root: Path) -> None:
    rewrite_split(pacs_root, lambda content: content["train"].append(["dog/0.png", 0, "dog"]))
    message = raised(DataError, load_domain_split, "PACS", pacs_root, "photo")
    assert "train row 6" in message and "'dog/0.png' must start with a domain folder" in message


@pytest.mark.parametrize(
    ("part", "row"),
    [("test", ["sketch/dog/0.png", 0, "dog"]), ("val", ["photo/dog/0.png", 0, "dog"])],
)
def test_target_domain_must_not_leak_into_training(pacs_root: Path, part: str, row: list) -> None:
    rewrite_split(pacs_root, lambda content: content[part].append(row))
    message = raised(DataError, load_domain_split, "PACS", pacs_root, "photo")
    assert f"{part} lists" in message and "target-domain (photo)" in message


def test_listed_image_that_is_absent(pacs_root: Path) -> None:
    gone = pacs_root / "PACS" / "images" / "sketch" / "dog" / "1.png"
    gone.unlink()
    (pacs_root / "PACS" / "images" / "sketch" / "elephant" / "1.png").unlink()
    message = raised(DataError, load_domain_split, "PACS", pacs_root, "photo")
    assert f"not found: {gone.absolute()}" in message and "(and 1 more)" in message
    assert "test_on_photo.json" in message


# --- images -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "1", "RGB", "RGBA", "LA", "P", "CMYK", "I", "F"])
def test_load_image_converts_every_mode_to_rgb(tmp_path: Path, mode: str) -> None:
    suffix = {"CMYK": ".jpg", "I": ".tif", "F": ".tif"}.get(mode, ".png")
    path = write_image(tmp_path / f"image{suffix}", "RGB")
    Image.open(path).convert(mode).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (6, 5)


def test_transparency_is_composited_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 0))
    rgba.save(tmp_path / "rgba.png")
    assert load_image(tmp_path / "rgba.png").getpixel((1, 0)) == (255, 255, 255)
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([10, 20, 30, 200, 100, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "palette.png", transparency=1)
    loaded = load_image(tmp_path / "palette.png")
    assert loaded.getpixel((0, 0)) == (10, 20, 30) and loaded.getpixel((1, 0)) == (255, 255, 255)


def test_sixteen_bit_images_are_rescaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert [load_image(tmp_path / "deep.png").getpixel((x, 0))[0] for x in range(3)] == [
        0,
        128,
        255,
    ]


def test_missing_and_unreadable_images(tmp_path: Path) -> None:
    assert f"image not found: {tmp_path / 'nope.png'}" in raised(
        DataError, load_image, tmp_path / "nope.png"
    )
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not an image")
    assert f"cannot read image {garbage}" in raised(DataError, load_image, garbage)
    truncated = write_image(tmp_path / "truncated.png", size=(64, 64))
    truncated.write_bytes(truncated.read_bytes()[:200])
    assert f"cannot read image {truncated}" in raised(DataError, load_image, truncated)


# --- open sets --------------------------------------------------------------------------


@pytest.mark.usefixtures("isolated_registry")
def test_image_folder_open_set(tmp_path: Path) -> None:
    register_dataset(DatasetSpec(name="toy_open", kind="open_set", folder="toy", image_subdir=""))
    for classname in ("zebra", "apple"):
        for index in range(3):
            write_image(tmp_path / "toy" / classname / f"{index}.PNG")
    (tmp_path / "toy" / "zebra" / "notes.txt").write_text("not an image")
    write_image(tmp_path / "toy" / ".hidden" / "x.png")
    open_set = load_open_set("toy_open", tmp_path, split="val")  # image folders ignore split
    assert open_set.classnames == ("apple", "zebra")
    assert len(open_set.samples) == 6
    assert {sample.label for sample in open_set.samples} == {-1}
    assert all(sample.path.suffix == ".PNG" for sample in open_set.samples)


@pytest.mark.usefixtures("isolated_registry")
def test_image_folder_open_set_with_domains_in_file_names(tmp_path: Path) -> None:
    register_dataset(
        DatasetSpec(
            name="toy_open",
            kind="open_set",
            folder="toy",
            image_subdir="",
            domains=("ink", "paint"),
            domain_in_filename=True,
        )
    )
    write_image(tmp_path / "toy" / "zebra" / "ink_0.png")
    write_image(tmp_path / "toy" / "zebra" / "paint_0.png")
    assert [s.domain for s in load_open_set("toy_open", tmp_path).samples] == ["ink", "paint"]
    write_image(tmp_path / "toy" / "zebra" / "pencil_0.png")
    message = raised(DataError, load_open_set, "toy_open", tmp_path)
    assert "pencil_0.png" in message and "ink, paint" in message


@pytest.mark.usefixtures("isolated_registry")
def test_empty_image_folder_open_set(tmp_path: Path) -> None:
    register_dataset(DatasetSpec(name="toy_open", kind="open_set", folder="toy", image_subdir=""))
    (tmp_path / "toy" / "zebra").mkdir(parents=True)
    message = raised(DataError, load_open_set, "toy_open", tmp_path)
    assert "holds no images" in message and "<class>/<image file>" in message


def make_coop_dataset(root: Path, folder: str, image_subdir: str, split_file: str) -> None:
    split: dict[str, list[list]] = {"train": [], "val": [], "test": []}
    for label, classname in enumerate(("banded", "zigzagged")):
        for index, part in enumerate(("train", "val", "test", "test")):
            relpath = f"{classname}/{classname}_{index}.jpg"
            write_image(root / folder / image_subdir / relpath, "RGB")
            split[part].append(
                [relpath if index else f"{image_subdir}/{relpath}", label, classname]
            )
    write_json(root / folder / split_file, split)


@pytest.mark.parametrize(
    ("name", "folder", "image_subdir", "split_file"),
    [
        ("DTD", "dtd", "images", "split_zhou_DescribableTextures.json"),
        ("Food101", "food-101", "images", "split_zhou_Food101.json"),
        ("Caltech101", "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    ],
)
def test_coop_layout_open_sets(
    tmp_path: Path, name: str, folder: str, image_subdir: str, split_file: str
) -> None:
    make_coop_dataset(tmp_path, folder, image_subdir, split_file)
    test_set = load_open_set(name, tmp_path)
    assert test_set.classnames == ("banded", "zigzagged")
    assert len(test_set.samples) == 4
    assert {sample.label for sample in test_set.samples} == {-1}
    assert all(sample.path.is_file() for sample in test_set.samples)
    assert test_set.source == (tmp_path / folder / split_file).absolute()
    train_set = load_open_set(name, tmp_path, split="train")
    assert [sample.path.name for sample in train_set.samples] == ["banded_0.jpg", "zigzagged_0.jpg"]
    assert "unknown split" in raised(ConfigError, load_open_set, name, tmp_path, "holdout")


def test_coop_open_set_errors(tmp_path: Path) -> None:
    message = raised(DataError, load_open_set, "DTD", tmp_path)
    assert f"dataset DTD not found at {tmp_path.absolute() / 'dtd'}" in message
    assert "CoOp" in message
    make_coop_dataset(tmp_path, "dtd", "images", "split_zhou_DescribableTextures.json")
    (tmp_path / "dtd" / "images" / "banded" / "banded_3.jpg").unlink()
    assert "banded_3.jpg" in raised(DataError, load_open_set, "DTD", tmp_path)
    load_open_set("DTD", tmp_path, split="train")  # only the requested list must exist
    write_json(tmp_path / "dtd" / "split_zhou_DescribableTextures.json", {"train": []})
    assert "has no 'test' list" in raised(DataError, load_open_set, "DTD", tmp_path)


# --- few-shot ---------------------------------------------------------------------------


def make_samples(per_group: int = 10) -> list[Sample]:
    return [
        Sample(Path(f"/d/{domain}/{label}/{index}.png"), label, f"c{label}", domain)
        for domain in ("a", "b", "c")
        for label in range(3)
        for index in range(per_group)
    ]


def group_counts(samples, per_domain: bool = True) -> dict:
    counts: dict = {}
    for sample in samples:
        key = (sample.label, sample.domain if per_domain else "")
        counts[key] = counts.get(key, 0) + 1
    return counts


def test_few_shot_counts_per_class_and_domain() -> None:
    samples = make_samples()
    picked = sample_few_shot(samples, shots=4, seed=0)
    assert set(group_counts(picked).values()) == {4} and len(picked) == 36
    per_class = sample_few_shot(samples, shots=4, seed=0, per_domain=False)
    assert group_counts(per_class, per_domain=False) == {(0, ""): 4, (1, ""): 4, (2, ""): 4}
    assert len(set(picked)) == len(picked) and set(picked) <= set(samples)


def test_few_shot_all_and_small_groups() -> None:
    samples = make_samples(per_group=3)
    for shots in (None, 0, -1):
        assert set(sample_few_shot(samples, shots, seed=0)) == set(samples)
    assert set(sample_few_shot(samples, shots=16, seed=0)) == set(samples)


def test_few_shot_is_reproducible_and_order_independent() -> None:
    samples = make_samples()
    first = sample_few_shot(samples, shots=2, seed=7)
    shuffled = list(samples)
    random.Random(0).shuffle(shuffled)
    assert sample_few_shot(shuffled, shots=2, seed=7) == first
    assert sample_few_shot(samples, shots=2, seed=8) != first
    assert set(first) <= set(sample_few_shot(samples, shots=5, seed=7))


def test_few_shot_picks_of_kept_sets_follow_each_set() -> None:
    # Sets are kept by identity and by value: more sets than are kept, asked again in turn,
    # each as the same tuple and as an equal copy, always pick from that set.
    sets = [tuple(make_samples(per_group=4 + n)) for n in range(KEPT_SETS + 2)]
    fresh = [sample_few_shot(list(samples), shots=3, seed=1) for samples in sets]
    for _ in range(2):
        for samples, expected in zip(sets, fresh, strict=True):
            assert sample_few_shot(samples, shots=3, seed=1) == expected
            assert sample_few_shot(tuple(list(samples)), shots=3, seed=1) == expected
            assert set(expected) <= set(samples)
            where = positions(samples)
            assert [where[s] for s in samples] == list(range(len(samples)))


# --- fingerprints -----------------------------------------------------------------------


def test_fingerprint_tracks_content_not_location(pacs_root: Path, tmp_path_factory) -> None:
    samples = load_domain_split("PACS", pacs_root, "photo").train
    key = dataset_fingerprint(samples)
    assert key == dataset_fingerprint(samples) and len(key) == 64
    moved_root = tmp_path_factory.mktemp("moved")
    shutil.copytree(pacs_root / "PACS", moved_root / "PACS")  # copy2 keeps mtimes
    assert dataset_fingerprint(load_domain_split("PACS", moved_root, "photo").train) == key
    assert dataset_fingerprint(samples[::-1]) != key
    relabelled = [Sample(s.path, 1 - s.label, s.classname, s.domain) for s in samples]
    assert dataset_fingerprint(relabelled) != key
    write_image(samples[0].path, "RGB", size=(9, 9))
    assert dataset_fingerprint(samples) != key
    samples[1].path.unlink()
    assert str(samples[1].path) in raised(DataError, dataset_fingerprint, samples)
