"""The search driver: Optuna (through Ray Tune's OptunaSearch) proposes configurations of a
search space, Ray Tune runs them as trials on fractional GPUs or CPUs (locally or on a
cluster), ASHA stops weak trials early where the space asks for it, and the driver records
every finished trial in `trials.parquet` and MLflow.

Features are loaded (or encoded) once in the driver and shipped to every trial through Ray's
object store, so workers on other nodes need neither the images nor the cache.

Folder of a search: ``STORAGE/<space>/<name>/`` holds Ray Tune's experiment state (for
``--resume``), ``trials.parquet``, ``optuna.db`` (the Optuna study, for optuna-dashboard) and
``search.json`` (what the search is and where its MLflow parent run lives).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
import yaml

from croft_search.config import SEARCH_FILE, SPACE_FILE, TRIALS_FILE
from croft_search.errors import ConfigError, CroftError
from croft_search.fronts import pareto_ranks
from croft_search.results import TrialTable
from croft_search.spaces import SearchSpace
from croft_search.study import StudyMirror
from croft_search.tracking import SearchTracker
from trainables.trial import TrialResources, load_resources, run_trial

TUNE_FILE_LOGGERS_SWITCH = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"


@dataclass
class SearchOptions:
    """How to run a search (not what to search: that is the space)."""

    storage: Path = Path("runs")
    name: str | None = None
    resume: bool = False
    num_samples: int | None = None
    max_concurrent: int | None = None
    gpus_per_trial: float | None = None  # None: 0.25 where CUDA is present, else 0
    cpus_per_trial: float = 1.0
    address: str | None = None
    tracking_uri: str | None = None
    selection: str | None = None  # None: the space's own (fixed: {selection: ...}), else val
    data_root: str | None = None
    cache_dir: str | None = None
    seed: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)
    verbose: int = 1


@dataclass
class SearchOutcome:
    folder: Path
    trials: int
    failed: int
    best: list[dict[str, Any]]
    tracking_uri: str
    parent_run_id: str
    search_seconds: float = 0.0  # wall time of the trials phase (after features are loaded)


# --------------------------------------------------------------------------- the trial side
class TrialFailed(RuntimeError):
    """A trial's own error, reduced to one line for the results table."""


def trial_function(
    config: dict[str, Any],
    resources: TrialResources,
    device: str,
    threads: int,
    finished: dict[str, dict[str, Any]] | None = None,
) -> None:
    """What a Ray worker runs for one trial: report validation metrics after every epoch
    (for ASHA and MLflow), then the final validation and test metrics.

    `finished` holds the rows of trials.parquet when a search resumes: Ray Tune's experiment
    state is saved every few seconds, so a trial that finished just before the driver died
    can come back as unfinished; it reports its recorded result instead of training again."""
    import ray
    from ray import tune

    recorded = (finished or {}).get(tune.get_context().get_trial_id())
    if recorded is not None:
        _replay(recorded)
        return
    torch.set_num_threads(threads)
    # Host name alone cannot tell two Ray nodes on one machine apart; the node id can.
    node = f"{socket.gethostname()}/{ray.get_runtime_context().get_node_id()[:12]}"
    if device != "cpu":
        resources.backbone.model.to(device)

    def report(row: dict[str, float]) -> bool:
        tune.report({**row, "final": 0, "node": node})
        return False

    runs = SearchSpace.run_configs(config)
    started = time.perf_counter()
    try:
        if len(runs) == 1:
            result = run_trial({**runs[0], "device": device}, resources, report=report)
        else:
            # Several seeds per trial: their mean is the trial's result (no per-epoch reports,
            # so ASHA sees only the final one).
            results = [run_trial({**run, "device": device}, resources) for run in runs]
            result = _mean_result(results)
    except Exception as err:  # noqa: BLE001 - every trial error is recorded, the search goes on
        message = " ".join(str(err).split()) or type(err).__name__
        raise TrialFailed(f"{type(err).__name__}: {message}") from None
    # Time inside run_trial, so a benchmark can tell trial work from search overhead.
    result["trial_seconds"] = time.perf_counter() - started
    tune.report({**result, "final": 1, "node": node})


