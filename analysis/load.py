"""Read finished trials: from search folders / trials.parquet files, or from MLflow runs.

Every loader returns one DataFrame in the `trials.parquet` layout (see
docs/ARCHITECTURE.md) plus a `source` column naming where each row came from, so several
searches can be compared on one plot.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from croft_search.contract import SEARCH_FILE, TRIALS_FILE, config_column
from croft_search.errors import ConfigError

__all__ = [
    "TRIALS_FILE",
    "SEARCH_FILE",
    "SearchSource",
    "resolve_trials_file",
    "load_trials",
    "load_mlflow_trials",
    "load_epoch_curves",
    "ok_trials",
    "status_counts",
]

TRIAL_ID_TAGS = ("tags.croft.trial_id", "tags.trial_id")  # croft_search.tracking's tag first

# Columns every analysis step may rely on, with the value a missing column is filled with.
COLUMN_DEFAULTS: dict[str, object] = {
    "trial_id": None,  # filled with the row number
    "search": "",
    "space": "",
    "method": "unknown",
    "status": "ok",
    "error": "",
    "selection": "val",
}


@dataclass(frozen=True)
class SearchSource:
    """One input: its display name, where its trials live and, when the search logged to
    MLflow, the parent run the report is attached to."""

    name: str
    folder: Path | None
    parent_run_id: str | None = None
    tracking_uri: str | None = None


def resolve_trials_file(path: str | Path) -> Path:
    """A search folder or a trials.parquet path -> the trials.parquet file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"no such file or folder: {path}")
    if path.is_dir():
        trials = path / TRIALS_FILE
        if not trials.is_file():
            raise ConfigError(
                f"{path} holds no {TRIALS_FILE}; point at a search folder "
                "(STORAGE/<space>/<name>) or at a trials.parquet file"
            )
        return trials
    return path


def _read_search_json(folder: Path) -> tuple[str | None, str | None]:
    """(parent run id, tracking URI) from the search folder's search.json, when present."""
    file = folder / SEARCH_FILE
    if not file.is_file():
        return None, None
    try:
        info = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{file} is not valid JSON: {err}") from None
    run_id = info.get("mlflow_parent_run_id") or None
    uri = info.get("tracking_uri") or None
    return (str(run_id) if run_id else None), (str(uri) if uri else None)


def _source_names(files: Sequence[Path]) -> list[str]:
    """Short names for the inputs: `<space>/<name>` of each search folder, or the full path
    when two inputs would otherwise share a name."""
    names = []
    for file in files:
        folder = file.resolve().parent
        names.append(f"{folder.parent.name}/{folder.name}" if folder.parent.name else folder.name)
    if len(set(names)) < len(names):
        names = [str(file) for file in files]
    return names


def _normalise(frame: pd.DataFrame) -> pd.DataFrame:
    """Fill the columns the analysis relies on and give them plain types. Any status other
    than "ok" ("failed", "stopped" by a scheduler, ...) keeps a trial out of the fronts."""
    frame = frame.reset_index(drop=True).copy()
    for column, default in COLUMN_DEFAULTS.items():
        if column not in frame.columns:
            frame[column] = range(len(frame)) if column == "trial_id" else default
    for column in COLUMN_DEFAULTS:
        frame[column] = frame[column].fillna("").astype(str)
    frame["status"] = frame["status"].str.lower()
    return frame


def load_trials(results: Sequence[str | Path]) -> tuple[pd.DataFrame, list[SearchSource]]:
    """Trials of one or several searches, concatenated, with a `source` column."""
    if not results:
        raise ConfigError(
            "name at least one search folder or trials.parquet (or --mlflow-experiment)"
        )
    files = [resolve_trials_file(path) for path in results]
    frames, sources = [], []
    for file, name in zip(files, _source_names(files), strict=True):
        try:
            frame = pd.read_parquet(file)
        except Exception as err:  # pyarrow raises several types for a non-Parquet file
            raise ConfigError(f"cannot read {file} as Parquet: {err}") from None
        frame = _normalise(frame)
        frame.insert(0, "source", name)
        frames.append(frame)
        run_id, uri = _read_search_json(file.parent)
        sources.append(SearchSource(name, file.parent, run_id, uri))
    return pd.concat(frames, ignore_index=True), sources


