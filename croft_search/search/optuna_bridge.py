"""Optuna and a search space: define-by-run suggestions, the space's sampler, the configs a
sampled trial runs, and the study mirrored on disk. Nothing here knows the engine that runs
the trials (`croft_search.search.ray_engine` is one)."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna

from croft_search.contract import OPTUNA_FILE
from croft_search.search.space import GRID_POINT, METHOD_PARAM_SEPARATOR, Param, SearchSpace


def suggest(space: SearchSpace, trial: optuna.trial.BaseTrial) -> dict[str, Any]:
    """Define-by-run: sample one trial's parameters of ``space`` from ``trial`` (an Optuna
    trial, or an engine's wrapper of one) and return the complete trial config."""
    if space.grid_points is not None:
        index = trial.suggest_categorical(GRID_POINT, list(range(len(space.grid_points))))
        return space.config_for(*space.grid_points[index])
    as_grid = space.sampler == "grid"
    method = space.methods[0]
    if len(space.methods) > 1:
        method = trial.suggest_categorical("method", list(space.methods))
    variant = None
    if space.variants:
        variant = trial.suggest_categorical("variant", list(space.variants))
    overridden = space.variants.get(variant, {})
    values = {
        key: suggest_param(param, trial, space.param_name(method, key), as_grid)
        for key, param in space.search[method].items()
        if key not in overridden
    }
    seed = None
    if as_grid and len(space.seeds) > 1:
        seed = trial.suggest_categorical("seed", list(space.seeds))
    return space.config_for(method, variant, values, seed)


def suggest_param(param: Param, trial: optuna.trial.BaseTrial, name: str, as_grid: bool) -> Any:
    """Ask ``trial`` for one parameter. ``as_grid``: as the categorical axis the grid
    sampler enumerates (GridSampler returns its grid value for any distribution, but a
    categorical over exactly those values keeps the study's distributions honest)."""
    if as_grid or param.kind in ("choice", "grid"):
        return trial.suggest_categorical(name, param.grid_values())
    if param.kind == "int":
        return trial.suggest_int(
            name, int(param.low), int(param.high), step=int(param.step or 1), log=param.log
        )
    return trial.suggest_float(
        name, param.low, param.high, step=param.step, log=param.kind == "loguniform"
    )


def run_configs(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The run_trial configs of one trial config (as suggested, or as an engine hands it
    over with Optuna's parameter names merged in): search-only keys dropped, and one config
    per seed where the trial averages several. Needs no space, so a worker needs none."""
    clean = {
        key: value
        for key, value in config.items()
        if key not in (GRID_POINT, "variant") and METHOD_PARAM_SEPARATOR not in key
    }
    seeds = clean.pop("seeds", None)
    if seeds is None:
        return [clean]
    return [{**clean, "seed": seed} for seed in seeds]


def make_sampler(space: SearchSpace, seed: int) -> optuna.samplers.BaseSampler:
    """The Optuna sampler ``space`` asks for, seeded."""
    if space.sampler == "grid":
        return AskTellGridSampler(space.grid_axes(), seed=seed)
    if space.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if space.sampler == "nsga2":
        # Optuna's default population (50) exceeds most budgets here, which would make the
        # whole search its random first generation; four generations at least.
        population = max(4, min(50, space.num_samples // 4))
        return PicklableNSGAIISampler(seed=seed, population_size=population)
    # TPE: random start-up trials for a quarter of the budget (at most Optuna's 10);
    # multivariate models interactions (lambda1 with lambda2); "group" lets it model the
    # conditional parameters of multi-method spaces per method instead of falling back to
    # independent sampling. Optuna flags "group" experimental: not news to a user.
    startup = max(2, min(10, space.num_samples // 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed,
            n_startup_trials=startup,
            multivariate=True,
            group=space.is_conditional,
            constant_liar=True,  # concurrent trials: do not all sample the same spot
        )


def study_directions(space: SearchSpace) -> list[str]:
    return ["maximize" if mode == "max" else "minimize" for mode in space.modes()]


class AskTellGridSampler(optuna.samplers.GridSampler):
    """GridSampler for ask-and-tell drivers (Ray Tune's OptunaSearch is one).

    GridSampler calls ``study.stop()`` when the last grid point is told, which raises
    RuntimeError outside ``study.optimize`` (Optuna documents this), so the final tell would
    fail and leave that trial RUNNING in the stored study. The driver stops after
    ``num_samples`` trials (the grid size by default) anyway, so nothing needs stopping."""

    def after_trial(
        self,
        study: optuna.Study,
        trial: optuna.trial.FrozenTrial,
        state: optuna.trial.TrialState,
        values: Sequence[float] | None,
    ) -> None:
        pass


class PicklableNSGAIISampler(optuna.samplers.NSGAIISampler):
    """NSGAIISampler that survives pickling.

    Ray Tune pickles its searcher, sampler included, when the Tuner is built and at every
    experiment checkpoint. Optuna's genetic samplers hold a ``threading.Lock`` for their
    generation cache (Optuna 5.1 on), which cannot be pickled; the cache is rebuilt from the
    study, so a fresh lock after unpickling loses nothing."""

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        locks = [key for key, value in state.items() if isinstance(value, _LOCK_TYPES)]
        for key in locks:
            del state[key]
        state["_unpicklable_locks"] = locks
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        for key in state.pop("_unpicklable_locks", []):
            state[key] = threading.Lock()
        self.__dict__.update(state)


_LOCK_TYPES = (type(threading.Lock()), type(threading.RLock()))


TRIAL_ATTR = "ray_trial_id"


class StudyMirror:
    """The search's Optuna study on disk (`optuna.db`), for optuna-dashboard and later
    analysis. The engine's searcher keeps its own study (Ray Tune checkpoints it with the
    experiment state); this copy is written as trials finish, keyed by the engine's trial
    id, so a resumed search never adds a trial twice."""

    def __init__(self, folder: Path, name: str, space: SearchSpace) -> None:
        self.space = space
        self.metrics = space.metric_names()
        directions = study_directions(space)
        # Optuna announces every create or load at INFO; the mirror is opened by every
        # recorder, so its announcements would only repeat themselves.
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            self.study = optuna.create_study(
                storage=f"sqlite:///{Path(folder) / OPTUNA_FILE}",
                study_name=name,
                directions=directions,
                load_if_exists=True,
            )
        finally:
            optuna.logging.set_verbosity(verbosity)
        self.known = {t.user_attrs.get(TRIAL_ATTR) for t in self.study.get_trials(deepcopy=False)}

    def add(self, trial_id: str, config: Mapping[str, Any], metrics: Mapping[str, Any],
            status: str) -> None:  # fmt: skip
        """Record one finished trial: its sampled parameters (with their distributions,
        replayed through the space) and its objective value(s)."""
        if trial_id in self.known:
            return
        replay = optuna.trial.FixedTrial(dict(config))
        try:
            suggest(self.space, replay)
        except ValueError:  # a config the space no longer produces (edited YAML): skip
            return
        values = [metrics.get(m) for m in self.metrics]
        complete = status == "ok" and all(isinstance(v, (int, float)) for v in values)
        if complete:
            state = optuna.trial.TrialState.COMPLETE
        elif status == "stopped":
            state = optuna.trial.TrialState.PRUNED
        else:
            state = optuna.trial.TrialState.FAIL
        self.study.add_trial(
            optuna.trial.create_trial(
                params=replay.params,
                distributions=replay.distributions,
                values=[float(v) for v in values] if complete else None,
                state=state,
                user_attrs={TRIAL_ATTR: trial_id, "status": status},
            )
        )
        self.known.add(trial_id)