def _replay(row: dict[str, Any]) -> None:
    from ray import tune

    if row["status"] == "failed":
        raise TrialFailed(row["error"])
    metrics = {k: v for k, v in row.items() if _is_metric(k) and v == v}
    tune.report({**metrics, "final": int(row["status"] == "ok"), "node": row["node"]})


def _finished_rows(folder: Path) -> dict[str, dict[str, Any]]:
    table = TrialTable(folder, "", "")
    return {row["trial_id"]: row for row in table.rows}


def _mean_result(results: list[dict[str, Any]]) -> dict[str, Any]:
    merged = dict(results[0])
    for key, value in results[0].items():
        if isinstance(value, float):
            merged[key] = sum(r[key] for r in results) / len(results)
    return merged


# --------------------------------------------------------------------------- the driver side
@dataclass(frozen=True)
class Suggest:
    """Optuna's define-by-run space; a module-level class so Ray can pickle the searcher
    into the experiment state (a lambda cannot be pickled)."""

    space: SearchSpace
    selection: str

    def __call__(self, trial: Any) -> dict[str, Any]:
        return self.space.suggest(trial) | {"selection": self.selection}


def _driver_callback_classes():
    from ray import tune

    class SearchRecorder(tune.Callback):
        """Writes every trial to MLflow and trials.parquet, from the driver only. Holds only
        plain settings so Ray can pickle it into the experiment state; opens its client and
        table in setup(), which also runs after a resume."""

        def __init__(self, folder: Path, space: SearchSpace, search_name: str) -> None:
            self.folder = Path(folder)
            self.space = space
            self.space_name = space.name
            self.search_name = search_name
            self.total = space.num_samples

        def setup(self, **info: Any) -> None:
            meta = json.loads((self.folder / SEARCH_FILE).read_text())
            self.tracker = SearchTracker(meta["tracking_uri"], self.space_name)
            self.tracker.start_parent(self.search_name, {}, "", meta["mlflow_parent_run_id"])
            self.table = TrialTable(self.folder, self.search_name, self.space_name)
            # Child runs of a previous driver's unfinished trials (none on a fresh search).
            self.tracker.discard_unrecorded(self.table.trial_ids)
            self.study = StudyMirror(self.folder, self.search_name, self.space)
            self.started: dict[str, float] = {}

        def __getstate__(self) -> dict[str, Any]:
            keep = ("folder", "space", "space_name", "search_name", "total")
            return {k: self.__dict__[k] for k in keep}

        def on_trial_start(self, iteration, trials, trial, **info) -> None:  # noqa: ANN001
            self.started[trial.trial_id] = time.time()

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:  # noqa: ANN001
            # A resumed search replays recorded trials; their runs already hold every epoch.
            if not result.get("final") and trial.trial_id not in self.table.trial_ids:
                self.tracker.log_epoch(trial.trial_id, trial.config, result)

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:  # noqa: ANN001
            result = trial.last_result or {}
            status = "ok" if result.get("final") else "stopped"
            self._record(trial, result, status, "")

        def on_trial_error(self, iteration, trials, trial, **info) -> None:  # noqa: ANN001
            self._record(trial, trial.last_result or {}, "failed", _error_line(trial))

        def _record(self, trial, result: dict, status: str, error: str) -> None:  # noqa: ANN001
            if trial.trial_id in self.table.trial_ids:
                return
            if len(self.table) >= self.total:
                # A surplus trial of a resumed search, finished in the same step as the
                # last requested one: the search is complete without it (its child run is
                # discarded with the other unrecorded ones when the search ends).
                return
            metrics = {k: v for k, v in result.items() if _is_metric(k)}
            run_id = self.tracker.finish_trial(trial.trial_id, trial.config, metrics, status, error)
            wall = time.time() - self.started.get(trial.trial_id, time.time())
            self.study.add(trial.trial_id, trial.config, metrics, status)
            self.table.add(
                trial.trial_id,
                trial.config,
                metrics,
                status,
                error,
                node=str(result.get("node", "")),
                wall_seconds=wall,
                mlflow_run_id=run_id,
            )
            shown = ", ".join(
                f"{k} {metrics[k]:.3f}"
                for k in ("objective", "val_acc", "val_auroc", "test_acc")
                if k in metrics
            )
            print(
                f"[{len(self.table)}/{self.total}] trial {trial.trial_id} "
                f"{trial.config.get('method')} {status}: {shown or error}",
                flush=True,
            )

    class AllTrialsRecorded(tune.Stopper):
        """Ends the search once every sample has its row in trials.parquet. After a resume,
        Ray Tune's searcher proposes again the samples it had proposed after its last saved
        state; their rows are already there, so they must not run as new trials.

        Reads the row count from the file, not from the recorder: Ray restores the stopper
        and the callbacks as separate copies, so a shared object would not survive."""

        def __init__(self, folder: Path, total: int) -> None:
            self.path = Path(folder) / TRIALS_FILE
            self.total = total
            self._seen: tuple[int, int] | None = None  # (mtime, size) of the last read
            self._rows = 0

        def __call__(self, trial_id: str, result: dict) -> bool:
            return False

        def stop_all(self) -> bool:
            try:
                stat = self.path.stat()
            except FileNotFoundError:
                return False
            if self._seen != (stat.st_mtime_ns, stat.st_size):
                self._rows = pq.read_metadata(self.path).num_rows
                self._seen = (stat.st_mtime_ns, stat.st_size)
            return self._rows >= self.total

    return SearchRecorder, AllTrialsRecorded


