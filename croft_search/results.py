"""`trials.parquet`: one row per finished trial of a search, rewritten atomically each time a
trial finishes, so an interrupted search loses nothing that finished and a resumed one never
writes a trial twice.

Columns: trial_id, search, space, method, status ("ok" | "failed" | "stopped"), error, seed,
selection, protocol (the trial's protocol settings in one string), wall_seconds,
train_seconds, node, mlflow_run_id, finished_at, every config value as ``config/<key>``, and
every metric (val_*, test_*, objective, ``<domain>/<metric>``).

Types: Parquet holds one type per column, so a ``config/<key>`` whose values mix types across
trials (a multi-method space: ``n_ctx`` 4 in one method, absent in another; a list beside a
string) is stored as strings, None kept as null. `analysis.load.load_trials` gives the numbers
back where every value of such a column is one; other readers see the strings.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from croft_search.config import TRIALS_FILE

RESERVED = ("trial_id", "search", "space", "method", "status", "error", "seed", "selection",
            "protocol",
            "wall_seconds", "train_seconds", "node", "mlflow_run_id", "finished_at")  # fmt: skip


class TrialTable:
    """The rows of one search, kept in memory and mirrored to ``folder/trials.parquet``."""

    def __init__(self, folder: Path, search: str, space: str) -> None:
        self.path = Path(folder) / TRIALS_FILE
        self.search = search
        self.space = space
        self.rows: list[dict[str, Any]] = []
        if self.path.exists():
            self.rows = pd.read_parquet(self.path).to_dict("records")
        self.trial_ids = {row["trial_id"] for row in self.rows}

    def __len__(self) -> int:
        return len(self.rows)

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
    ) -> bool:
        """Append one finished trial; False (and nothing written) if it is already there."""
        if trial_id in self.trial_ids:
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
            "mlflow_run_id": mlflow_run_id,
            "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        row |= {f"config/{key}": _scalar(value) for key, value in config.items()}
        row |= {
            key: float(value)
            for key, value in metrics.items()
            if key not in RESERVED
            and isinstance(value, (int, float))
            and not isinstance(value, bool)
        }
        self.rows.append(row)
        self.trial_ids.add(trial_id)
        self._write()
        return True

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        frame = self.frame()
        # Config values of one key can differ in type across methods (e.g. n_ctx absent for
        # some): store mixed object columns as strings so Parquet accepts them.
        for column in frame.columns:
            if frame[column].dtype == object:
                kinds = {type(v) for v in frame[column] if v is not None and v == v}
                if len(kinds) > 1:
                    frame[column] = frame[column].map(lambda v: None if v is None else str(v))
        # Nullable: a trial averaging several seeds has none of its own (see _seed).
        frame["seed"] = frame["seed"].astype("Int64")
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, self.path)


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