def load_mlflow_trials(
    experiment: str, tracking_uri: str | None = None
) -> tuple[pd.DataFrame, list[SearchSource]]:
    """Trials from the runs of an MLflow experiment (one child run per trial).

    Params become `config/<key>` (numbers parsed back from MLflow's strings), metrics keep
    their names, the tags `method` and `status` fill those columns. Runs that are the parent
    of other runs (the search's own run) are not trials; when all trials share one parent,
    that run is where the report is logged."""
    import mlflow  # imported here: it takes seconds and only this path needs it

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    try:
        found = mlflow.get_experiment_by_name(experiment)
    except Exception as err:  # MlflowException for an unreachable or unreadable store
        raise ConfigError(f"cannot read MLflow at {mlflow.get_tracking_uri()}: {err}") from None
    if found is None:
        raise ConfigError(
            f"no MLflow experiment named {experiment!r} at {mlflow.get_tracking_uri()}"
        )
    runs = mlflow.search_runs(experiment_ids=[found.experiment_id], output_format="pandas")
    source = [SearchSource(experiment, None, None, mlflow.get_tracking_uri())]
    if runs.empty:
        return pd.DataFrame({"source": [], "status": []}), source
    parent_tag = "tags.mlflow.parentRunId"
    parents = set(runs[parent_tag].dropna()) if parent_tag in runs.columns else set()
    runs = runs[~runs["run_id"].isin(parents)].reset_index(drop=True)

    frame = pd.DataFrame({"trial_id": _first_present(runs, TRIAL_ID_TAGS, None)})
    frame["trial_id"] = frame["trial_id"].fillna(runs["run_id"])
    frame["mlflow_run_id"] = runs["run_id"]
    for column in runs.columns:
        if column.startswith("params."):
            key = column[len("params.") :]
            frame[config_column(key)] = _parse_param(runs[column])
        elif column.startswith("metrics."):
            frame[column[len("metrics.") :]] = runs[column].astype(float)
    frame["method"] = _first_present(runs, ("tags.method", "params.method"), "unknown")
    mlflow_status = runs["status"].map({"FINISHED": "ok"}).fillna("failed")
    frame["status"] = _first_present(runs, ("tags.status",), None).fillna(mlflow_status)
    frame["selection"] = _first_present(runs, ("params.selection", "tags.selection"), "val")
    for column in ("seed",):
        if config_column(column) in frame.columns:
            frame[column] = frame[config_column(column)]
    frame = _normalise(frame)
    frame.insert(0, "source", experiment)

    parent = parents.pop() if len(parents) == 1 else None
    return frame, [SearchSource(experiment, None, parent, mlflow.get_tracking_uri())]


def _first_present(runs: pd.DataFrame, columns: Sequence[str], default: object) -> pd.Series:
    result = pd.Series([None] * len(runs), index=runs.index, dtype=object)
    for column in columns:
        if column in runs.columns:
            result = result.fillna(runs[column])
    return result if default is None else result.fillna(default)


def _parse_param(values: pd.Series) -> pd.Series:
    """Strings that all spell numbers (MLflow params, mixed-type config columns) -> numbers:
    int when none has a decimal point or exponent, else float. Anything else is unchanged."""
    present = values.dropna()
    if present.empty or any(isinstance(value, (bool, np.bool_)) for value in present):
        return values
    numbers = pd.to_numeric(values, errors="coerce")
    if numbers[values.notna()].isna().any():
        return values
    text = present.astype(str)
    if (numbers.dropna() % 1 == 0).all() and not text.str.contains(r"[.eE]|inf|nan").any():
        return numbers.astype("Int64") if numbers.isna().any() else numbers.astype("int64")
    return numbers.astype(float)


def ok_trials(frame: pd.DataFrame, where: str) -> pd.DataFrame:
    """The rows with status "ok"; a ConfigError when there are none."""
    if frame.empty:
        raise ConfigError(f"{where} holds no trials; has the search finished any?")
    ok = frame[frame["status"] == "ok"]
    if ok.empty:
        first_error = next((e for e in frame["error"] if e), "no error message recorded")
        raise ConfigError(
            f"{where}: none of its {len(frame)} trials finished with status ok "
            f"({status_counts(frame)}; first error: {first_error})"
        )
    return ok


def status_counts(frame: pd.DataFrame) -> str:
    """E.g. "3 ok, 1 failed, 2 stopped"."""
    counts = frame["status"].value_counts()
    return ", ".join(f"{count} {status}" for status, count in counts.items())


def load_epoch_curves(
    trials: pd.DataFrame, sources: Sequence[SearchSource], trial_ids: Sequence[str]
) -> tuple[dict[str, pd.DataFrame], str | None]:
    """Per-epoch validation curves (`epoch_*` metrics by `step`) of ``trial_ids`` from their
    MLflow child runs; returns (curves by trial id, a note when some or all are missing).
    Curves live only in MLflow: an unreachable server leaves the rest of the report whole."""
    from mlflow.tracking import MlflowClient

    uris = {source.name: source.tracking_uri for source in sources}
    wanted = trials[trials["trial_id"].astype(str).isin({str(t) for t in trial_ids})]
    curves: dict[str, pd.DataFrame] = {}
    problems: list[str] = []
    for _, row in wanted.iterrows():
        run_id = row.get("mlflow_run_id")
        uri = uris.get(str(row.get("source")))
        if not isinstance(run_id, str) or not run_id or uri is None:
            continue
        try:
            client = MlflowClient(tracking_uri=uri)
            names = [k for k in client.get_run(run_id).data.metrics if k.startswith("epoch_")]
            series = {
                name: {m.step: m.value for m in client.get_metric_history(run_id, name)}
                for name in names
            }
        except Exception as err:  # noqa: BLE001 - any MLflow failure only costs the curves
            problems.append(str(err).strip().splitlines()[0] if str(err).strip() else repr(err))
            continue
        if series:
            frame = pd.DataFrame(series).rename_axis("step").reset_index()
            curves[str(row["trial_id"])] = frame
    if problems:
        return curves, f"validation curves: MLflow could not be read ({problems[0]})"
    if not curves:
        return curves, (
            "validation curves: no per-epoch metrics recorded for the front's trials (trials "
            "trained in populations, or by methods without epochs, report only their end)"
        )
    return curves, None
