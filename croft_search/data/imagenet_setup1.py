"""Setup I of the CRoFT paper: ImageNet's classes split into ID and open-set classes, the
model trained on ImageNet's ID classes and tested on the covariate-shifted sets
(ImageNet-V2, -Sketch, -A, -R), OOD detection against ImageNet's open-set classes.

As the reference defines it (github LinLLLL/CRoFT, `CoOp/datasets/imagenetood46.py`):
- the ID classes are 40% of the 1,000 (400), drawn by `numpy.random.choice(classnames,
  400, replace=False)` right after the run's seed is set, from `classnames.txt`'s order;
  their labels are their positions in that draw. `split_seed` is that seed (the reference
  runs seeds 1, 2 and 3, each with its own class split);
- validation: 4 images per ID class of ImageNet's val folder (the reference takes them
  from its ID test set); test: the target set's images of the ID classes (-A and -R hold
  200 classes, so only the ID classes among them); test OOD: ImageNet val's images of the
  600 open-set classes, whatever the target (the reference caps them at 1,000 per class,
  more than ImageNet val has);
- the layout: `imagenet/images/{train,val}/<wnid>/`, `imagenet/classnames.txt`,
  `imagenetv2/imagenetv2-matched-frequency-format-val/<class index>/`,
  `imagenet-sketch/images/<wnid>/`, `imagenet-adversarial/imagenet-a/<wnid>/`,
  `imagenet-rendition/imagenet-r/<wnid>/`, all under the data root.

Where we differ, and why: the reference validates nothing against OOD images; the
joint objective needs some, so validation OOD is `VAL_OOD_PER_CLASS` ImageNet *train*
images of each open-set class (disjoint from the test OOD images). The few-shot draw
samples from `TRAIN_POOL_PER_CLASS` seeded training images per ID class instead of all
1,300, so the feature cache encodes 25,600 training images, not 520,000 (the reference
draws its k shots from all of them; a pool of 64 still gives each seed its own k <= 16).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from croft_search.data.generated_splits import (
    generated_root,
    read_classnames,
    split_file_name,
    write_json,
)
from croft_search.data.images import is_image_file
from croft_search.data.registry import DatasetSpec
from croft_search.errors import DataError

ID_FRACTION = 0.4
VAL_PER_CLASS = 4
TRAIN_POOL_PER_CLASS = 64
VAL_OOD_PER_CLASS = 4
SOURCE = "imagenet"
# Each covariate-shifted set: its folder under the data root and how its class folders are
# named ("wnid", or "index" into classnames.txt's order as ImageNet-V2 names them).
SHIFTED = {
    "imagenet_v2": ("imagenetv2/imagenetv2-matched-frequency-format-val", "index"),
    "imagenet_sketch": ("imagenet-sketch/images", "wnid"),
    "imagenet_a": ("imagenet-adversarial/imagenet-a", "wnid"),
    "imagenet_r": ("imagenet-rendition/imagenet-r", "wnid"),
}
DOMAINS = (SOURCE, *SHIFTED)
OPEN_SET_FILE = "open_set.json"


def id_classes(wnids: Sequence[str], seed: int) -> list[str]:
    """The reference's draw of the ID classes, in label order."""
    count = int(len(wnids) * ID_FRACTION)
    return [str(w) for w in np.random.RandomState(seed).choice(list(wnids), count, replace=False)]


def setup1_splits(spec: DatasetSpec, folder: Path) -> tuple[Path, Path]:
    """The split file of each shifted target (paths relative to the data root), written
    once; ``folder`` is `<data root>/imagenet`. Returns (split folder, data root)."""
    root = folder.parent
    names = _classnames(folder)
    chosen = id_classes(list(names), spec.split_seed)
    out = _out(spec, root)
    if all((out / split_file_name(d)).is_file() for d in spec.target_domains):
        return out, root
    label = {wnid: index for index, wnid in enumerate(chosen)}
    train_dir = folder / "images" / "train"
    val_dir = folder / "images" / "val"
    train, val = [], []
    for wnid in chosen:
        images = _images(train_dir / wnid, root)
        pool = _draw(images, TRAIN_POOL_PER_CLASS, spec.split_seed, wnid)
        train += [[p, label[wnid], names[wnid]] for p in pool]
        held = _draw(_images(val_dir / wnid, root), VAL_PER_CLASS, spec.split_seed, wnid)
        val += [[p, label[wnid], names[wnid]] for p in held]
    order = list(names)
    for target, (relative, naming) in SHIFTED.items():
        shifted = root / relative
        if not shifted.is_dir():
            raise DataError(f"dataset {spec.name}: {target} not found at {shifted}")
        test = []
        for class_dir in sorted(p for p in shifted.iterdir() if p.is_dir()):
            wnid = order[int(class_dir.name)] if naming == "index" else class_dir.name
            if wnid in label:
                test += [[p, label[wnid], names[wnid]] for p in _images(class_dir, root)]
        if not test:
            raise DataError(f"dataset {spec.name}: {shifted} holds no image of an ID class")
        write_json(out / split_file_name(target), {"train": train, "val": val, "test": test})
    return out, root


def setup1_open_set(spec: DatasetSpec, folder: Path) -> tuple[Path, Path]:
    """The open-set classes' images (`OPEN_SET_FILE`): "val" from ImageNet train, "test"
    from ImageNet val; ``folder`` is `<data root>/imagenet`. Returns (split folder, data
    root)."""
    root = folder.parent
    names = _classnames(folder)
    chosen = set(id_classes(list(names), spec.split_seed))
    out = _out(spec, root)
    if (out / OPEN_SET_FILE).is_file():
        return out, root
    parts: dict[str, list] = {"train": [], "val": [], "test": []}
    open_classes = [wnid for wnid in names if wnid not in chosen]
    for label, wnid in enumerate(open_classes):
        train = _images(folder / "images" / "train" / wnid, root)
        held = _draw(train, VAL_OOD_PER_CLASS, spec.split_seed, wnid)
        parts["val"] += [[p, label, names[wnid]] for p in held]
        test = _images(folder / "images" / "val" / wnid, root)
        parts["test"] += [[p, label, names[wnid]] for p in test]
    write_json(out / OPEN_SET_FILE, parts)
    return out, root


def _classnames(folder: Path) -> dict[str, str]:
    path = folder / "classnames.txt"
    if not path.is_file():
        raise DataError(f"{path} not found: Setup I names ImageNet's classes from it "
                        "(CoOp's classnames.txt, '<wnid> <class name>' per line)")  # fmt: skip
    return read_classnames(path)


def _images(class_dir: Path, root: Path) -> list[str]:
    if not class_dir.is_dir():
        raise DataError(f"{class_dir} not found (an ImageNet class folder Setup I needs)")
    return sorted(p.relative_to(root).as_posix() for p in class_dir.iterdir() if is_image_file(p))


def _draw(paths: list[str], count: int, seed: int, key: str) -> list[str]:
    """``count`` of ``paths`` (all when fewer), seeded by (seed, key), in listing order."""
    if len(paths) <= count:
        return paths
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    chosen = np.random.RandomState(int.from_bytes(digest[:4], "little")).choice(
        len(paths), count, replace=False
    )
    return [paths[i] for i in sorted(chosen)]


def _out(spec: DatasetSpec, root: Path) -> Path:
    key = json.dumps([str(root.absolute()), spec.split_seed, TRAIN_POOL_PER_CLASS,
                      VAL_PER_CLASS, VAL_OOD_PER_CLASS])  # fmt: skip
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return generated_root(spec) / f"setup1-seed{spec.split_seed}-{digest}"
