"""The Ray Tune engine: Optuna (through Ray Tune's OptunaSearch) proposes configurations of a
search space, Ray Tune runs them as trials on fractional GPUs or CPUs (locally or on a
cluster), ASHA stops weak trials early where the space asks for it, and every trial event
goes to the search's `Recorder`, in the driver only.

Features are loaded (or encoded) once in the driver and shipped to every trial through Ray's
object store, so workers on other nodes need neither the images nor the cache. A trial whose
node dies is run again from its start on a node that lives (`NODE_FAILURE_RETRIES`); a
trial's own error (a diverged loss, a bad value) is a result, recorded as failed, not
retried.

Folder of a search (`croft_search.search.folder`): ``STORAGE/<space>/<name>/`` holds Ray
Tune's experiment state (for ``--resume``), ``trials.parquet``, ``optuna.db`` (the Optuna
study, for optuna-dashboard), ``search.json`` and ``space.yaml``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from croft_search.contract import (
    JOINT_METRIC,
    SEARCH_FILE,
    SUMMARY_FILE,
    TEST_PREFIX,
    VAL_PREFIX,
    config_key,
)
from croft_search.errors import ConfigError, CroftError
from croft_search.fronts import pareto_ranks
from croft_search.search.folder import (
    POPULATION_KEY,
    check_same_space,
    create_folder,
    resolve_folder,
)
from croft_search.search.optuna_bridge import make_sampler, suggest
from croft_search.search.ray_populations import (
    MEMBERS,
    check_population_space,
    default_population,
    member_id,
    population_function,
    space_halving,
)
from croft_search.search.ray_populations import searcher_class as population_searcher_class
from croft_search.search.recorder import Recorder
from croft_search.search.results import is_missing
from croft_search.search.sampled_trial import trial_function
from croft_search.search.space import SearchSpace
from croft_search.trial.runner import TrialResources, load_resources

TUNE_FILE_LOGGERS_SWITCH = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"
# A trial reports once per epoch, then once more with its final (test) metrics: ASHA's
# max_t, counted in reports, is the space's epoch bound plus this, so ASHA never stops a
# trial between its last epoch and its final report.
FINAL_REPORTS = 1
# What a search's summary shows of its best trials besides config, val_* and test_* values.
BEST_ROW_KEYS = ("trial_id", "method", JOINT_METRIC)
# How often a trial runs again after its node (or its worker process) died.
NODE_FAILURE_RETRIES = 2


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
    # Configurations one Ray trial trains at once (ray_populations); None: chosen for the
    # hardware (`default_population`), or what a resumed search was started with.
    population: int | None = None


@dataclass
class SearchOutcome:
    folder: Path
    trials: int
    failed: int
    best: list[dict[str, Any]]
    tracking_uri: str
    parent_run_id: str
    search_seconds: float = 0.0  # wall time of the trials phase (after features are loaded)
    population: int = 1


# --------------------------------------------------------------------------- the driver side
@dataclass(frozen=True)
class Suggest:
    """Optuna's define-by-run space; a module-level class so Ray can pickle the searcher
    into the experiment state (a lambda cannot be pickled)."""

    space: SearchSpace
    selection: str

    def __call__(self, trial: Any) -> dict[str, Any]:
        return suggest(self.space, trial) | {"selection": self.selection}


def _ray_classes() -> tuple[type, type, type]:
    """Ray's plug-in classes, made when Ray is imported (the driver only): the callback that
    turns Ray's trial events into the recorder's, the stopper, and the searcher."""
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    class RecordTrials(tune.Callback):
        """Ray's trial events -> `Recorder`. Holds only plain settings so Ray can pickle it
        into the experiment state; opens the recorder in setup(), which also runs after a
        resume."""

        def __init__(self, folder: Path, space: SearchSpace) -> None:
            self.folder, self.space = Path(folder), space

        def setup(self, **info: Any) -> None:
            self.recorder = Recorder(self.folder, self.space)

        def __getstate__(self) -> dict[str, Any]:
            return {"folder": self.folder, "space": self.space}

        def on_trial_start(self, iteration, trials, trial, **info) -> None:  # noqa: ANN001
            for trial_id, config in _members(trial):
                self.recorder.trial_started(trial_id, config)

        def on_trial_recover(self, iteration, trials, trial, **info) -> None:  # noqa: ANN001
            self.recorder.trial_restarted(trial.trial_id)

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:  # noqa: ANN001
            if not result.get("final"):
                self.recorder.trial_epoch(trial.trial_id, trial.config, result)

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:  # noqa: ANN001
            result = trial.last_result or {}
            where = {"node": str(result.get("node", "")), "attempts": trial.num_failures + 1}
            if MEMBERS in trial.config:
                with self.recorder.together():
                    for (trial_id, config), row in zip(_members(trial), result.get(MEMBERS) or [],
                                                       strict=False):  # fmt: skip
                        self._record(trial_id, config, row, **where, population=trial.trial_id)
                return
            self._record(trial.trial_id, trial.config, result, **where)

        def _record(self, trial_id: str, config: dict, result: dict, **where: Any) -> None:
            status = result.get("status", "ok") if result.get("final") else "stopped"
            if status == "failed":
                self.recorder.trial_failed(trial_id, config, result.get("error", ""), **where)
            elif status == "stopped":
                self.recorder.trial_stopped(trial_id, config, result, **where)
            else:
                self.recorder.trial_finished(trial_id, config, result, **where)

        def on_experiment_end(self, trials, **info) -> None:  # noqa: ANN001
            # Ray calls this however the experiment ends; the search's end opens the folder
            # afresh, which must find every study and MLflow write done.
            self.recorder.wait()

        def on_trial_error(self, iteration, trials, trial, **info) -> None:  # noqa: ANN001
            # Only an error outside the trial's code (its retries spent) reaches here.
            result = trial.last_result or {}
            where = {"node": str(result.get("node", "")), "attempts": trial.num_failures}
            if MEMBERS in trial.config:
                where["population"] = trial.trial_id
            for trial_id, config in _members(trial):
                self.recorder.trial_failed(trial_id, config, _error_line(trial), **where)

    class AllTrialsRecorded(tune.Stopper):
        """Ends the search once every sample has its row. After a resume, Ray Tune's
        searcher proposes again the samples it had proposed after its last saved state;
        their rows are already there, so they must not run as new trials. Reads the count
        from the folder: Ray restores the stopper and the callbacks as separate copies."""

        def __init__(self, folder: Path, total: int) -> None:
            self.folder, self.total = Path(folder), total

        def __call__(self, trial_id: str, result: dict) -> bool:
            return False

        def stop_all(self) -> bool:
            return Recorder.recorded_count(self.folder) >= self.total

    class FailedIsFailSearch(OptunaSearch):
        """OptunaSearch that tells a trial whose own code failed (a final result with
        status "failed") as FAIL, as it tells an errored trial."""

        def on_trial_complete(self, trial_id: str, result: dict | None = None,
                              error: bool = False) -> None:  # fmt: skip
            if result and result.get("status") == "failed":
                result, error = None, True
            super().on_trial_complete(trial_id, result, error)

    return RecordTrials, AllTrialsRecorded, FailedIsFailSearch


def _members(trial) -> list[tuple[str, dict[str, Any]]]:  # noqa: ANN001
    """(trial id, config) of what a Ray trial trains: itself, or its population's members."""
    if MEMBERS not in trial.config:
        return [(trial.trial_id, trial.config)]
    return [(member_id(trial.trial_id, k), config)
            for k, config in enumerate(trial.config[MEMBERS])]  # fmt: skip


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


