"""Datasets beyond OoD-Bench's split files, on tiny fixtures written here: DomainBed's
folders (generated leave-one-domain-out splits), a user's dataset declared in YAML, CIFAR's
pickle archives, image folders without domains (ImageNet, PLP's OOD sets), and their bad
inputs."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from croft_search.contract import check_setting
from croft_search.data import get_dataset_spec, load_domain_split, load_open_set
from croft_search.data import registry as registry_module
from croft_search.errors import ConfigError, DataError


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Registrations and generated files made by a test vanish with it."""
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))
    monkeypatch.setattr(registry_module, "_FILES", {})
    monkeypatch.setenv("CROFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CROFT_DATA", raising=False)


def image(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4, 3), value % 256, dtype=np.uint8)).save(path)


def domain_folders(root: Path, domains, classes, per_class: int = 5) -> None:
    for domain in domains:
        for name in classes:
            for index in range(per_class):
                image(root / domain / name / f"{index}.png", index)


def message(error: type[Exception], call, *args) -> str:
    with pytest.raises(error) as caught:
        call(*args)
    text = str(caught.value)
    assert "\n" not in text
    return text


# --- DomainBed's layout ------------------------------------------------------------------


def test_domainbed_folders_give_seeded_leave_one_domain_out_splits(tmp_path: Path) -> None:
    domain_folders(tmp_path / "office_home", ("Art", "Clipart", "Product", "Real World"),
                   ("Alarm_Clock", "Bed"), per_class=10)  # fmt: skip
    split = load_domain_split("OfficeHome", tmp_path, "clipart")
    assert split.target_domain == "Clipart"
    assert split.source_domains == ("Art", "Product", "Real World")
    assert split.classnames == ("Alarm Clock", "Bed")
    # DomainBed's held-out fraction: int(20 * 0.2) = 4 of each source domain's 20 images.
    assert len(split.val) == 3 * 4 and len(split.train) == 3 * 16
    assert len(split.test) == 20 and {s.domain for s in split.test} == {"Clipart"}
    assert not {s.path for s in split.train} & {s.path for s in split.val}
    # Every target holds out the same images of a shared source domain.
    other = load_domain_split("OfficeHome", tmp_path, "Product")
    assert {s.path for s in split.val if s.domain == "Art"} == {
        s.path for s in other.val if s.domain == "Art"
    }
    again = load_domain_split("OfficeHome", tmp_path, "Clipart")
    assert again.val == split.val and again.split_file == split.split_file
    assert split.split_file.is_relative_to(tmp_path / "cache")


def test_the_split_seed_changes_the_held_out_images(tmp_path: Path) -> None:
    domain_folders(tmp_path / "terra_incognita",
                   ("location_100", "location_38", "location_43", "location_46"), ("bird",),
                   per_class=20)  # fmt: skip
    spec = get_dataset_spec("TerraIncognita")
    first = load_domain_split(spec.name, tmp_path, "location_38")
    registry_module.register_dataset(
        registry_module.DatasetSpec(**{**spec.__dict__, "split_seed": 1}), replace=True
    )
    second = load_domain_split(spec.name, tmp_path, "location_38")
    assert len(first.val) == len(second.val) == 12
    assert {s.path for s in first.val} != {s.path for s in second.val}


def test_oodbench_split_files_win_over_domain_folders(tmp_path: Path) -> None:
    domain_folders(tmp_path / "PACS", ("art_painting", "cartoon", "photo", "sketch"), ("dog",))
    rows = {d: [[f"{d}/dog/{i}.png", 0, "dog"] for i in range(5)]
            for d in ("art_painting", "cartoon", "photo", "sketch")}  # fmt: skip
    for d in rows:
        image_dir = tmp_path / "PACS" / "images"
        for row in rows[d]:
            image(image_dir / row[0])
    split = {"train": rows["art_painting"], "val": rows["cartoon"] + rows["sketch"],
             "test": rows["photo"]}  # fmt: skip
    (tmp_path / "PACS" / "test_on_photo.json").write_text(json.dumps(split))
    loaded = load_domain_split("PACS", tmp_path, "photo")
    assert len(loaded.train) == 5 and len(loaded.val) == 10
    assert loaded.split_file == tmp_path / "PACS" / "test_on_photo.json"


