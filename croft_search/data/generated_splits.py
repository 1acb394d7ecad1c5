"""Split files written for datasets that ship none: DomainBed's domain folders, image folders
without domains, and (through `croft_search.data.archives`) CIFAR's pickle archives.

Every writer produces the split files `load_domain_split` reads (`test_on_<domain>.json`,
rows `[relpath, label, classname]`), once, in a folder under the cache root named after
the image listing, the seed and the held-out fraction: the same data and settings reuse the
same files, so every trial of every search trains on the same split, and images added to
the dataset give a new split instead of a stale one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from croft_search.config import cache_root
from croft_search.data.images import is_image_file
from croft_search.data.registry import DatasetSpec
from croft_search.data.split_file import SPLIT_PARTS
from croft_search.errors import DataError

CLASSNAMES_FILE = "classnames.txt"

Listing = dict[str, dict[str, list[str]]]  # group (domain or part) -> class folder -> relpaths


def split_file_name(domain: str) -> str:
    """VLCS's folders are upper-case (CALTECH) but its split files are not
    (test_on_caltech.json); PACS's domains are lower-case already."""
    return f"test_on_{domain.lower()}.json"


def generated_location(spec: DatasetSpec, folder: Path) -> tuple[Path, Path]:
    """(split folder, image folder) of a dataset whose split files are generated: its own
    writer's, else DomainBed's. Once per process and cache root, since a writer lists the
    whole dataset to know whether its files are current, and every split of every target
    asks."""
    return _located(spec, Path(folder), cache_root())


@functools.cache
def _located(spec: DatasetSpec, folder: Path, root: Path) -> tuple[Path, Path]:
    del root  # part of the key only: generated files live under it
    return (spec.split_writer or domainbed_splits)(spec, folder)


def generated_root(spec: DatasetSpec) -> Path:
    return cache_root() / "splits" / spec.name


def has_domain_folders(spec: DatasetSpec, folder: Path) -> bool:
    """Whether ``folder`` holds DomainBed's layout: a folder per domain."""
    return any((folder / spec.domain_folder(domain)).is_dir() for domain in spec.domains)


def domainbed_splits(spec: DatasetSpec, folder: Path) -> tuple[Path, Path]:
    """Leave-one-domain-out split files of a dataset in DomainBed's layout
    (`<folder>/<domain>/<class>/<image>`): each domain's images shuffled with a seed drawn
    from (``spec.split_seed``, domain), its first ``holdout_fraction`` held out for
    validation and the rest for training (DomainBed's out- and in-splits); a target's test
    set is its whole domain. Returns (split folder, image folder)."""
    listing: Listing = {}
    for domain in spec.domains:
        domain_dir = folder / spec.domain_folder(domain)
        if not domain_dir.is_dir():
            raise DataError(
                f"dataset {spec.name}: domain folder {domain_dir} not found (DomainBed "
                f"layout: {folder}/<domain>/<class>/<image>, domains "
                f"{', '.join(spec.domain_folder(d) for d in spec.domains)})"
            )
        listing[domain] = _class_images(domain_dir, folder, f"dataset {spec.name} domain {domain}")
    classes = _shared_classes(spec, listing)
    out = _split_folder(spec, listing, "domainbed")
    if _complete(out, spec.target_domains):
        return out, folder
    held_out: dict[str, list[list]] = {}
    kept: dict[str, list[list]] = {}
    for domain in spec.domains:
        rows = _rows(listing[domain], classes)
        order = np.random.RandomState(_seed(spec.split_seed, domain)).permutation(len(rows))
        n_out = int(len(rows) * spec.holdout_fraction)
        held_out[domain] = [rows[i] for i in order[:n_out]]
        kept[domain] = [rows[i] for i in order[n_out:]]
    for target in spec.target_domains:
        sources = spec.source_domains(target)
        write_json(
            out / split_file_name(target),
            {
                "train": [row for d in sources for row in kept[d]],
                "val": [row for d in sources for row in held_out[d]],
                "test": [row for part in (kept, held_out) for row in part[target]],
            },
        )
    return out, folder


