"""The dataset registry: what a dataset name means (layout, domains, default open sets)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from croft_search.errors import ConfigError

DatasetKind = Literal["domain_split", "open_set"]
Builder = Callable[[Path, int], Path]
SplitWriter = Callable[["DatasetSpec", Path], tuple[Path, Path]]


@dataclass(frozen=True)
class DatasetSpec:
    """Everything the loaders need to know about one dataset.

    kind "domain_split": OoD-Bench's `ROOT/<folder>/<image_subdir>/<domain>/<class>/...`
    plus `ROOT/<folder>/test_on_<domain lower-cased>.json`; where those split files are
    missing, DomainBed's `ROOT/<folder>/<domain folder>/<class>/<image>` with the split
    files generated once (`croft_search.data.generated_splits`); or whatever a
    ``split_writer`` writes (image folders without domains, CIFAR archives).
    kind "open_set": either an image folder `ROOT/<folder>/<class>/<image>` (no
    `split_file`) or the CoOp layout `ROOT/<folder>/<image_subdir>/...` listed by
    `ROOT/<folder>/<split_file>`.

    Sources and targets: by default every domain is a target in turn and the others are
    its sources (leave one domain out). ``train_domains`` fixes the sources instead: the
    targets are the other domains (covariate-shifted test sets), or, when the sources are
    every domain, the same domain's test images (no covariate shift).
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
    # The on-disk folder of each domain in DomainBed's layout where it is not the domain's
    # name (VLCS: VOC2007 for PASCAL), aligned with ``domains``; empty: the names.
    domain_folders: tuple[str, ...] = ()
    train_domains: tuple[str, ...] = ()
    # Writes the split files of a dataset that has none on disk (image folders, archives):
    # (spec, dataset folder) -> (the split files' folder, the folder images are listed in).
    split_writer: SplitWriter | None = None
    # DomainBed's held-out fraction and split seed, for generated leave-one-out splits.
    holdout_fraction: float = 0.2
    split_seed: int = 0
    # Image-folder datasets: the folders of the train, val and test images ("" for val:
    # held out of train), under ``image_subdir`` where that folder exists.
    part_folders: tuple[str, str, str] = ("train", "val", "test")

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
        if self.domain_folders and len(self.domain_folders) != len(self.domains):
            raise ConfigError(
                f"dataset {self.name}: domain_folders needs one folder per domain "
                f"({len(self.domains)}), got {len(self.domain_folders)}"
            )
        unknown = [d for d in self.train_domains if d not in self.domains]
        if unknown:
            raise ConfigError(
                f"dataset {self.name}: train_domains {unknown} are not among its domains "
                f"({', '.join(self.domains)})"
            )
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ConfigError(
                f"dataset {self.name}: holdout_fraction must be in (0, 1), got "
                f"{self.holdout_fraction}"
            )

    @property
    def target_domains(self) -> tuple[str, ...]:
        """The domains a split can test on."""
        if not self.train_domains or set(self.train_domains) == set(self.domains):
            return self.domains
        return tuple(d for d in self.domains if d not in self.train_domains)

    @property
    def is_open_set(self) -> bool:
        """Whether the dataset can be an open set: an open-set dataset, or one without
        domains (CIFAR-100's images are CIFAR-10's OOD images)."""
        return self.kind == "open_set" or (
            len(self.domains) == 1 and self.train_domains == self.domains
        )

    @property
    def has_split_lists(self) -> bool:
        """Whether its open-set images come in train/val/test lists (else one folder)."""
        return bool(self.split_file) or self.kind == "domain_split"

    def source_domains(self, target: str) -> tuple[str, ...]:
        """The domains ``target``'s split trains and validates on."""
        if self.train_domains:
            return self.train_domains
        return tuple(d for d in self.domains if d != target)

    def domain_folder(self, domain: str) -> str:
        """The folder of ``domain`` in DomainBed's layout."""
        if not self.domain_folders:
            return domain
        return self.domain_folders[self.domains.index(domain)]

    def domain_of_folder(self, folder: str) -> str | None:
        """The domain whose name or DomainBed folder is ``folder`` (case-insensitive)."""
        for index, domain in enumerate(self.domains):
            names = {domain.lower(), self.domain_folder(domain).lower()}
            if folder.lower() in names:
                return self.domains[index]
        return None

    def excluded_for(self, id_dataset: str) -> frozenset[str]:
        """The classes of this open set dropped when ``id_dataset`` is the ID dataset."""
        return frozenset(
            name for dataset, names in self.excluded_classes if dataset == id_dataset
            for name in names
        )  # fmt: skip

    def canonical_domain(self, domain: str) -> str:
        """The registered spelling of `domain` (matched case-insensitively)."""
        known = self.domain_of_folder(domain)
        if known is not None:
            return known
        raise ConfigError(
            f"unknown domain {domain!r} for dataset {self.name}; "
            f"known domains: {', '.join(self.domains)}"
        )


_REGISTRY: dict[str, DatasetSpec] = {}
_FILES: dict[str, DatasetSpec] = {}  # user datasets by their file's absolute path


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


def get_registered(name: str) -> DatasetSpec | None:
    """The spec registered under `name` (case-insensitive), if any."""
    return _REGISTRY.get(name.lower())


def get_dataset_spec(name: str, root: Path | None = None) -> DatasetSpec:
    """The spec registered under `name` (case-insensitive); a YAML file's path (or a name
    with `<data root>/<name>.yaml`) loads a user's dataset (`croft_search.data.user_dataset`)."""
    spec = _REGISTRY.get(name.lower())
    if spec is not None:
        return spec
    from croft_search.data import user_dataset  # it registers through this module

    if user_dataset.is_dataset_file(name):
        path = str(Path(name).expanduser().absolute())
        if path not in _FILES:  # read once per process: trials look their dataset up often
            _FILES[path] = user_dataset.load_user_dataset(Path(path))
        return _REGISTRY.get(_FILES[path].name.lower(), _FILES[path])
    from croft_search.config import data_root

    declared = data_root(root) / f"{name}.yaml"
    if declared.is_file():
        return user_dataset.load_user_dataset(declared)
    raise ConfigError(
        f"unknown dataset {name!r}; known datasets: {', '.join(dataset_names())}, or a "
        f"dataset file (<name>.yaml under the data root, or its path)"
    )


def dataset_names() -> list[str]:
    """Registered dataset names, in registration order."""
    return [spec.name for spec in _REGISTRY.values()]


def require_kind(spec: DatasetSpec, kind: DatasetKind, loader: str) -> None:
    """Reject a dataset handed to the loader of the other layout."""
    if spec.kind != kind:
        raise ConfigError(
            f"dataset {spec.name} is a {spec.kind} dataset; {loader} needs a {kind} dataset"
        )