def test_vlcs_reads_domainbeds_folder_names(tmp_path: Path) -> None:
    domain_folders(tmp_path / "VLCS", ("Caltech101", "LabelMe", "VOC2007", "SUN09"), ("car",))
    split = load_domain_split("VLCS", tmp_path, "PASCAL")
    assert {s.domain for s in split.test} == {"PASCAL"}
    assert {s.domain for s in split.train} == {"CALTECH", "LABELME", "SUN"}


def test_a_class_missing_from_a_domain_is_refused(tmp_path: Path) -> None:
    domain_folders(tmp_path / "domain_net",
                   ("clipart", "infograph", "painting", "quickdraw", "real", "sketch"),
                   ("apple",))  # fmt: skip
    image(tmp_path / "domain_net" / "real" / "zebra" / "0.png")
    text = message(DataError, load_domain_split, "DomainNet", tmp_path, "real")
    assert "class 'zebra'" in text and "clipart" in text and "every domain" in text


def test_a_missing_domain_folder_is_named(tmp_path: Path) -> None:
    domain_folders(tmp_path / "office_home", ("Art", "Clipart", "Product"), ("Bed",))
    text = message(DataError, load_domain_split, "OfficeHome", tmp_path, "Art")
    assert "Real World" in text and "not found" in text


# --- a user's dataset in YAML ------------------------------------------------------------


def write_yaml(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_yaml_dataset_in_domain_folders_loads_with_its_open_sets(tmp_path: Path) -> None:
    domain_folders(tmp_path / "flowers", ("photo", "sketch", "paint"), ("rose", "tulip"))
    for name in ("stone", "weed"):
        image(tmp_path / "weeds" / name / "0.png")
    path = write_yaml(
        tmp_path / "flowers.yaml",
        """
name: flowers
layout: domain_folders
domains: [photo, sketch, paint]
prompt_template: "a photo of a {}, a type of flower."
val_open_sets: [{name: weeds, folder: weeds}]
test_open_sets: [weeds]
holdout_fraction: 0.4
""",
    )
    spec = get_dataset_spec(str(path))
    assert spec.name == "flowers" and spec.prompt_template.endswith("flower.")
    split = load_domain_split(str(path), tmp_path, "sketch")
    assert len(split.val) == 2 * 4 and len(split.train) == 2 * 6
    weeds = load_open_set("weeds", tmp_path)
    assert weeds.classnames == ("stone", "weed") and {s.label for s in weeds.samples} == {-1}
    # Named through the data root instead of its path, the same dataset.
    assert get_dataset_spec("flowers") is spec


def test_a_yaml_dataset_under_the_data_root_is_found_by_name(tmp_path: Path, monkeypatch) -> None:
    domain_folders(tmp_path / "cars", ("day", "night"), ("sedan",))
    write_yaml(tmp_path / "cars.yaml", "name: cars\nlayout: domain_folders\n"
               "domains: [day, night]\ntrain_domains: [day]\n")  # fmt: skip
    monkeypatch.setenv("CROFT_DATA", str(tmp_path))
    spec = get_dataset_spec("cars")
    assert spec.target_domains == ("night",)
    split = load_domain_split("cars", tmp_path, "night")
    assert split.source_domains == ("day",)
    text = message(ConfigError, load_domain_split, "cars", tmp_path, "day")
    assert "tests on night" in text


def test_a_yaml_image_folder_dataset_holds_out_validation(tmp_path: Path) -> None:
    for part, count in (("train", 10), ("test", 3)):
        for name in ("cat", "dog"):
            for index in range(count):
                image(tmp_path / "pets" / part / name / f"{index}.png", index)
    (tmp_path / "pets" / "classnames.txt").write_text("cat house cat\ndog hound\n")
    path = write_yaml(tmp_path / "pets.yaml", "name: pets\nlayout: image_folder\n"
                      "test_open_sets: [Food101]\n")  # fmt: skip
    split = load_domain_split(str(path), tmp_path, "pets")
    assert split.classnames == ("house cat", "hound")
    assert len(split.train) == 16 and len(split.val) == 4 and len(split.test) == 6
    assert split.source_domains == ("pets",) and split.target_domain == "pets"


def test_the_dataset_setting_makes_a_dataset_file_absolute(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert check_setting("dataset", "sets/mine.yaml") == str(tmp_path / "sets" / "mine.yaml")
    assert check_setting("dataset", "PACS") == "PACS"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("name: x\nlayout: folders\n", "layout must be one of"),
        ("name: x\nlayout: domain_folders\nfolder: nowhere\ndomains: [a]\n", "folder"),
        ("layout: image_folder\n", "name is required"),
        ("name: x\nlayout: image_folder\nfolder: .\ncolour: red\n", "unknown key 'colour'"),
        ("name: x\nlayout: domain_folders\nfolder: .\n", "domains is required"),
        ("name: x\nlayout: domain_folders\nfolder: .\ndomains: [a]\ntrain_domains: [b]\n",
         "train_domains 'b'"),
        ("name: x\nlayout: image_folder\nfolder: .\ntest_open_sets: []\n",
         "test_open_sets must be a non-empty list"),
        ("name: x\nlayout: image_folder\nfolder: .\nval_open_sets: [Nowhere]\n",
         "unknown dataset 'Nowhere'"),
        ("name: x\nlayout: image_folder\nfolder: .\nprompt_template: a photo\n",
         "prompt_template"),
        ("name: PACS\nlayout: image_folder\nfolder: .\n", "already the name"),
        ("name: [x\n", "not valid YAML at line"),
    ],
)  # fmt: skip
def test_a_bad_dataset_file_is_one_line_naming_file_and_key(tmp_path, body, expected) -> None:
    path = write_yaml(tmp_path / "bad.yaml", body)
    text = message(ConfigError, get_dataset_spec, str(path))
    assert expected in text and str(path) in text


