"""MLflow logging of a search, from the driver only: one experiment per space, one parent run
per search (the resolved space and the final summary as artifacts), one child run per trial
(its config as params, per-epoch validation metrics, final validation and test metrics).

Everything goes through one `MlflowClient` in the driver process, so there are never
concurrent writers (SQLite stores included), and no global "active run" state is touched.
A resumed search re-attaches to its parent run and to the child runs it already made.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import sqlalchemy
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from croft_search.contract import JOINT_METRIC, SPACE_FILE, SUMMARY_FILE, metric_split
from croft_search.errors import ConfigError

TRIAL_TAG = "croft.trial_id"
# The engine trial that trained a trial as one member of a population.
POPULATION_TAG = "croft.population"
SEARCH_TAG = "croft.search"
# MLflow caps a param value at 6000 characters; configs never come close, but be safe.
MAX_PARAM_LENGTH = 6000
# MLflow's limit on metrics (and on entries of all kinds) in one log_batch call.
MAX_METRICS_PER_BATCH = 1000
# Per-epoch metrics of a running trial reach MLflow at most this often (and when it ends).
EPOCH_FLUSH_SECONDS = 5.0
# Per-epoch figures beside the validation metrics that a child run draws as curves.
EPOCH_CURVES = (JOINT_METRIC, "lr", "ce")
# A trial's status in trials.parquet -> its child run's MLflow status.
RUN_STATUS = {"ok": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}
# MLflow 3's UI opens an experiment by its kind: without this tag it may take a search's
# experiment for a GenAI one and open on its overview instead of the runs table.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
# A SQLite store's connections write-ahead and sync only at checkpoints: a commit that waits
# for the disk cost more than the rest of a trial's writes, and the driver makes four a
# trial. Still corruption-safe on power loss (the last commits may roll back, which
# trials.parquet, written first, and `croft_search.sync` make good); a killed process
# loses nothing committed.
SQLITE_PRAGMAS = ("PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL")


def _write_ahead(client: MlflowClient) -> None:
    """`SQLITE_PRAGMAS` on every connection of the client's store where it is SQLite; other
    stores (a server, another database) are left as they are."""
    engine = getattr(getattr(client._tracking_client, "store", None), "engine", None)
    if not isinstance(engine, sqlalchemy.engine.Engine) or engine.dialect.name != "sqlite":
        return
    if not sqlalchemy.event.contains(engine, "connect", _sqlite_pragmas):
        sqlalchemy.event.listen(engine, "connect", _sqlite_pragmas)
        engine.dispose()  # connections pooled before the listener reconnect with it


def _sqlite_pragmas(connection: Any, record: Any) -> None:
    cursor = connection.cursor()
    for pragma in SQLITE_PRAGMAS:
        cursor.execute(pragma)
    cursor.close()


def _params(config: Mapping[str, Any]) -> list[Param]:
    return [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in sorted(config.items())]


def _numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


class SearchTracker:
    """Parent run of one search and the child runs of its trials."""

    def __init__(self, tracking_uri: str | None, experiment: str) -> None:
        try:
            self.client = MlflowClient(tracking_uri=tracking_uri)
            _write_ahead(self.client)
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                self.experiment_id = self.client.create_experiment(
                    experiment, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING}
                )
            else:
                self.experiment_id = found.experiment_id
                if EXPERIMENT_KIND_TAG not in found.tags:  # made by an older croft-search
                    self.client.set_experiment_tag(
                        self.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING
                    )
        except Exception as err:  # noqa: BLE001 - any backend failure is the user's URI
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            raise ConfigError(
                f"cannot use MLflow tracking URI {tracking_uri or '(default)'}: {first_line}"
            ) from None
        self.tracking_uri = tracking_uri or mlflow.get_tracking_uri()
        self.parent_run_id: str | None = None
        self._children: dict[str, str] = {}
        self._finished: set[str] = set()  # trials whose child run has ended
        self._steps: dict[str, int] = {}
        self._unsent: dict[str, list[Metric]] = {}
        self._last_sent: dict[str, float] = {}

    # ------------------------------------------------------------------ parent
    def start_parent(
        self, search_name: str, params: Mapping[str, Any], space_yaml: str, resume_id: str | None
    ) -> str:
        if resume_id:
            self.parent_run_id = resume_id
            self.client.update_run(resume_id, status="RUNNING")
            for child in self.client.search_runs(
                [self.experiment_id], f"tags.`mlflow.parentRunId` = '{resume_id}'"
            ):
                trial_id = child.data.tags.get(TRIAL_TAG)
                if trial_id:
                    self._children[trial_id] = child.info.run_id
                    if child.info.status != "RUNNING":
                        self._finished.add(trial_id)
            return resume_id
        run = self.client.create_run(
            self.experiment_id, run_name=search_name, tags={SEARCH_TAG: search_name}
        )
        self.parent_run_id = run.info.run_id
        self.client.log_batch(
            self.parent_run_id,
            params=[Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()],
        )
        self.log_text(self.parent_run_id, space_yaml, SPACE_FILE)
        return self.parent_run_id

    def finish_parent(self, summary: Mapping[str, Any], failed: bool = False) -> None:
        if self.parent_run_id is None:
            return
        self.log_text(self.parent_run_id, json.dumps(summary, indent=2, default=str), SUMMARY_FILE)
        self.client.set_terminated(self.parent_run_id, "FAILED" if failed else "FINISHED")

    # ------------------------------------------------------------------ trials
    def has_child(self, trial_id: str) -> bool:
        return trial_id in self._children

    def finished_run(self, trial_id: str) -> str | None:
        """The id of ``trial_id``'s ended child run, if it has one."""
        return self._children[trial_id] if trial_id in self._finished else None

    def discard_child(self, trial_id: str) -> None:
        """Delete one trial's child run (a restarted attempt begins a fresh one)."""
        run_id = self._children.pop(trial_id, None)
        if run_id is not None:
            self.client.set_terminated(run_id, "KILLED")
            self.client.delete_run(run_id)
            self._unsent.pop(run_id, None)
        self._steps.pop(trial_id, None)
        self._finished.discard(trial_id)

    def discard_unrecorded(self, recorded: set[str]) -> list[str]:
        """Delete the child runs of trials that have no row in trials.parquet: attempts cut
        off by a killed driver (Ray runs them again under a new child run, or proposes new
        trials instead) and surplus trials stopped once every sample had its row. Without
        this, a resumed search shows more child runs than trials. MLflow's delete is soft:
        `mlflow gc` purges them, the UI's "deleted" filter still shows them."""
        discarded = [trial_id for trial_id in self._children if trial_id not in recorded]
        for trial_id in discarded:
            self.discard_child(trial_id)
        return discarded

    def child(self, trial_id: str, config: Mapping[str, Any]) -> str:
        """The child run of ``trial_id``, created with its config as params on first use."""
        if trial_id not in self._children:
            run_id = self._create_child(trial_id, config)
            self.client.log_batch(run_id, params=_params(config))
        return self._children[trial_id]

    def _create_child(self, trial_id: str, config: Mapping[str, Any]) -> str:
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"{config.get('method', 'trial')}-{trial_id}",
            tags={
                "mlflow.parentRunId": self.parent_run_id or "",
                TRIAL_TAG: trial_id,
                "method": str(config.get("method", "")),
            },
        )
        self._children[trial_id] = run.info.run_id
        return run.info.run_id

    def log_epoch(
        self, trial_id: str, config: Mapping[str, Any], metrics: Mapping[str, Any]
    ) -> None:
        run_id = self.child(trial_id, config)
        step = int(metrics.get("epoch", self._steps.get(trial_id, 0)))
        self._steps[trial_id] = step + 1
        now = int(time.time() * 1000)
        values = [Metric(f"epoch_{k}", v, now, step) for k, v in _numeric(metrics).items()
                  if metric_split(k) == "val" or k in EPOCH_CURVES]  # fmt: skip
        self._unsent.setdefault(run_id, []).extend(values)
        # One write per epoch and trial kept the driver busy enough to slow the trials
        # beside it on a small machine; curves still appear live, every few seconds.
        if time.monotonic() - self._last_sent.get(run_id, -math.inf) >= EPOCH_FLUSH_SECONDS:
            self._send_epochs(run_id)

    def _send_epochs(self, run_id: str) -> None:
        unsent = self._unsent.pop(run_id, [])
        for start in range(0, len(unsent), MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=unsent[start : start + MAX_METRICS_PER_BATCH])
        self._last_sent[run_id] = time.monotonic()

    def finish_trial(
        self,
        trial_id: str,
        config: Mapping[str, Any],
        metrics: Mapping[str, Any],
        status: str,
        error: str = "",
        population: str = "",
    ) -> str:
        params: list[Param] = []
        if trial_id in self._children:
            run_id = self._children[trial_id]
            self._send_epochs(run_id)
        else:  # no curves came first (a population's member): its params go with the rest
            run_id = self._create_child(trial_id, config)
            params = _params(config)
        now = int(time.time() * 1000)
        values = [Metric(k, v, now, 0) for k, v in _numeric(metrics).items()]
        tags = [RunTag("status", status)] + ([RunTag("error", error[:5000])] if error else [])
        if population:
            tags.append(RunTag(POPULATION_TAG, population))
        if len(params) + len(values) + len(tags) > MAX_METRICS_PER_BATCH:
            self.client.log_batch(run_id, params=params)
            params = []
        self.client.log_batch(run_id, metrics=values, params=params, tags=tags)
        # An ASHA-stopped trial did nothing wrong: KILLED, as MLflow calls a run ended early.
        self.client.set_terminated(run_id, RUN_STATUS.get(status, "FAILED"))
        self._finished.add(trial_id)
        return run_id

    # ------------------------------------------------------------------ helpers
    def log_text(self, run_id: str, text: str, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(text)
            self.client.log_artifact(run_id, str(path))
