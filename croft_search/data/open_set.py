"""Open-set (semantic-shift) image sets: plain class folders or CoOp split files."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from croft_search.data.base import OpenSet, Sample
from croft_search.data.domain_split import load_domain_split
from croft_search.data.generated_splits import generated_location
from croft_search.data.images import is_image_file
from croft_search.data.locate import dataset_dir
from croft_search.data.registry import DatasetSpec, get_dataset_spec, require_kind
from croft_search.data.split_file import (
    SPLIT_PARTS,
    check_images_exist,
    classnames_by_label,
    image_relpath,
    read_split_file,
)
from croft_search.errors import ConfigError, DataError

OPEN_SET_LABEL = -1


def load_open_set(name: str, root: Path, split: str = "test") -> OpenSet:
    """Every image of open-set dataset `name` under the data root `root`, labelled -1.
    `split` picks the list of a CoOp split file; image-folder sets have no splits."""
    spec = get_dataset_spec(name)
    if split not in SPLIT_PARTS:
        raise ConfigError(f"unknown split {split!r}; expected one of {', '.join(SPLIT_PARTS)}")
    if spec.kind == "domain_split" and spec.is_open_set:
        return _from_id_dataset(spec, root, split)
    require_kind(spec, "open_set", "load_open_set")
    folder = dataset_dir(spec, root)
    if spec.split_file:
        return _from_split_file(spec, folder, split)
    return _from_image_folder(spec, folder)


def _from_image_folder(spec: DatasetSpec, folder: Path) -> OpenSet:
    class_dirs = sorted(
        child for child in folder.iterdir() if child.is_dir() and not child.name.startswith(".")
    )
    samples = tuple(
        Sample(
            path=path,
            label=OPEN_SET_LABEL,
            classname=class_dir.name,
            domain=_filename_domain(spec, path) if spec.domain_in_filename else "",
        )
        for class_dir in class_dirs
        for path in sorted(class_dir.iterdir())
        if is_image_file(path)
    )
    if not samples:
        raise DataError(
            f"open set {spec.name} at {folder} holds no images; expected "
            f"{folder}/<class>/<image file>"
        )
    classnames = tuple(sorted({sample.classname for sample in samples}))
    return OpenSet(name=spec.name, classnames=classnames, samples=samples, source=folder)


def class_key(name: str) -> str:
    """A class name compared across datasets: case, spaces, underscores and hyphens aside."""
    return "".join(ch for ch in name.lower() if ch.isalnum())


def id_classes_in(open_classnames: Iterable[str], id_classnames: Iterable[str]) -> set[str]:
    """The open set's classes that are also ID classes, by `class_key`: an ID class in the
    open set would count correct recognitions as missed detections."""
    id_keys = {class_key(name) for name in id_classnames}
    return {name for name in open_classnames if class_key(name) in id_keys}


def _from_id_dataset(spec: DatasetSpec, root: Path, split: str) -> OpenSet:
    """A dataset without domains as another's open set: its ``split`` images, labelled -1."""
    id_split = load_domain_split(spec.name, root, spec.domains[0])
    samples = tuple(
        Sample(path=s.path, label=OPEN_SET_LABEL, classname=s.classname)
        for s in id_split.part(split)
    )
    if not samples:
        raise DataError(f"dataset {spec.name} has no {split} images to serve as an open set")
    return OpenSet(spec.name, id_split.classnames, samples, id_split.split_file)


def _filename_domain(spec: DatasetSpec, path: Path) -> str:
    domain = path.name.split("_", 1)[0]
    if domain not in spec.domains:
        raise DataError(
            f"open set {spec.name}: image {path} should be named <domain>_<index> with "
            f"<domain> one of {', '.join(spec.domains)}"
        )
    return domain


def _from_split_file(spec: DatasetSpec, folder: Path, split: str) -> OpenSet:
    split_dir, image_dir = folder, folder / spec.image_subdir
    if spec.split_writer is not None:  # generated lists (Setup I's open-set classes)
        split_dir, image_dir = generated_location(spec, folder)
    split_path = split_dir / spec.split_file
    rows = read_split_file(split_path, required=(split,))[split]
    samples = tuple(
        Sample(
            path=image_dir / image_relpath(row.relpath, spec.image_subdir),
            label=OPEN_SET_LABEL,
            classname=row.classname,
        )
        for row in rows
    )
    check_images_exist((sample.path for sample in samples), split_path, image_dir)
    if not samples:
        raise DataError(f"split file {split_path} lists no images under {split!r}")
    return OpenSet(
        name=spec.name,
        classnames=classnames_by_label([rows], split_path),
        samples=samples,
        source=split_path,
    )
