"""CIFAR-10 and CIFAR-100 from the python-pickle archives a user has on disk
(`cifar-10-batches-py/`, `cifar-100-python/`, as torchvision and the PLP code read them).

The images are written out once as PNG files under the cache root, in the image-folder
layout (`train/<class>/`, `test/<class>/`), so the feature cache, the fingerprints and the
split files treat them as any other image; a finished extraction is marked, an interrupted
one starts over.
"""

from __future__ import annotations

import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from croft_search.config import cache_root
from croft_search.data.generated_splits import image_folder_splits
from croft_search.data.registry import DatasetSpec
from croft_search.errors import DataError

_DONE = ".complete"


@dataclass(frozen=True)
class CifarArchive:
    """Where one CIFAR archive keeps its parts and its class names."""

    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    names_key: bytes
    labels_key: bytes


CIFAR10 = CifarArchive(
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    meta_file="batches.meta",
    names_key=b"label_names",
    labels_key=b"labels",
)
CIFAR100 = CifarArchive(
    train_files=("train",),
    test_files=("test",),
    meta_file="meta",
    names_key=b"fine_label_names",
    labels_key=b"fine_labels",
)


def cifar_split_writer(archive: CifarArchive):  # noqa: ANN201 - a SplitWriter
    """A split writer that extracts ``archive`` once, then lists it as an image folder."""

    def write(spec: DatasetSpec, folder: Path) -> tuple[Path, Path]:
        return image_folder_splits(spec, extract_cifar(spec.name, archive, folder))

    return write


def extract_cifar(name: str, archive: CifarArchive, folder: Path) -> Path:
    """The archive in ``folder`` as PNG files under the cache root; returns their folder."""
    out = cache_root() / "images" / name
    if (out / _DONE).is_file():
        return out
    classes = [c.decode() for c in _unpickle(folder / archive.meta_file)[archive.names_key]]
    shutil.rmtree(out, ignore_errors=True)
    for part, files in (("train", archive.train_files), ("test", archive.test_files)):
        index = 0
        for file in files:
            batch = _unpickle(folder / file)
            try:
                pixels = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                labels = [int(label) for label in batch[archive.labels_key]]
            except (KeyError, ValueError, TypeError) as err:
                raise DataError(f"{folder / file} is not a CIFAR batch ({err})") from None
            if len(labels) != len(pixels) or not all(0 <= x < len(classes) for x in labels):
                raise DataError(f"{folder / file}: labels do not match the images or classes")
            for image, label in zip(pixels, labels, strict=True):
                target = out / part / classes[label] / f"{index:05d}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image.transpose(1, 2, 0)).save(target)
                index += 1
    (out / _DONE).write_text("")
    return out


def _unpickle(path: Path) -> dict:
    # The archives are pickles by their authors' design; they are read only from the
    # user's own data root.
    try:
        with path.open("rb") as handle:
            content = pickle.load(handle, encoding="bytes")  # noqa: S301
    except FileNotFoundError:
        raise DataError(
            f"{path} not found: expected the python version of the CIFAR archive "
            f"(https://www.cs.toronto.edu/~kriz/cifar.html) unpacked under the data root"
        ) from None
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as err:
        raise DataError(f"cannot read CIFAR archive file {path}: {err}") from None
    if not isinstance(content, dict):
        raise DataError(f"{path} is not a CIFAR archive file (no dictionary inside)")
    return content