def image_folder_splits(spec: DatasetSpec, folder: Path) -> tuple[Path, Path]:
    """The split file of a dataset without domains laid out as `<folder>/train/<class>/`,
    `<folder>/test/<class>/` and optionally `<folder>/val/<class>/` (the folders
    ``spec.part_folders`` names, under ``spec.image_subdir`` where that exists; without a val
    folder, the ``holdout_fraction`` of each class's training images, seeded, validates).
    Class folders are named by `classnames.txt` (`<folder name> <class name>` per line, as
    CoOp's ImageNet) where the dataset has one, else by themselves with underscores as
    spaces. Returns (split folder, image folder)."""
    base = folder / spec.image_subdir if (folder / spec.image_subdir).is_dir() else folder
    listing: Listing = {}
    for part, name in zip(SPLIT_PARTS, spec.part_folders, strict=True):
        if name and (base / name).is_dir():
            listing[part] = _class_images(base / name, base, f"dataset {spec.name} {part}")
        elif part != "val":
            raise DataError(
                f"dataset {spec.name}: {base / name} not found (image-folder layout: "
                f"{base}/{spec.part_folders[0]}/<class>/<image>, "
                f"{base}/{spec.part_folders[2]}/<class>/<image>, optionally a val folder)"
            )
    classes = sorted(listing["train"])
    stray = sorted(set().union(*listing.values()) - set(classes))
    if stray:
        raise DataError(
            f"dataset {spec.name}: class {stray[0]!r} has images outside the training folder "
            f"{base / spec.part_folders[0]} but none to train on"
        )
    out = _split_folder(spec, listing, "image_folder")
    (domain,) = spec.domains
    if _complete(out, (domain,)):
        return out, base
    names = _class_names((folder, base), classes)
    train = _rows(listing["train"], classes, names)
    if "val" in listing:
        val = _rows(listing["val"], classes, names)
    else:
        train, val = _hold_out(train, spec.holdout_fraction, spec.split_seed)
    test = _rows(listing["test"], classes, names)
    write_json(out / split_file_name(domain), {"train": train, "val": val, "test": test})
    return out, base


def _class_images(group_dir: Path, relative_to: Path, where: str) -> dict[str, list[str]]:
    """Image paths (relative to ``relative_to``) of each class folder of ``group_dir``."""
    found = {}
    for class_dir in sorted(p for p in group_dir.iterdir() if p.is_dir()):
        if class_dir.name.startswith("."):
            continue
        images = sorted(
            path.relative_to(relative_to).as_posix()
            for path in class_dir.rglob("*")
            if path.is_file() and is_image_file(path)
        )
        if images:
            found[class_dir.name] = images
    if not found:
        raise DataError(f"{where}: no images in {group_dir}/<class>/")
    return found


def _shared_classes(spec: DatasetSpec, listing: Listing) -> list[str]:
    """The classes every domain has; one missing from a domain is an error, since a
    leave-one-domain-out split would then test on a class it never trained on."""
    classes = sorted(set().union(*listing.values()))
    for name in classes:
        lacking = [domain for domain in spec.domains if name not in listing[domain]]
        if lacking:
            raise DataError(
                f"dataset {spec.name}: class {name!r} has no images in domain(s) "
                f"{', '.join(lacking)}; every domain needs every class"
            )
    return classes


def _class_names(folders: Sequence[Path], classes: Sequence[str]) -> dict[str, str]:
    path = next((f / CLASSNAMES_FILE for f in folders if (f / CLASSNAMES_FILE).is_file()), None)
    if path is None:
        return {name: name.replace("_", " ") for name in classes}
    names = read_classnames(path)
    missing = [name for name in classes if name not in names]
    if missing:
        raise DataError(f"{path} names no class for folder {missing[0]!r}")
    return {name: names[name] for name in classes}


def read_classnames(path: Path) -> dict[str, str]:
    """`<folder name> <class name>` per line (CoOp's classnames.txt), in the file's order."""
    names: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        key, _, name = line.strip().partition(" ")
        if not name.strip():
            raise DataError(f"{path} line {number}: expected '<folder name> <class name>'")
        names[key] = name.strip()
    return names


def _rows(
    by_class: Mapping[str, list[str]],
    classes: Sequence[str],
    names: Mapping[str, str] | None = None,
) -> list[list]:
    names = names or {name: name.replace("_", " ") for name in classes}
    return [
        [relpath, label, names[name]]
        for label, name in enumerate(classes)
        for relpath in by_class.get(name, [])
    ]


def _hold_out(rows: list[list], fraction: float, seed: int) -> tuple[list[list], list[list]]:
    """(kept, held out): ``fraction`` of each class's rows, seeded, held out."""
    kept, held = [], []
    for label in sorted({row[1] for row in rows}):
        members = [row for row in rows if row[1] == label]
        order = np.random.RandomState(_seed(seed, str(label))).permutation(len(members))
        n_out = int(len(members) * fraction)
        held += [members[i] for i in sorted(order[:n_out])]
        kept += [members[i] for i in sorted(order[n_out:])]
    return kept, held


def _seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _split_folder(spec: DatasetSpec, listing: Listing, layout: str) -> Path:
    key = json.dumps([layout, spec.split_seed, spec.holdout_fraction, listing], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return generated_root(spec) / f"{layout}-seed{spec.split_seed}-{digest}"


def _complete(out: Path, domains: Sequence[str]) -> bool:
    return all((out / split_file_name(domain)).is_file() for domain in domains)


def write_json(path: Path, content: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write-then-rename: concurrent writers produce the same bytes, and none reads half a file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(content), encoding="utf-8")
    os.replace(tmp, path)