@contextlib.contextmanager
def _without_tune_result_files() -> Iterator[None]:
    """Ray Tune writes every result of every trial to its own CSV, JSON and TensorBoard
    files from the driver, on top of trials.parquet and MLflow: only driver CPU taken from
    the trials beside it. Its switch is an environment variable read when fit() starts."""
    previous = os.environ.get(TUNE_FILE_LOGGERS_SWITCH)
    os.environ[TUNE_FILE_LOGGERS_SWITCH] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(TUNE_FILE_LOGGERS_SWITCH, None)
        else:
            os.environ[TUNE_FILE_LOGGERS_SWITCH] = previous


def _is_metric(key: str) -> bool:
    return (
        key.startswith(
            ("val_", "test_", "objective", "train_seconds", "trial_seconds", "epochs_run")
        )
        or ("/" in key and not key.startswith("config/"))
        or key in ("selection", "score", "protocol")
    )


def _error_line(trial) -> str:  # noqa: ANN001
    """The trial's own one-line error (TrialFailed's message) from Ray's error file."""
    text = ""
    try:
        if trial.error_file and Path(trial.error_file).exists():
            text = Path(trial.error_file).read_text()
        else:
            text = str(trial.get_pickled_error() or "")
    except Exception:  # noqa: BLE001 - a missing error file must not break the search
        text = ""
    marker = f"{TrialFailed.__name__}: "
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if marker in line:
            return line.split(marker, 1)[1]
    return lines[-1] if lines else "trial failed (see Ray's error file)"


def _search_folder(space: SearchSpace, options: SearchOptions) -> tuple[Path, str]:
    base = (Path(options.storage) / space.name).resolve()
    name = options.name
    if options.resume and name is None:
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
    if options.resume and not exists:
        raise ConfigError(f"nothing to resume at {folder}: no {SEARCH_FILE} there")
    if not options.resume and exists:
        raise ConfigError(f"search {folder} exists; pass --resume to continue it or another --name")
    return folder, name


def _selection(space: SearchSpace, requested: str | None) -> str:
    """The selection mode every trial records: the command line's, else the space's."""
    own = str(space.setting("selection"))
    if requested is None:
        return own
    if requested != own and own == "oracle":
        # The space's objective reads test metrics; labelling its trials "val" would hide it.
        raise ConfigError(
            f"space {space.name} selects by test metrics (fixed: {{selection: oracle}}); "
            f"--selection {requested} contradicts it"
        )
    return requested


