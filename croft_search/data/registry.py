"""The dataset registry: what a dataset name means (layout, domains, default open sets)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from croft_search.errors import ConfigError

DatasetKind = Literal["domain_split", "open_set"]
Builder = Callable[[Path, int], Path]


@dataclass(frozen=True)
class DatasetSpec:
    """Everything the loaders need to know about one dataset.

    kind "domain_split": `ROOT/<folder>/<image_subdir>/<domain>/<class>/...` plus
    `ROOT/<folder>/test_on_<domain lower-cased>.json`.
    kind "open_set": either an image folder `ROOT/<folder>/<class>/<image>` (no
    `split_file`) or the CoOp layout `ROOT/<folder>/<image_subdir>/...` listed by
    `ROOT/<folder>/<split_file>`.
    """

    name: str
    kind: DatasetKind
    folder: str
    domains: tuple[str, ...] = ()
    val_open_sets: tuple[str, ...] = ()
    test_open_sets: tuple[str, ...] = ()
    # Flipping changes a digit's identity (mirrored 2, 5, 7), so digits sets this False.
    hflip: bool = True
    # Builds the dataset under a data root on demand (embedded datasets only).
    builder: Builder | None = None
    image_subdir: str = "images"
    split_file: str = ""
    # Image-folder open sets whose files are named `<domain>_<rest>` (the digits open
    # sets): Sample.domain is read from that prefix, so OOD images can be matched to the
    # target domain's ID images instead of mixing styles.
    domain_in_filename: bool = False
    download_hint: str = "download it"
    # Open sets: classes dropped when paired with an ID dataset, because they are ID classes
    # there (Caltech101's dalmatian for PACS's dog), as ((id dataset, (classes...)), ...).
    excluded_classes: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # The hand-written zero-shot prompt ("{}" is the class name), as CoOp keeps one per dataset.
    prompt_template: str = "a photo of a {}."

    def __post_init__(self) -> None:
        if self.kind not in ("domain_split", "open_set"):
            raise ConfigError(
                f"dataset {self.name}: kind must be 'domain_split' or 'open_set', not {self.kind!r}"
            )
        if (self.kind == "domain_split" or self.domain_in_filename) and not self.domains:
            raise ConfigError(
                f"dataset {self.name}: a domain_split dataset, or one with "
                f"domain_in_filename, needs its domains"
            )

    def excluded_for(self, id_dataset: str) -> frozenset[str]:
        """The classes of this open set dropped when ``id_dataset`` is the ID dataset."""
        return frozenset(
            name for dataset, names in self.excluded_classes if dataset == id_dataset
            for name in names
        )  # fmt: skip

    def canonical_domain(self, domain: str) -> str:
        """The registered spelling of `domain` (matched case-insensitively)."""
        for known in self.domains:
            if known.lower() == domain.lower():
                return known
        raise ConfigError(
            f"unknown domain {domain!r} for dataset {self.name}; "
            f"known domains: {', '.join(self.domains)}"
        )


_REGISTRY: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec, replace: bool = False) -> DatasetSpec:
    """Add `spec` under its (case-insensitive) name. Registering an identical spec twice
    is a no-op; a different spec under a taken name needs `replace=True`."""
    key = spec.name.lower()
    existing = _REGISTRY.get(key)
    if existing is not None and existing != spec and not replace:
        raise ConfigError(
            f"dataset name {spec.name!r} is already registered; pass replace=True to override it"
        )
    _REGISTRY[key] = spec
    return spec


def get_dataset_spec(name: str) -> DatasetSpec:
    """The spec registered under `name` (case-insensitive)."""
    spec = _REGISTRY.get(name.lower())
    if spec is None:
        raise ConfigError(f"unknown dataset {name!r}; known datasets: {', '.join(dataset_names())}")
    return spec


def dataset_names() -> list[str]:
    """Registered dataset names, in registration order."""
    return [spec.name for spec in _REGISTRY.values()]


def require_kind(spec: DatasetSpec, kind: DatasetKind, loader: str) -> None:
    """Reject a dataset handed to the loader of the other layout."""
    if spec.kind != kind:
        raise ConfigError(
            f"dataset {spec.name} is a {spec.kind} dataset; {loader} needs a {kind} dataset"
        )
