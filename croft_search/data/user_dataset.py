"""A user's own dataset, declared in a YAML file instead of code.

    name: flowers                   # how results and the feature cache name it
    layout: domain_folders          # domain_folders (DomainBed's), split_files (OoD-Bench's)
                                    # or image_folder (train/, test/, optional val/; no domains)
    folder: flowers                 # the images; relative to this file (default: name)
    domains: [photo, sketch]        # domain_folders and split_files; the folders' names
    train_domains: [photo]          # optional: fixed sources, the others are test domains
    prompt_template: "a photo of a {}, a type of flower."
    val_open_sets: [Food101]        # registered open sets, or {name: ..., folder: ...}
    test_open_sets: [{name: weeds, folder: weeds}]  # an image folder <folder>/<class>/<image>
    holdout_fraction: 0.2           # generated splits: the validation share of each domain
    split_seed: 0
    hflip: true                     # may augmented views be mirrored
    image_subdir: images            # split_files: where the files' paths start

Name the file as the dataset (`--set dataset=path/to/flowers.yaml`, or `dataset:` in a
space), or put it under the data root as `<name>.yaml` and name the dataset. Every problem
is one error naming the file and the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from croft_search.data.generated_splits import domainbed_splits, image_folder_splits
from croft_search.data.registry import DatasetSpec, get_registered, register_dataset
from croft_search.errors import ConfigError

LAYOUTS = ("domain_folders", "split_files", "image_folder")
YAML_SUFFIXES = (".yaml", ".yml")
_KEYS = {
    "name", "layout", "folder", "domains", "train_domains", "prompt_template",
    "val_open_sets", "test_open_sets", "holdout_fraction", "split_seed", "hflip",
    "image_subdir",
}  # fmt: skip


def is_dataset_file(name: str) -> bool:
    return name.lower().endswith(YAML_SUFFIXES)


def load_user_dataset(path: Path) -> DatasetSpec:
    """The dataset ``path`` declares, registered with its open sets; loading it twice is a
    no-op, a second file taking a registered name is an error."""
    path = Path(path).expanduser().absolute()
    raw = _read(path)
    check = _Checker(path, raw)
    name = check.text("name", required=True)
    layout = check.text("layout", required=True)
    if layout not in LAYOUTS:
        check.fail("layout", f"must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    folder = Path(check.text("folder") or name)
    folder = folder if folder.is_absolute() else path.parent / folder
    if not folder.is_dir():
        check.fail("folder", f"{folder} is not a folder")
    if layout == "image_folder":
        if "domains" in raw:
            check.fail("domains", "an image_folder dataset has no domains (its one domain "
                       "is the dataset)")  # fmt: skip
        domains = (name,)
        train_domains = domains
    else:
        domains = check.names("domains", required=True)
        train_domains = check.names("train_domains")
        unknown = [d for d in train_domains if d not in domains]
        if unknown:
            check.fail("train_domains", f"{unknown[0]!r} is not one of the domains")
    template = check.text("prompt_template") or "a photo of a {}."
    if template.count("{}") != 1:
        check.fail("prompt_template", f"needs one {{}} for the class name, got {template!r}")
    fraction = check.number("holdout_fraction", 0.2)
    if not 0 < fraction < 1:
        check.fail("holdout_fraction", f"must be in (0, 1), got {fraction}")
    seed = check.number("split_seed", 0)
    if not float(seed).is_integer():
        check.fail("split_seed", f"must be an integer, got {seed}")
    hflip = raw.get("hflip", True)
    if not isinstance(hflip, bool):
        check.fail("hflip", f"must be true or false, got {hflip!r}")
    writer = {"domain_folders": domainbed_splits, "image_folder": image_folder_splits}
    spec = DatasetSpec(
        name=name,
        kind="domain_split",
        folder=str(folder),
        domains=domains,
        train_domains=train_domains,
        val_open_sets=check.open_sets("val_open_sets"),
        test_open_sets=check.open_sets("test_open_sets"),
        hflip=hflip,
        image_subdir=check.text("image_subdir") or ("images" if layout == "split_files" else ""),
        prompt_template=template,
        split_writer=writer.get(layout),
        holdout_fraction=float(fraction),
        split_seed=int(seed),
        download_hint=f"fix 'folder' in {path}",
    )
    known = get_registered(name)
    if known is not None and known != spec:
        check.fail("name", f"{name!r} is already the name of another dataset")
    return register_dataset(spec)


def _read(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"dataset file {path} not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read dataset file {path}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"dataset file {path} is not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"dataset file {path} must hold a mapping of keys (name, layout, ...)")
    unknown = sorted(set(map(str, raw)) - _KEYS)
    if unknown:
        raise ConfigError(
            f"dataset file {path}: unknown key {unknown[0]!r}; known keys: "
            f"{', '.join(sorted(_KEYS))}"
        )
    return raw


class _Checker:
    """Reads typed values out of a dataset file, failing with the file and the key."""

    def __init__(self, path: Path, raw: dict[str, Any]) -> None:
        self.path, self.raw = path, raw

    def fail(self, key: str, problem: str) -> None:
        raise ConfigError(f"dataset file {self.path}: {key} {problem}")

    def text(self, key: str, required: bool = False) -> str:
        value = self.raw.get(key)
        if value is None:
            if required:
                self.fail(key, "is required")
            return ""
        if not isinstance(value, str) or not value.strip():
            self.fail(key, f"must be a non-empty string, got {value!r}")
        return value.strip()

    def number(self, key: str, default: float) -> float:
        value = self.raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(key, f"must be a number, got {value!r}")
        return value

    def names(self, key: str, required: bool = False) -> tuple[str, ...]:
        value = self.raw.get(key)
        if value is None:
            if required:
                self.fail(key, "is required")
            return ()
        if not isinstance(value, list) or not value:
            self.fail(key, f"must be a non-empty list of names, got {value!r}")
        if not all(isinstance(item, str) and item.strip() for item in value):
            self.fail(key, "must list names (strings)")
        if len(set(value)) != len(value):
            self.fail(key, "lists a name twice")
        return tuple(value)

    def open_sets(self, key: str) -> tuple[str, ...]:
        """Registered open sets by name; ``{name, folder}`` entries register image folders
        (relative to this file) first. An empty list is an error: a search needs OOD images."""
        value = self.raw.get(key)
        if value is None:
            return ()
        if not isinstance(value, list) or not value:
            self.fail(key, f"must be a non-empty list of open sets, got {value!r}")
        names = []
        for entry in value:
            if isinstance(entry, str):
                if get_registered(entry) is None:
                    self.fail(key, f"names an unknown dataset {entry!r}")
                names.append(entry)
                continue
            if not isinstance(entry, dict) or set(entry) != {"name", "folder"}:
                self.fail(key, f"entries are names or {{name, folder}} mappings, got {entry!r}")
            folder = Path(str(entry["folder"]))
            folder = folder if folder.is_absolute() else self.path.parent / folder
            if not folder.is_dir():
                self.fail(key, f"open set {entry['name']!r}: {folder} is not a folder")
            spec = DatasetSpec(name=str(entry["name"]), kind="open_set", folder=str(folder),
                               download_hint=f"fix {key} in {self.path}")  # fmt: skip
            known = get_registered(spec.name)
            if known is not None and known != spec:
                self.fail(key, f"open set name {spec.name!r} is already another dataset's")
            register_dataset(spec)
            names.append(spec.name)
        return tuple(names)