def concurrent_slots(cluster: dict[str, float], cpus: float, gpus: float) -> int:
    """How many trials asking ``cpus`` CPUs and ``gpus`` GPUs each the Ray ``cluster``
    (`ray.cluster_resources()`) runs at once (a tenth of a GPU fits ten times)."""
    slots = int(cluster.get("CPU", 0.0) / cpus + 1e-9)
    if gpus > 0:
        slots = min(slots, int(cluster.get("GPU", 0.0) / gpus + 1e-9))
    return max(1, slots)


def _error_line(trial) -> str:  # noqa: ANN001
    """The last line of Ray's error file of ``trial`` (why its worker or node died)."""
    text = ""
    try:
        if trial.error_file and Path(trial.error_file).exists():
            text = Path(trial.error_file).read_text()
        else:
            text = str(trial.get_pickled_error() or "")
    except Exception:  # noqa: BLE001 - a missing error file must not break the search
        text = ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "trial failed (see Ray's error file)"


# --------------------------------------------------------------------------- the search
@dataclass
class _Plan:
    """Everything decided before Ray starts."""

    space: SearchSpace
    folder: Path
    name: str
    gpus: float
    device: str
    selection: str
    population: int | None  # None until the backbone's width is known (`default_population`)


def _plan(space: SearchSpace, options: SearchOptions) -> _Plan:
    """The command line applied to the space and checked, before anything starts."""
    space = space.with_overrides(num_samples=options.num_samples, fixed_overrides=options.overrides)
    folder, name = resolve_folder(space, options.storage, options.name, options.resume)
    if options.resume:
        check_same_space(space, folder)
    gpus = _gpus_per_trial(options)
    if options.cpus_per_trial <= 0:
        raise ConfigError(f"--cpus-per-trial must be > 0, got {options.cpus_per_trial}")
    if options.max_concurrent is not None and options.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent must be >= 1, got {options.max_concurrent}")
    population = options.population
    if options.resume:
        population = _resumed_population(folder, population)
    if population is not None:
        check_population_space(space, population)
    if options.address:
        _check_reachable(options.address)
    device = "cuda" if gpus > 0 else "cpu"
    return _Plan(space, folder, name, gpus, device, _selection(space, options.selection),
                 population)  # fmt: skip


