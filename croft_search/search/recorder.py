"""The one owner of a search's results. An engine tells it what happens to each trial
(started, an epoch, restarted, finished, stopped, failed), in plain data keyed by the
engine's trial id; it keeps every trial exactly once in the three places a search writes:

1. ``trials.parquet`` (`results.TrialTable`), first: the record the others are rebuilt from;
2. the Optuna study mirror (`optuna_bridge.StudyMirror`, ``optuna.db``);
3. MLflow (`croft_search.tracking`): one child run per trial under the search's parent run.

A trial already recorded is never recorded again, so an engine may replay events after a
resume. The study's and MLflow's writes run in order on a thread of their own
(`BackgroundWriter`): an event returns once the trial's row is written, so the engine's
thread, which starts the next trial, never waits on SQLite (tens of milliseconds a trial,
seconds for a population's members); `Recorder.wait` and `Recorder.close` wait for them.
A driver killed before they are done leaves rows without study entries or runs, which the
next open adds. MLflow may fail or be unreachable at any moment: the search goes on, the
trials it missed are sent when it answers again (retried every `MLFLOW_RETRY_SECONDS`), when the
search ends (retried for `MLFLOW_END_PATIENCE_SECONDS`), or by
``python -m croft_search.sync FOLDER``; a run half-written when the driver died is
completed from the table on the next open.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from croft_search.contract import (
    CONFIG_PREFIX,
    SEARCH_FILE,
    TRIAL_COLUMNS,
    config_key,
    is_metric,
)
from croft_search.errors import ConfigError
from croft_search.search.optuna_bridge import StudyMirror
from croft_search.search.results import TrialTable, is_missing
from croft_search.search.space import SearchSpace
from croft_search.tracking import SearchTracker

# After an MLflow failure, the recorder stops calling it (each call to a dead server costs
# its timeout) and tries again this often.
MLFLOW_RETRY_SECONDS = 15.0
# The search's end is the last chance to send what MLflow missed without the sync command:
# it tries at once, whatever the retry window, and again every `MLFLOW_END_RETRY_SECONDS`
# for this long (a server just restarted can fail its first requests on a busy machine).
MLFLOW_END_PATIENCE_SECONDS = 30.0
MLFLOW_END_RETRY_SECONDS = 5.0
# How long one MLflow HTTP request may take before it counts as failed, and how often it
# is retried, unless the user's MLFLOW_HTTP_REQUEST_* variables say otherwise (MLflow's
# own defaults, minutes of retries, would stall the driver and the trials it schedules).
MLFLOW_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
SHOWN_METRICS = ("objective", "val_acc", "val_auroc", "test_acc")


@dataclass(frozen=True)
class SearchMeta:
    """``search.json``: what a search folder holds and where its MLflow runs live."""

    space: str
    name: str
    tracking_uri: str
    parent_run_id: str
    selection: str

    @classmethod
    def read(cls, folder: Path) -> SearchMeta:
        path = Path(folder) / SEARCH_FILE
        if not path.exists():
            raise ConfigError(f"{folder} is no search folder: it has no {SEARCH_FILE}")
        raw = json.loads(path.read_text())
        return cls(
            raw["space"],
            raw["name"],
            raw["tracking_uri"],
            raw["mlflow_parent_run_id"],
            raw.get("selection", "val"),
        )


class Recorder:
    """Exactly-once results of one search folder (see the module's docstring)."""

    def __init__(self, folder: Path, space: SearchSpace, *, echo: bool = True) -> None:
        self.folder = Path(folder)
        self.meta = SearchMeta.read(self.folder)
        self.space = space
        self.total = space.num_samples
        self.echo = echo
        self.table = TrialTable(self.folder, self.meta.name, space.name)
        self.study = StudyMirror(self.folder, self.meta.name, space)
        self.mlflow = MlflowMirror(self.meta)
        self.writer = BackgroundWriter()
        self._held: list | None = None  # writes asked for inside `together`
        self._started: dict[str, float] = {}
        for row in self.table.rows:  # rows a killed driver wrote before their study entry
            self.study.add(row["trial_id"], row_config(row), row, row["status"])
        self.mlflow.sync(self.table)

    # ------------------------------------------------------------------ what is recorded
    def recorded(self, trial_id: str) -> dict[str, Any] | None:
        """The recorded row of ``trial_id``, None if it has none."""
        return self.table.by_id.get(trial_id)

    def is_complete(self) -> bool:
        """Whether every sample of the space has its row."""
        return len(self.table) >= self.total

    @staticmethod
    def recorded_rows(folder: Path) -> dict[str, dict[str, Any]]:
        """Every recorded row of ``folder`` by trial id (for a trial to replay)."""
        return dict(TrialTable(folder, "", "").by_id)

    @staticmethod
    def recorded_count(folder: Path) -> int:
        """Rows recorded in ``folder``, read from the file (for a process that holds no
        recorder of its own)."""
        return TrialTable.count(folder)

    # ------------------------------------------------------------------ engine events
    def trial_started(self, trial_id: str, config: Mapping[str, Any]) -> None:
        """A trial (or a population's member) begins: its MLflow child run is opened now,
        with its config as params, while it trains, so that when it finishes only its
        metrics and status are left to write (a population's members all finish at once,
        and the search's end waits for their writes)."""
        if trial_id in self.table.by_id:
            return  # a replay of a recorded trial
        self._started.setdefault(trial_id, time.time())
        config = dict(config)
        self._write(lambda: self.mlflow.call(lambda t: t.child(trial_id, config)))

    def trial_epoch(
        self, trial_id: str, config: Mapping[str, Any], metrics: Mapping[str, Any]
    ) -> None:
        """One epoch's validation metrics of a running trial (MLflow curves only)."""
        if trial_id not in self.table.by_id:
            config, metrics = dict(config), dict(metrics)
            self._write(lambda: self.mlflow.call(lambda t: t.log_epoch(trial_id, config, metrics)))

    def trial_restarted(self, trial_id: str) -> None:
        """The engine runs the trial again from its start (its node died): the curves of
        the lost attempt are dropped with its child run."""
        if trial_id not in self.table.by_id:
            self._write(lambda: self.mlflow.call(lambda t: t.discard_child(trial_id)))

    def trial_finished(self, trial_id: str, config: Mapping[str, Any],
                       metrics: Mapping[str, Any], **where: Any) -> bool:  # fmt: skip
        return self._record(trial_id, config, metrics, "ok", "", **where)

    def trial_stopped(self, trial_id: str, config: Mapping[str, Any],
                      metrics: Mapping[str, Any], **where: Any) -> bool:  # fmt: skip
        """Stopped early by the scheduler: its last validation metrics, no test ones."""
        return self._record(trial_id, config, metrics, "stopped", "", **where)

    def trial_failed(self, trial_id: str, config: Mapping[str, Any], error: str,
                     metrics: Mapping[str, Any] | None = None, **where: Any) -> bool:  # fmt: skip
        return self._record(trial_id, config, metrics or {}, "failed", error, **where)

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """Record several trials that finished together (a population's members) with one
        write of trials.parquet, when the block ends; their study entries and runs are
        asked for after it, so none comes before its row. A driver killed inside the block
        leaves none of them, and the engine runs them again: still once each."""
        self.table.deferred = True
        self._held = []
        try:
            yield
        finally:
            held, self._held = self._held, None
            self.table.deferred = False
            self.table.flush()
            for action, on_done in held:
                self.writer.submit(action, on_done)

    def wait(self) -> None:
        """Wait for every study and MLflow write asked for so far; their run ids go into
        the table."""
        self.writer.wait()
        self.table.flush()

    def close(self, summary: Mapping[str, Any]) -> None:
        """End the search: the study's and MLflow's writes done, the table flushed,
        unrecorded attempts' child runs discarded (trials still running when the last
        sample's row arrived), the parent finished."""
        self.wait()
        self.mlflow.sync_at_end(self.table)
        self.mlflow.call(lambda t: t.discard_unrecorded(self.table.trial_ids))
        self.mlflow.call(lambda t: t.finish_parent(summary))
        if self.mlflow.missing(self.table):
            print(
                f"MLflow at {self.meta.tracking_uri} did not answer: "
                f"{self.mlflow.missing(self.table)} trial(s) are in {self.table.path} only; "
                f"send them with `python -m croft_search.sync {self.folder}`",
                file=sys.stderr,
                flush=True,
            )

    # ------------------------------------------------------------------ internals
    def _write(self, action: Callable[[], Any], on_done: Callable[[Any], Any] | None = None
               ) -> None:  # fmt: skip
        """Hand a study or MLflow write to the writer, after the block's parquet write
        inside `together`."""
        if self._held is not None:
            self._held.append((action, on_done))
        else:
            self.writer.submit(action, on_done)

    def _record(self, trial_id: str, config: Mapping[str, Any], metrics: Mapping[str, Any],
                status: str, error: str, node: str = "", attempts: int = 1,
                population: str = "") -> bool:  # fmt: skip
        self.writer.collect()
        if trial_id in self.table.by_id or self.is_complete():
            # Recorded before (a replay), or a surplus trial of a resumed search finishing
            # in the same step as the last requested one: its child run is discarded at close.
            return False
        metrics = {k: v for k, v in metrics.items() if is_metric(k)}
        config = dict(config)
        wall = time.time() - self._started.pop(trial_id, time.time())
        self.table.add(
            trial_id, config, metrics, status, error, node=node, wall_seconds=wall,
            attempts=attempts, population=population,
        )  # fmt: skip
        self._write(lambda: self.study.add(trial_id, config, metrics, status))
        self._write(
            lambda: self.mlflow.call(
                lambda t: t.finish_trial(trial_id, config, metrics, status, error, population)
            ),
            lambda run_id: run_id and self.table.set_run_id(trial_id, run_id),
        )
        if self.mlflow.reconnected and self._held is None:
            self.writer.wait()  # a run still being written is no missing one
            self.mlflow.sync(self.table)
        if self.echo:
            shown = ", ".join(f"{k} {metrics[k]:.3f}" for k in SHOWN_METRICS if k in metrics)
            print(
                f"[{len(self.table)}/{self.total}] trial {trial_id} "
                f"{config.get('method')} {status}: {shown or error}",
                flush=True,
            )
        return True


class BackgroundWriter:
    """Calls run in the order submitted on a daemon thread of their own (a driver that dies
    mid-write loses no row, only entries the next open adds); each call's result, or the
    error it raised, comes back on the submitting thread in `collect` or `wait`."""

    def __init__(self) -> None:
        self._pending: queue.Queue = queue.Queue()
        self._done: deque[tuple[Callable[[Any], Any] | None, Any, BaseException | None]] = deque()
        self._thread: threading.Thread | None = None

    def submit(self, action: Callable[[], Any], on_done: Callable[[Any], Any] | None = None
               ) -> None:  # fmt: skip
        """Run ``action()`` after every call submitted before; ``on_done`` gets its result."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="recorder-writer", daemon=True)
            self._thread.start()
        self._pending.put((action, on_done))

    def _run(self) -> None:
        while True:
            action, on_done = self._pending.get()
            try:
                self._done.append((on_done, action(), None))
            except Exception as err:  # noqa: BLE001 - raised again on the submitting thread
                self._done.append((None, None, err))
            finally:
                self._pending.task_done()

    def collect(self) -> None:
        """Hand the results of the calls done so far to their ``on_done``; a call's error
        is raised here."""
        while self._done:
            on_done, result, error = self._done.popleft()
            if error is not None:
                raise error
            if on_done is not None:
                on_done(result)

    def wait(self) -> None:
        """Wait for every submitted call, then `collect`."""
        self._pending.join()
        self.collect()


class MlflowMirror:
    """The search's MLflow runs, written through a tracker that may fail at any call.

    A failed call marks MLflow down (one warning); while it is down calls are skipped, and
    the first call after `MLFLOW_RETRY_SECONDS` tries again. `sync` sends every recorded
    trial that has no ended child run, from its row. One call at a time, from whichever
    thread (the recorder's `BackgroundWriter` or its owner)."""

    def __init__(self, meta: SearchMeta) -> None:
        for key, value in MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        self.meta = meta
        self.tracker: SearchTracker | None = None
        self.down_since: float | None = None
        self.reconnected = False
        self._lock = threading.RLock()
        self._connect()

    def _connect(self) -> bool:
        try:
            tracker = SearchTracker(self.meta.tracking_uri, self.meta.space)
            tracker.start_parent(self.meta.name, {}, "", self.meta.parent_run_id)
        except Exception as err:  # noqa: BLE001 - any backend failure means "down"
            self._went_down(err)
            return False
        self.tracker = tracker
        if self.down_since is not None:
            print(f"MLflow at {self.meta.tracking_uri} answers again", file=sys.stderr)
            self.reconnected = True
        self.down_since = None
        return True

    def _went_down(self, err: BaseException) -> None:
        if self.down_since is None:
            line = " ".join(str(err).split())[:300] or type(err).__name__
            print(
                f"MLflow at {self.meta.tracking_uri} failed ({line}); the search goes on, "
                "trials.parquet keeps every trial and they are sent when it answers again",
                file=sys.stderr,
                flush=True,
            )
        self.down_since = time.monotonic()
        self.tracker = None

    def call(self, action: Any) -> Any:
        """``action(tracker)``, or None where MLflow is down or the call fails."""
        with self._lock:
            return self._call(action)

    def _call(self, action: Any) -> Any:
        if self.tracker is None:
            waited = time.monotonic() - (self.down_since or 0.0)
            if waited < MLFLOW_RETRY_SECONDS or not self._connect():
                return None
        try:
            return action(self.tracker)
        except Exception as err:  # noqa: BLE001 - the search must outlive its tracking server
            self._went_down(err)
            return None

    def missing(self, table: TrialTable) -> int:
        """Recorded trials whose MLflow run is not known to have ended."""
        return sum(1 for row in table.rows if not row.get("mlflow_run_id"))

    def sync(self, table: TrialTable) -> int:
        """Send every recorded trial without an ended child run (its config as params, its
        recorded metrics, status and error); returns how many were sent."""
        self.reconnected = False
        sent = 0
        for row in table.rows:
            if row.get("mlflow_run_id"):
                continue
            trial_id = row["trial_id"]
            run_id = self.call(lambda t, i=trial_id: t.finished_run(i))
            if run_id is None:
                if self.tracker is None:
                    break
                run_id = self.call(lambda t, r=row: _send_row(t, r))
                sent += run_id is not None
            if run_id:
                table.set_run_id(trial_id, run_id)
        table.flush()
        return sent

    def sync_at_end(self, table: TrialTable) -> int:
        """`sync`, tried now even inside the retry window, and retried for up to
        `MLFLOW_END_PATIENCE_SECONDS` while MLflow fails; returns how many were sent."""
        deadline = time.monotonic() + MLFLOW_END_PATIENCE_SECONDS
        sent = 0
        while True:
            if self.tracker is not None or self._connect():
                sent += self.sync(table)
                if self.tracker is not None:
                    return sent
            if time.monotonic() + MLFLOW_END_RETRY_SECONDS > deadline:
                return sent
            time.sleep(MLFLOW_END_RETRY_SECONDS)


def _send_row(tracker: SearchTracker, row: Mapping[str, Any]) -> str:
    metrics = {k: v for k, v in row.items() if _is_recorded_metric(k, v)}
    error = row.get("error") or ""
    population = row.get("population") or ""
    return tracker.finish_trial(
        row["trial_id"], row_config(row), metrics, row["status"], error, population
    )


def row_config(row: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's config from its row (the ``config/<key>`` columns that are set)."""
    config = {}
    for column, value in row.items():
        key = config_key(column)
        if key is None or is_missing(value):
            continue
        config[key] = value.item() if hasattr(value, "item") else value
    return config


def _is_recorded_metric(key: str, value: Any) -> bool:
    return (
        key not in TRIAL_COLUMNS
        and not str(key).startswith(CONFIG_PREFIX)
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
        and not is_missing(value)
    )
