"""Read and validate JSON split files: `{"train": [[relpath, label, classname], ...],
"val": [...], "test": [...]}` (both the `test_on_<domain>.json` files of PACS/VLCS and the
`split_zhou_*.json` files of CoOp use this shape)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from croft_search.errors import DataError

SPLIT_PARTS = ("train", "val", "test")
_MISSING_EXAMPLES = 3


@dataclass(frozen=True)
class SplitRow:
    relpath: str
    label: int
    classname: str


def read_split_file(path: Path, required: Sequence[str]) -> dict[str, tuple[SplitRow, ...]]:
    """Every part of `path` (those of SPLIT_PARTS it holds), each row validated.
    `required` parts must be present; label/classname pairs must agree across parts."""
    if not path.is_file():
        raise DataError(f"split file not found: {path}")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(
            f"split file {path} is not valid JSON: {err.msg} at line {err.lineno} "
            f"column {err.colno}"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read split file {path}: {err}") from None
    if not isinstance(content, dict):
        raise DataError(f"split file {path} must hold a JSON object with keys {_keys(required)}")
    for part in required:
        if part not in content:
            raise DataError(
                f"split file {path} has no {part!r} list (expected keys {_keys(required)})"
            )
    parts = {
        part: _parse_rows(content[part], part, path) for part in SPLIT_PARTS if part in content
    }
    classnames_by_label(parts.values(), path)
    return parts


def classnames_by_label(
    parts: Iterable[Sequence[SplitRow]], path: Path, contiguous: bool = False
) -> tuple[str, ...]:
    """Class names ordered by label. One label with two names, or one name with two
    labels, is an error; with `contiguous`, so is a gap in 0..K-1."""
    name_of_label: dict[int, str] = {}
    label_of_name: dict[str, int] = {}
    for rows in parts:
        for row in rows:
            known_name = name_of_label.setdefault(row.label, row.classname)
            if known_name != row.classname:
                raise DataError(
                    f"split file {path}: label {row.label} is named both {known_name!r} "
                    f"and {row.classname!r}"
                )
            known_label = label_of_name.setdefault(row.classname, row.label)
            if known_label != row.label:
                raise DataError(
                    f"split file {path}: class {row.classname!r} has two labels, "
                    f"{known_label} and {row.label}"
                )
    labels = sorted(name_of_label)
    if contiguous and labels != list(range(len(labels))):
        missing = sorted(set(range(max(labels, default=-1) + 1)) - set(labels))
        raise DataError(
            f"split file {path}: labels must be 0..K-1 with no gaps; missing {missing[:5]}"
        )
    return tuple(name_of_label[label] for label in labels)


def image_relpath(relpath: str, image_subdir: str) -> PurePosixPath:
    """`relpath` relative to the image folder: backslashes read as separators, and a
    leading `<image_subdir>/` (which some split files carry) dropped."""
    parts = PurePosixPath(relpath.replace("\\", "/")).parts
    if image_subdir and len(parts) > 1 and parts[0] == image_subdir:
        parts = parts[1:]
    return PurePosixPath(*parts)


def check_images_exist(paths: Iterable[Path], split_path: Path, image_dir: Path) -> None:
    """Every listed image must exist: one stat per image, cheap next to decoding them."""
    missing = [path for path in paths if not path.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(
            f"image listed in {split_path} not found: {missing[0]}{more}; "
            f"paths in the split file are relative to {image_dir}"
        )


def _parse_rows(rows: object, part: str, path: Path) -> tuple[SplitRow, ...]:
    if not isinstance(rows, list):
        raise DataError(
            f"split file {path}: {part!r} must be a list of [relpath, label, classname] rows"
        )
    return tuple(_parse_row(row, part, index, path) for index, row in enumerate(rows))


def _parse_row(row: object, part: str, index: int, path: Path) -> SplitRow:
    well_formed = (
        isinstance(row, list)
        and len(row) == 3
        and isinstance(row[0], str)
        and row[0] != ""
        and isinstance(row[1], int)
        and not isinstance(row[1], bool)
        and row[1] >= 0
        and isinstance(row[2], str)
        and row[2] != ""
    )
    if not well_formed:
        shown = json.dumps(row)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise DataError(
            f"split file {path}: {part} row {index} must be [relpath, label >= 0, "
            f"classname], got {shown}"
        )
    listed = PurePosixPath(row[0].replace("\\", "/"))
    if listed.is_absolute() or ".." in listed.parts:
        raise DataError(
            f"split file {path}: {part} row {index} path {row[0]!r} must be relative to "
            f"the dataset's image folder"
        )
    return SplitRow(relpath=row[0], label=row[1], classname=row[2])


def _keys(parts: Sequence[str]) -> str:
    return ", ".join(parts)
