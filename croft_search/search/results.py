"""`trials.parquet`: one row per finished trial of a search, rewritten atomically each time a
trial finishes, so an interrupted search loses nothing that finished and a resumed one never
writes a trial twice.

Columns (`croft_search.contract.TRIAL_COLUMNS`): trial_id, search, space, method, status
("ok" | "failed" | "stopped"), error, seed, selection, protocol (the trial's protocol
settings in one string), wall_seconds, train_seconds, node, attempts, population (the
engine trial that trained it as one member of a population, else empty), mlflow_run_id,
finished_at; every config value as ``config/<key>``; every numeric metric (val_*, test_*,
objective, ``<domain>/<metric>``).

Types: every column has its values' own type. A config key whose values are all integers
is a nullable integer column (null where a method lacks the key), integers mixed with floats
a float column, booleans a boolean one, text a string one; a list (target domains, open
sets) is stored as its comma-joined string, the form a setting accepts back. Only a key two
methods give different kinds of values (a number in one, text in another) is stored as text.
"""

from __future__ import annotations

import datetime as dt
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from croft_search.contract import TRIAL_COLUMNS, TRIALS_FILE, config_column


class TrialTable:
    """The rows of one search, kept in memory and mirrored to ``folder/trials.parquet``."""

    def __init__(self, folder: Path, search: str, space: str) -> None:
        self.path = Path(folder) / TRIALS_FILE
        self.search = search
        self.space = space
        self.rows: list[dict[str, Any]] = []
        if self.path.exists():
            self.rows = pd.read_parquet(self.path).to_dict("records")
        self.by_id = {row["trial_id"]: row for row in self.rows}
        self._dirty = False
        # While True, add() keeps rows in memory until flush(): several trials that finish
        # together (a population's members) cost one rewrite of the file.
        self.deferred = False

    @property
    def trial_ids(self) -> set[str]:
        return set(self.by_id)

    def __len__(self) -> int:
        return len(self.rows)

    @staticmethod
    def count(folder: Path) -> int:
        """The number of rows of ``folder``'s table, read from the file's footer alone."""
        import pyarrow.parquet as pq

        path = Path(folder) / TRIALS_FILE
        return pq.read_metadata(path).num_rows if path.exists() else 0

    def add(
        self,
        trial_id: str,
        config: Mapping[str, Any],
        metrics: Mapping[str, Any],
        status: str,
        error: str = "",
        node: str = "",
        wall_seconds: float = float("nan"),
        mlflow_run_id: str = "",
        attempts: int = 1,
        population: str = "",
    ) -> bool:
        """Append one finished trial and write the file (at the next flush while
        ``deferred``); False (nothing written) if it is already there."""
        if trial_id in self.by_id:
            return False
        row: dict[str, Any] = {
            "trial_id": trial_id,
            "search": self.search,
            "space": self.space,
            "method": str(config.get("method", "")),
            "status": status,
            "error": error,
            "seed": _seed(config),
            "selection": str(metrics.get("selection", config.get("selection", "val"))),
            "protocol": str(metrics.get("protocol", "")),
            "wall_seconds": float(wall_seconds),
            "train_seconds": float(metrics.get("train_seconds", float("nan"))),
            "node": node,
            "attempts": int(attempts),
            "population": population,
            "mlflow_run_id": mlflow_run_id,
            "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        row |= {config_column(key): _scalar(value) for key, value in config.items()}
        row |= {
            key: float(value)
            for key, value in metrics.items()
            if key not in TRIAL_COLUMNS
            and isinstance(value, (int, float))
            and not isinstance(value, bool)
        }
        self.rows.append(row)
        self.by_id[trial_id] = row
        if self.deferred:
            self._dirty = True
        else:
            self.write()
        return True

    def set_run_id(self, trial_id: str, run_id: str) -> None:
        """Note a trial's MLflow run; written with the next row or by `write`."""
        if self.by_id[trial_id].get("mlflow_run_id") != run_id:
            self.by_id[trial_id]["mlflow_run_id"] = run_id
            self._dirty = True

    def flush(self) -> None:
        if self._dirty:
            self.write()

    def frame(self) -> pd.DataFrame:
        return typed_frame(self.rows)

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.frame().to_parquet(tmp, index=False)
        os.replace(tmp, self.path)
        self._dirty = False


def typed_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The rows as a frame whose every column has its values' type (see the module's
    docstring); a key a row lacks is null there."""
    columns = dict.fromkeys(key for row in rows for key in row)
    frame = pd.DataFrame(
        {column: _typed([_plain(row.get(column)) for row in rows]) for column in columns},
        index=range(len(rows)),
    )
    for column, declared in TRIAL_COLUMNS.items():
        if column in frame and declared != "string":
            frame[column] = frame[column].astype(declared)
    return frame


def is_missing(value: Any) -> bool:
    """Whether a recorded value is null: None, pandas' NA or NaN."""
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _plain(value: Any) -> Any:
    """A value as Python holds it: numpy scalars unwrapped, every kind of null None."""
    if is_missing(value):
        return None
    return value.item() if hasattr(value, "item") else value


def _typed(values: list[Any]) -> pd.Series:
    kinds = {type(v) for v in values if v is not None}
    if kinds <= {int} and kinds:
        return pd.Series(values, dtype="Int64")
    if kinds <= {int, float} and kinds:
        return pd.Series([float("nan") if v is None else float(v) for v in values])
    if kinds <= {bool} and kinds:
        return pd.Series(values, dtype="boolean")
    if kinds <= {str}:
        return pd.Series(values, dtype=object)
    return pd.Series([None if v is None else str(v) for v in values], dtype=object)


def _seed(config: Mapping[str, Any]) -> int | None:
    """The trial's seed: run_trial's default 0 when unset, None for a trial that averages
    several seeds (they are in ``config/seeds``)."""
    if "seed" in config:
        return int(config["seed"])
    return None if "seeds" in config else 0


def _scalar(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return value