# --- CIFAR archives ----------------------------------------------------------------------


def write_cifar10(folder: Path, per_class: int = 3) -> None:
    folder.mkdir(parents=True)
    names = [b"airplane", b"cat"]
    with (folder / "batches.meta").open("wb") as handle:
        pickle.dump({b"label_names": names}, handle)
    rng = np.random.default_rng(0)
    for index, file in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        labels = [0, 1] * per_class
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        data[:, 0] = index  # a marker pixel: which file an image came from
        with (folder / file).open("wb") as handle:
            pickle.dump({b"data": data, b"labels": labels}, handle)


def write_cifar100(folder: Path) -> None:
    folder.mkdir(parents=True)
    with (folder / "meta").open("wb") as handle:
        pickle.dump({b"fine_label_names": [b"aquarium_fish", b"maple_tree"]}, handle)
    for file, count in (("train", 10), ("test", 2)):
        data = np.zeros((count * 2, 3072), dtype=np.uint8)
        with (folder / file).open("wb") as handle:
            pickle.dump({b"data": data, b"fine_labels": [0, 1] * count}, handle)


def test_cifar_archives_load_as_images_and_as_each_others_open_set(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "cifar-10-batches-py")
    write_cifar100(tmp_path / "cifar-100-python")
    split = load_domain_split("CIFAR10", tmp_path, "CIFAR10")
    assert split.classnames == ("airplane", "cat")
    assert len(split.train) + len(split.val) == 5 * 6 and len(split.test) == 6
    assert len(split.val) == 2 * int(15 * 0.2)
    first = split.test[0]
    pixels = np.asarray(Image.open(first.path))
    assert pixels.shape == (32, 32, 3) and pixels[0, 0, 0] == 5  # test_batch's marker
    outside = load_open_set("CIFAR100", tmp_path, split="test")
    assert outside.classnames == ("aquarium fish", "maple tree")
    assert len(outside.samples) == 4 and {s.label for s in outside.samples} == {-1}
    assert len(load_open_set("CIFAR100", tmp_path, split="val").samples) == 2 * 2


