"""Find a registered dataset under a data root, building embedded ones on demand."""

from __future__ import annotations

from pathlib import Path

from croft_search.data.registry import DatasetSpec
from croft_search.errors import DataError

# Embedded datasets built implicitly by a loader use this seed; other seeds are built
# explicitly (build_digits(root, seed)) and then found on disk like any dataset.
DEFAULT_BUILD_SEED = 0


def dataset_dir(spec: DatasetSpec, root: Path) -> Path:
    """Absolute `ROOT/<folder>` of `spec`; builds it first when the spec has a builder."""
    folder = Path(root).expanduser().absolute() / spec.folder
    if spec.builder is not None and not folder.is_dir():
        spec.builder(Path(root).expanduser(), DEFAULT_BUILD_SEED)
    if not folder.is_dir():
        raise DataError(
            f"dataset {spec.name} not found at {folder}: {spec.download_hint}, "
            f"or pass --data-root (or set CROFT_DATA) to the folder that contains "
            f"{spec.folder}/"
        )
    return folder