def _check_same_space(space: SearchSpace, folder: Path) -> None:
    """A resumed search must be the search it continues: Ray restores its own copy of the
    sampler and sample count, so another --num-samples, --set or an edited space file would
    half apply (the stopper and table would follow it, the restored tuner would not)."""
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


def _check_reachable(address: str) -> None:
    """Fail at once on an address nothing listens at: ray.init keeps retrying it for
    minutes. Only plain HOST:PORT (a head's GCS) is probed; "auto" and ray:// are Ray's."""
    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except OSError as err:
        raise ConfigError(
            f"no Ray cluster answers at {address} ({err.strerror or err}); start one with "
            "`ray start --head` and pass the address it prints"
        ) from None


def _check_cluster_fits(cluster: dict[str, float], gpus: float, cpus: float) -> None:
    """A trial asking for more GPUs or CPUs than the whole Ray cluster has never starts."""
    have_gpus, have_cpus = cluster.get("GPU", 0.0), cluster.get("CPU", 0.0)
    if gpus > 0 and have_gpus < gpus:
        raise ConfigError(
            f"--gpus-per-trial {gpus:g} but the Ray cluster has {have_gpus:g} GPU(s); "
            "pass --gpus-per-trial 0 to run on CPUs"
        )
    if have_cpus < cpus:
        raise ConfigError(f"--cpus-per-trial {cpus:g} but the Ray cluster has {have_cpus:g} CPU(s)")


def _gpus_per_trial(options: SearchOptions) -> float:
    if options.gpus_per_trial is not None:
        if options.gpus_per_trial < 0:
            raise ConfigError(f"--gpus-per-trial must be >= 0, got {options.gpus_per_trial}")
        return options.gpus_per_trial
    return 0.25 if torch.cuda.is_available() else 0.0