def test_a_broken_cifar_archive_is_one_line(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    text = message(DataError, load_domain_split, "CIFAR10", tmp_path, "CIFAR10")
    assert "data_batch_3" in text
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    assert "data_batch_3 not found" in message(
        DataError, load_domain_split, "CIFAR10", tmp_path, "CIFAR10"
    )


# --- ImageNet and PLP's OOD image folders ------------------------------------------------


def test_imagenet_as_coop_keeps_it_and_plps_ood_folders(tmp_path: Path) -> None:
    base = tmp_path / "imagenet" / "images"
    for wnid in ("n01440764", "n01443537"):
        for index in range(50):
            image(base / "train" / wnid / f"{index}.JPEG", index)
        image(base / "val" / wnid / "v.JPEG")
    (tmp_path / "imagenet" / "classnames.txt").write_text("n01440764 tench\nn01443537 goldfish\n")
    split = load_domain_split("IN1K", tmp_path, "IN1K")
    assert split.classnames == ("tench", "goldfish")
    assert len(split.val) == 2 and len(split.train) == 98 and len(split.test) == 2
    for index in range(3):
        image(tmp_path / "iNaturalist" / "images" / f"{index}.jpg")
    inaturalist = load_open_set("iNaturalist", tmp_path)
    assert len(inaturalist.samples) == 3
    spec = get_dataset_spec("IN1K")
    assert spec.test_open_sets == ("iNaturalist", "SUN", "Places", "Textures", "NINCO",
                                   "ImageNet-O")  # fmt: skip


def test_an_empty_open_set_is_refused(tmp_path: Path) -> None:
    (tmp_path / "SUN" / "images").mkdir(parents=True)
    assert "holds no images" in message(DataError, load_open_set, "SUN", tmp_path)


def test_an_image_folder_without_a_test_folder_is_named(tmp_path: Path) -> None:
    image(tmp_path / "imagenet" / "images" / "train" / "n0" / "0.JPEG")
    text = message(DataError, load_domain_split, "IN1K", tmp_path, "IN1K")
    assert "val not found" in text and "image-folder layout" in text


# --- end to end: a user's dataset through the feature cache and a trial ------------------


def test_a_yaml_dataset_trains_and_reports_each_open_set(tmp_path, weights, capsys) -> None:
    from croft_search.train import main as train_main

    for part, count in (("train", 6), ("test", 3)):
        for value, name in ((40, "dark"), (220, "light")):
            for index in range(count):
                image(tmp_path / "tones" / part / name / f"{index}.png", value + index)
    for set_name, value in (("reds", 120), ("greens", 160)):
        for index in range(3):
            image(tmp_path / set_name / "any" / f"{index}.png", value + index)
    # An ID class inside an open set is dropped from it, with a warning.
    image(tmp_path / "greens" / "Dark" / "0.png", 40)
    path = write_yaml(
        tmp_path / "tones.yaml",
        """
name: tones
layout: image_folder
prompt_template: "a {} picture."
val_open_sets: [{name: reds, folder: reds}]
test_open_sets: [reds, {name: greens, folder: greens}]
""",
    )
    out = tmp_path / "metrics.json"
    with pytest.warns(UserWarning, match=r"open set greens: dropped 1 class.*\(Dark\)"):
        code = train_main([
        "--method", "zsclip", "--dataset", str(path), "--target-domain", "tones",
        "--views", "1", "--pretrained", str(weights), "--data-root", str(tmp_path),
        "--cache-dir", str(tmp_path / "features"), "--json", str(out),
        ])  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    for metric in ("auroc", "fpr95"):
        per_set = [result[f"test_{metric}_reds"], result[f"test_{metric}_greens"]]
        assert result[f"test_{metric}"] == pytest.approx(sum(per_set) / 2)
    assert 0.0 <= result["test_acc"] <= 1.0 and result["target_domains"] == "tones"


# --- Setup I of the CRoFT paper ----------------------------------------------------------


def write_setup1(root: Path, n_classes: int = 10) -> list[str]:
    wnids = [f"n{index:08d}" for index in range(n_classes)]
    (root / "imagenet").mkdir(parents=True)
    (root / "imagenet" / "classnames.txt").write_text(
        "".join(f"{w} class {i}\n" for i, w in enumerate(wnids))
    )
    for index, wnid in enumerate(wnids):
        for part, count in (("train", 6), ("val", 5)):
            for k in range(count):
                image(root / "imagenet" / "images" / part / wnid / f"{k}.JPEG", k)
        image(root / "imagenetv2" / "imagenetv2-matched-frequency-format-val" / str(index)
              / "0.jpeg")  # fmt: skip
        image(root / "imagenet-sketch" / "images" / wnid / "0.JPEG")
    for folder in ("imagenet-adversarial/imagenet-a", "imagenet-rendition/imagenet-r"):
        for wnid in wnids[::2]:  # like -A and -R, a subset of the classes
            image(root / folder / wnid / "0.jpg")
    return wnids


def test_setup1_splits_imagenet_classes_as_the_reference_draws_them(tmp_path: Path) -> None:
    wnids = write_setup1(tmp_path)
    np.random.seed(1)  # the reference: Dassl seeds numpy, then the dataset draws
    reference = np.random.choice([f"class {i}" for i in range(10)], 4, replace=False).tolist()
    split = load_domain_split("ImageNet46", tmp_path, "imagenet_a")
    assert list(split.classnames) == reference
    assert split.source_domains == ("imagenet",) and split.target_domain == "imagenet_a"
    assert {s.domain for s in split.train} == {"imagenet"} and len(split.train) == 4 * 6
    assert len(split.val) == 4 * 4 and all("images/val" in str(s.path) for s in split.val)
    ids = {f"class {i}" for i in range(0, 10, 2)} & set(reference)  # -A's classes that are ID
    assert {s.classname for s in split.test} == ids and {s.domain for s in split.test} == {
        "imagenet_a"
    }
    # ImageNet-V2 names its class folders by index into classnames.txt.
    v2 = load_domain_split("ImageNet46", tmp_path, "imagenet_v2")
    assert sorted(s.classname for s in v2.test) == sorted(reference)
    for sample in v2.test:
        index = int(sample.path.parent.name)
        assert f"class {index}" == sample.classname and sample.label == reference.index(
            sample.classname
        )
    assert wnids and get_dataset_spec("ImageNet46").target_domains == (
        "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")  # fmt: skip


def test_setup1_open_set_is_imagenets_other_classes(tmp_path: Path) -> None:
    write_setup1(tmp_path)
    split = load_domain_split("ImageNet46", tmp_path, "imagenet_sketch")
    test = load_open_set("ImageNet46-OOD", tmp_path, split="test")
    val = load_open_set("ImageNet46-OOD", tmp_path, split="val")
    assert not set(test.classnames) & set(split.classnames) and len(test.classnames) == 6
    assert len(test.samples) == 6 * 5 and all("images/val" in str(s.path) for s in test.samples)
    assert len(val.samples) == 6 * 4 and all("images/train" in str(s.path) for s in val.samples)
    assert {s.domain for s in test.samples} == {""}  # the same OOD images for every target


def test_setup1_bad_layout_is_one_line(tmp_path: Path) -> None:
    write_setup1(tmp_path)
    (tmp_path / "imagenet" / "classnames.txt").unlink()
    assert "classnames.txt not found" in message(
        DataError, load_domain_split, "ImageNet46", tmp_path, "imagenet_r"
    )
    write_setup1(tmp_path / "other")
    shutil.rmtree(tmp_path / "other" / "imagenet-rendition")
    text = message(DataError, load_domain_split, "ImageNet46", tmp_path / "other", "imagenet_r")
    assert "imagenet_r not found" in text
    assert "tests on imagenet_v2" in message(
        ConfigError, load_domain_split, "ImageNet46", tmp_path / "other", "imagenet"
    )
