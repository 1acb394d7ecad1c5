"""A search's folder, ``STORAGE/<space>/<name>/``: which one a run writes to, what it holds
at the start (``search.json``, the resolved ``space.yaml``, the MLflow parent run), and the
check that a resumed search is the search it continues."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from croft_search.contract import SEARCH_FILE, SPACE_FILE
from croft_search.errors import ConfigError
from croft_search.search.space import SearchSpace
from croft_search.tracking import SearchTracker


def resolve_folder(
    space: SearchSpace, storage: Path, name: str | None, resume: bool
) -> tuple[Path, str]:
    """The folder and name of a new search (refused if it exists) or of the one to resume
    (the newest of the space where no name is given)."""
    base = (Path(storage) / space.name).resolve()
    if resume and name is None:
        candidates = sorted(
            (p for p in base.glob("*") if (p / SEARCH_FILE).exists()),
            key=lambda p: p.stat().st_mtime,
        )
        if not candidates:
            raise ConfigError(f"nothing to resume: no search of space {space.name} in {base}")
        name = candidates[-1].name
    name = name or dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = base / name
    exists = (folder / SEARCH_FILE).exists()
    if resume and not exists:
        raise ConfigError(f"nothing to resume at {folder}: no {SEARCH_FILE} there")
    if not resume and exists:
        raise ConfigError(f"search {folder} exists; pass --resume to continue it or another --name")
    return folder, name


# search.json's record of the population size the search runs (`--population`), which a
# resumed search must keep.
POPULATION_KEY = "population"


def create_folder(
    folder: Path,
    name: str,
    space: SearchSpace,
    tracking_uri: str | None,
    selection: str,
    params: Mapping[str, Any],
) -> None:
    """Start a new search: its MLflow parent run (an unusable tracking URI fails here,
    before any trial runs), ``search.json`` and ``space.yaml``."""
    tracker = SearchTracker(tracking_uri, space.name)
    parent = tracker.start_parent(name, dict(params), space.to_yaml(), None)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "space": space.name,
        "name": name,
        "tracking_uri": tracker.tracking_uri,
        "mlflow_parent_run_id": parent,
        "created": dt.datetime.now().isoformat(),
        "selection": selection,
        POPULATION_KEY: params.get(POPULATION_KEY, 1),
    }
    (folder / SEARCH_FILE).write_text(json.dumps(meta, indent=2))
    (folder / SPACE_FILE).write_text(space.to_yaml())


def check_same_space(space: SearchSpace, folder: Path) -> None:
    """A resumed search must be the search it continues: an engine restores its own copy of
    the sampler and sample count, so another --num-samples, --set or an edited space file
    would half apply."""
    saved_file = folder / SPACE_FILE
    if not saved_file.exists():
        return
    saved = yaml.safe_load(saved_file.read_text())
    now = yaml.safe_load(space.to_yaml())
    differing = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
    if differing:
        raise ConfigError(
            f"search {folder} was started with another space (differs in: "
            f"{', '.join(differing)}); resume it with the same --space, --num-samples and --set "
            "(its resolved space is space.yaml there), or start a new --name"
        )