def run_search(space: SearchSpace, options: SearchOptions) -> SearchOutcome:
    """Run (or resume) a search of ``space``; returns where it wrote and the best trials."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    space = space.with_overrides(num_samples=options.num_samples, fixed_overrides=options.overrides)
    folder, name = _search_folder(space, options)
    if options.resume:
        _check_same_space(space, folder)
    gpus = _gpus_per_trial(options)
    if options.cpus_per_trial <= 0:
        raise ConfigError(f"--cpus-per-trial must be > 0, got {options.cpus_per_trial}")
    if options.max_concurrent is not None and options.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent must be >= 1, got {options.max_concurrent}")
    device = "cuda" if gpus > 0 else "cpu"
    selection = _selection(space, options.selection)
    if options.address:
        _check_reachable(options.address)

    # Loading features first: a missing dataset or backbone fails here, before Ray starts.
    resources = load_resources(space.feature_settings(options.data_root, options.cache_dir),
                               space.target_domain_list(), progress=True)  # fmt: skip

    ray.init(
        address=options.address,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=True,
        logging_level="ERROR",
        ignore_reinit_error=True,
    )
    try:
        # Before anything is written: a request no node can meet would wait forever.
        _check_cluster_fits(ray.cluster_resources(), gpus, options.cpus_per_trial)
        folder.mkdir(parents=True, exist_ok=True)
        if not options.resume:
            tracker = SearchTracker(options.tracking_uri, space.name)
            parent = tracker.start_parent(
                name,
                {
                    "space": space.name,
                    "num_samples": space.num_samples,
                    "sampler": space.sampler,
                    "selection": selection,
                    "gpus_per_trial": gpus,
                    "cpus_per_trial": options.cpus_per_trial,
                },
                space.to_yaml(),
                None,
            )
            (folder / SEARCH_FILE).write_text(
                json.dumps(
                    {
                        "space": space.name,
                        "name": name,
                        "tracking_uri": tracker.tracking_uri,
                        "mlflow_parent_run_id": parent,
                        "created": dt.datetime.now().isoformat(),
                        "selection": selection,
                    },
                    indent=2,
                )
            )
            (folder / SPACE_FILE).write_text(space.to_yaml())
        meta = json.loads((folder / SEARCH_FILE).read_text())

        threads = max(1, int(options.cpus_per_trial))
        finished = _finished_rows(folder) if options.resume else {}
        trainable = tune.with_resources(
            tune.with_parameters(
                trial_function,
                resources=resources,
                device=device,
                threads=threads,
                finished=finished,
            ),
            {"cpu": options.cpus_per_trial, "gpu": gpus},
        )
        recorder_class, stopper_class = _driver_callback_classes()
        recorder = recorder_class(folder, space, name)
        stopper = stopper_class(folder, space.num_samples)
        if options.resume:
            tuner = tune.Tuner.restore(
                str(folder), trainable, resume_unfinished=True, resume_errored=False
            )
        else:
            metrics, modes = space.metric_names(), space.modes()
            searcher = OptunaSearch(
                space=Suggest(space, selection),
                metric=metrics if len(metrics) > 1 else metrics[0],
                mode=modes if len(modes) > 1 else modes[0],
                sampler=space.make_sampler(options.seed),
                study_name=name,
            )
            if options.max_concurrent:
                searcher = ConcurrencyLimiter(searcher, max_concurrent=options.max_concurrent)
            scheduler = FIFOScheduler()
            if space.scheduler:
                # One report per epoch, then the final one: max_t counts that extra step so
                # ASHA never stops a trial before its test metrics are reported.
                asha = dict(space.scheduler)
                asha["max_t"] = int(asha.get("max_t", space.max_epochs())) + 1
                scheduler = ASHAScheduler(
                    time_attr="training_iteration", metric="objective", mode="max", **asha
                )
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    search_alg=searcher,
                    scheduler=scheduler,
                    num_samples=space.num_samples,
                    # One worker process per concurrent slot, reused trial after trial:
                    # a fresh process per trial re-imports torch and re-fetches the
                    # features, which took more than half of a small search's wall time.
                    reuse_actors=True,
                ),
                run_config=tune.RunConfig(
                    name=name,
                    storage_path=str(folder.parent),
                    callbacks=[recorder],
                    stop=stopper,
                    verbose=options.verbose,
                    failure_config=tune.FailureConfig(max_failures=0),
                ),
            )
        fit_started = time.perf_counter()
        with _without_tune_result_files():
            tuner.fit()
        search_seconds = time.perf_counter() - fit_started
    finally:
        ray.shutdown()

    table = TrialTable(folder, name, space.name)
    frame = table.frame()
    ok = frame[frame["status"] == "ok"] if len(frame) else frame
    best = _best_rows(ok, space)
    tracker = SearchTracker(meta["tracking_uri"], space.name)
    tracker.start_parent(name, {}, "", meta["mlflow_parent_run_id"])
    # Trials still running when the last sample's row arrived were stopped unrecorded.
    tracker.discard_unrecorded(table.trial_ids)
    summary = {
        "trials": len(frame),
        "failed": int((frame.get("status") == "failed").sum()) if len(frame) else 0,
        "best": best,
    }
    tracker.finish_parent(summary)
    return SearchOutcome(
        folder,
        len(frame),
        summary["failed"],
        best,
        meta["tracking_uri"],
        meta["mlflow_parent_run_id"],
        search_seconds,
    )


def _best_rows(ok, space: SearchSpace) -> list[dict[str, Any]]:  # noqa: ANN001
    """The best trial by validation (joint objective), or the validation Pareto set."""
    if not len(ok):
        return []
    metrics, modes = space.metric_names(), space.modes()
    if len(metrics) == 1:
        chosen = ok.sort_values(metrics[0], ascending=modes[0] == "min").head(1)
    else:
        ranks = pareto_ranks(ok[metrics].to_numpy(), maximize=[m == "max" for m in modes])
        chosen = ok[ranks == 0]
    keep = [
        c
        for c in chosen.columns
        if c.startswith(("config/", "val_", "test_")) or c in ("trial_id", "method", "objective")
    ]
    return [
        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
        for row in chosen[keep].to_dict("records")
    ]


__all__ = ["SearchOptions", "SearchOutcome", "run_search", "CroftError"]