def _resumed_population(folder: Path, requested: int | None) -> int:
    """The population size the search in ``folder`` was started with; another one would
    restore Ray's searcher for one kind of trial and run the other."""
    import json

    started = int(json.loads((folder / SEARCH_FILE).read_text()).get(POPULATION_KEY, 1))
    if requested is not None and requested != started:
        raise ConfigError(
            f"search {folder} was started with --population {started}; resume it with that "
            "or without --population"
        )
    return started


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


def _scheduler(space: SearchSpace) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if not space.scheduler:
        return FIFOScheduler()
    asha = dict(space.scheduler)
    asha["max_t"] = int(asha["max_t"]) + FINAL_REPORTS
    return ASHAScheduler(time_attr="training_iteration", metric=JOINT_METRIC, mode="max", **asha)


def _tuner(plan: _Plan, options: SearchOptions, resources: TrialResources, concurrent: int) -> Any:
    """A new Tuner for the plan, or the one a resumed search restores from its folder;
    ``concurrent`` trials at a time, as the search asked or the cluster fits.

    The limit is explicit even where it is the cluster's: without one, Tune keeps a
    single trial of a searcher of its own pending, so the second worker process starts
    only once the first has (seconds of importing torch and fetching features); and a
    limit, unlike more pending trials, asks Optuna for no trial before a slot is free."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter

    space = plan.space
    finished = {}
    if options.resume:
        finished = {
            row["trial_id"]: row for row in Recorder(plan.folder, space, echo=False).table.rows
        }
    populations = plan.population > 1
    trainable = tune.with_resources(
        tune.with_parameters(
            population_function if populations else trial_function,
            resources=resources,
            device=plan.device,
            threads=max(1, int(options.cpus_per_trial)),
            finished=finished,
            **(
                {"halving": space_halving(space)}
                if populations
                else {"metrics": tuple(dict.fromkeys([*space.metric_names(), JOINT_METRIC]))}
            ),
        ),
        {"cpu": options.cpus_per_trial, "gpu": plan.gpus},
    )
    record_trials, all_recorded, searcher_class = _ray_classes()
    if options.resume:
        return tune.Tuner.restore(
            str(plan.folder), trainable, resume_unfinished=True, resume_errored=False
        )
    metrics, modes = space.metric_names(), space.modes()
    if populations:
        searcher = population_searcher_class()(space, plan.selection, plan.population,
                                               options.seed)  # fmt: skip
    else:
        searcher = searcher_class(
            space=Suggest(space, plan.selection),
            metric=metrics if len(metrics) > 1 else metrics[0],
            mode=modes if len(modes) > 1 else modes[0],
            sampler=make_sampler(space, options.seed),
            study_name=plan.name,
        )
    searcher = ConcurrencyLimiter(searcher, max_concurrent=concurrent)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            # A population halves its own members (ray_populations.space_halving).
            scheduler=FIFOScheduler() if populations else _scheduler(space),
            num_samples=space.num_samples,
            # One worker process per concurrent slot, reused trial after trial: a fresh
            # process per trial re-imports torch and re-fetches the features, which took
            # more than half of a small search's wall time.
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=plan.name,
            storage_path=str(plan.folder.parent),
            callbacks=[record_trials(plan.folder, space)],
            stop=all_recorded(plan.folder, space.num_samples),
            verbose=options.verbose,
            failure_config=tune.FailureConfig(max_failures=NODE_FAILURE_RETRIES),
        ),
    )


# Without --address a search starts a Ray instance of its own. Ray's default would join the
# cluster named in its temp folder's ray_current_cluster, which a cluster killed without
# `ray stop` leaves behind: the search would then wait minutes on an address nobody serves.
LOCAL_RAY = "local"


def run_search(space: SearchSpace, options: SearchOptions) -> SearchOutcome:
    """Run (or resume) a search of ``space``; returns where it wrote and the best trials."""
    import ray

    plan = _plan(space, options)
    # Loading features first: a missing dataset or backbone fails here, before Ray starts.
    resources = load_resources(
        plan.space.feature_settings(options.data_root, options.cache_dir),
        plan.space.target_domain_list(),
        progress=True,
    )
    if plan.population is None:
        views = [split.train_views for split in resources.splits.values()]
        plan = replace(plan, population=default_population(
            plan.space, plan.gpus, resources.backbone.embed_dim,
            sum(v.numel() * v.element_size() for v in views)))  # fmt: skip
    ray.init(
        address=options.address or LOCAL_RAY,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=True,
        logging_level="ERROR",
        ignore_reinit_error=True,
    )
    try:
        # Before anything is written: a request no node can meet would wait forever.
        _check_cluster_fits(ray.cluster_resources(), plan.gpus, options.cpus_per_trial)
        if not options.resume:
            create_folder(plan.folder, plan.name, plan.space, options.tracking_uri,
                          plan.selection, _parent_params(plan, options))  # fmt: skip
        slots = concurrent_slots(ray.cluster_resources(), options.cpus_per_trial, plan.gpus)
        tuner = _tuner(plan, options, resources, options.max_concurrent or slots)
        fit_started = time.perf_counter()
        with _without_tune_result_files():
            tuner.fit()
        search_seconds = time.perf_counter() - fit_started
    finally:
        ray.shutdown()
    return _finish(plan, search_seconds)


def _parent_params(plan: _Plan, options: SearchOptions) -> dict[str, Any]:
    return {
        "space": plan.space.name,
        "num_samples": plan.space.num_samples,
        "sampler": plan.space.sampler,
        "selection": plan.selection,
        "gpus_per_trial": plan.gpus,
        "cpus_per_trial": options.cpus_per_trial,
        POPULATION_KEY: plan.population,
    }


def _finish(plan: _Plan, search_seconds: float) -> SearchOutcome:
    """The search's summary, written to its folder and its MLflow parent run."""
    import json

    recorder = Recorder(plan.folder, plan.space, echo=False)
    frame = recorder.table.frame()
    ok = frame[frame["status"] == "ok"] if len(frame) else frame
    best = _best_rows(ok, plan.space)
    summary = {
        "trials": len(frame),
        "failed": int((frame.get("status") == "failed").sum()) if len(frame) else 0,
        "best": best,
    }
    (plan.folder / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
    recorder.close(summary)
    meta = recorder.meta
    return SearchOutcome(plan.folder, len(frame), summary["failed"], best, meta.tracking_uri,
                         meta.parent_run_id, search_seconds, plan.population)  # fmt: skip


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
        if config_key(c) or c.startswith((VAL_PREFIX, TEST_PREFIX)) or c in BEST_ROW_KEYS
    ]
    return [
        {k: (None if is_missing(v) else v) for k, v in row.items()}
        for row in chosen[keep].to_dict("records")
    ]


__all__ = ["SearchOptions", "SearchOutcome", "run_search", "CroftError"]
