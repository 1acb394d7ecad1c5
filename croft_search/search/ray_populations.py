"""Populations in the Ray Tune engine (``--population K``): one Ray Tune trial trains up to K
configurations of the space at once (`croft_search.trial.population`).

`PopulationSearch`, a Ray Tune searcher, asks the space's Optuna study for members (ask and
tell, so Optuna sees every member as one of its trials), groups the asked configs that can
share a population (`population_key`) into one Ray trial's config ``{"members": [...]}``,
and tells every member's result back. Ray saves the searcher, its study included, with the
experiment state, so a resumed driver goes on from it. `population_function` is what a
worker runs; each member is then recorded as a trial of its own, ``<ray trial>_<k>``, with
``population`` naming the Ray trial.
"""

from __future__ import annotations

import pickle
import socket
from collections.abc import Iterator, Mapping
from typing import Any

import optuna
import torch

from croft_search.contract import is_metric
from croft_search.errors import ConfigError
from croft_search.search.optuna_bridge import make_sampler, run_configs, study_directions, suggest
from croft_search.search.sampled_trial import run_sampled_trial
from croft_search.search.space import SearchSpace
from croft_search.trial.loop import TrainingDiverged
from croft_search.trial.population import (
    RUNG_OBJECTIVES,
    Halving,
    population_key,
    population_refusal,
    run_population,
)
from croft_search.trial.runner import TrialResources

MEMBERS = "members"
# A population's config: [[rung, [objectives]], ...] that earlier members reached (ASHA's
# record, for `Halving.history`); its report: [[[rung, objective], ...] per member].
RUNG_HISTORY = "rung_history"
RUNGS_REACHED = "rungs_reached"
# Without --population: on CPUs the size where bench/population_speed.py's methods gained
# most per member (more members only add memory traffic); on a GPU share as many as fit in
# half of its memory, each member counted as MEMBER_MATRICES fp32 d x d matrices (a bound
# on what a CRoFT member holds during a step: parameters, gradients, momenta, the
# generator's steps and the backward's temporaries; bench/population_gpu.py measures it).
CPU_POPULATION = 16
GPU_POPULATION = 1024
GPU_MEMORY_USE = 0.5
MEMBER_MATRICES = 24


def member_id(population: str, index: int) -> str:
    return f"{population}_{index}"


def space_halving(space: SearchSpace) -> Halving | None:
    """The space's ASHA rungs as successive halving inside each population."""
    if not space.scheduler:
        return None
    asha = dict(space.scheduler)
    return Halving.asha(int(asha["grace_period"]), int(asha["reduction_factor"]),
                        int(asha["max_t"]))  # fmt: skip


def space_refusal(space: SearchSpace) -> str | None:
    """Why the trials of ``space`` cannot train as populations, or None."""
    if len(space.seeds) > 1 and space.sampler != "grid":
        return (
            f"space {space.name} averages several seeds per trial; populations take one seed "
            "per member (use the grid sampler's seed axis)"
        )
    return next(_refusals(space, [None]), None)


def _refusals(space: SearchSpace, variants: list[str | None]) -> Iterator[str]:
    """Why each of the space's methods (crossed with ``variants``) cannot batch, where not."""
    for method in space.methods:
        for variant in variants:
            config = run_configs(space.config_for(method, variant, {}, None))[0]
            refusal = population_refusal(config)
            if refusal:
                yield refusal


def check_population_space(space: SearchSpace, size: int) -> None:
    """Refuse what populations do not do yet, in one line, before anything starts."""
    if size < 1:
        raise ConfigError(f"--population must be >= 1, got {size}")
    refusal = space_refusal(space) if size > 1 else None
    if refusal:
        raise ConfigError(f"--population {size}: {refusal}; use --population 1")


def default_population(
    space: SearchSpace, gpus_per_trial: float, embed_dim: int, shared_bytes: int = 0
) -> int:
    """The population size a search takes without ``--population``: 1 where some of the
    space's trials cannot batch (a variant of an ablation, say: those would train alone and
    the rest in small populations); on a GPU share as many members of ``embed_dim``-wide
    features as fit in `GPU_MEMORY_USE` of its memory once ``shared_bytes`` are there (the
    training views a population puts on the device, at most every split's), at most
    `GPU_POPULATION`; on CPUs `CPU_POPULATION`."""
    mixed = next(_refusals(space, [*space.variants] or [None]), None) is not None
    if mixed or space_refusal(space) is not None:
        return 1
    if gpus_per_trial > 0 and torch.cuda.is_available():
        share = torch.cuda.get_device_properties(0).total_memory * min(gpus_per_trial, 1.0)
        member_bytes = MEMBER_MATRICES * embed_dim * embed_dim * 4
        room = share * GPU_MEMORY_USE - shared_bytes
        return max(1, min(GPU_POPULATION, int(room // member_bytes)))
    return CPU_POPULATION


class PopulationSearch:
    """Made a Ray Tune Searcher by `searcher_class` (Ray is imported in the driver only)."""

    def __init__(self, space: SearchSpace, selection: str, size: int, seed: int) -> None:
        self.space, self.selection, self.size = space, selection, size
        self.total = space.num_samples
        self.study = optuna.create_study(
            directions=study_directions(space), sampler=make_sampler(space, seed)
        )
        self.asked = 0
        self.queue: list[tuple[int, dict[str, Any]]] = []  # asked members not yet placed
        self.placed: dict[str, list[int]] = {}  # Ray trial -> its members' Optuna numbers
        self.rungs: dict[int, list[float]] = {}  # rung -> objectives members reached there

    def next_members(self, trial_id: str) -> dict[str, Any] | None:
        """The next population's config, or None when every sample is placed."""
        # Once the samples left would not fill a population, all of them are asked: they
        # join the populations placed now instead of trailing as small ones of their own.
        while self.asked < self.total and (
            len(self.queue) < self.size or self.total - self.asked < self.size
        ):
            trial = self.study.ask()
            config = suggest(self.space, trial) | {"selection": self.selection}
            self.queue.append((trial.number, config))
            self.asked += 1
        if not self.queue:
            return None
        first = run_configs(self.queue[0][1])[0]
        if population_refusal(first) is not None:
            # A config that cannot batch (a variant of a mixed space) trains alone.
            chosen = self.queue[:1]
        else:
            key = population_key(first)
            chosen = [m for m in self.queue if population_key(run_configs(m[1])[0]) == key]
            chosen = chosen[: self.size]
        self.queue = [m for m in self.queue if m not in chosen]
        self.placed[trial_id] = [number for number, _ in chosen]
        config: dict[str, Any] = {MEMBERS: [config for _, config in chosen]}
        rungs = self._rungs()
        if rungs:
            config[RUNG_HISTORY] = [[rung, list(values)] for rung, values in sorted(rungs.items())]
        return config

    def _rungs(self) -> dict[int, list[float]]:
        # A searcher saved by an older version (a resumed search) has no record yet.
        return self.__dict__.setdefault("rungs", {})

    def tell(self, trial_id: str, result: Mapping[str, Any] | None) -> None:
        numbers = self.placed.pop(trial_id, [])
        results = list((result or {}).get(MEMBERS) or [])
        rungs = self._rungs()
        for reached in (result or {}).get(RUNGS_REACHED) or []:
            for rung, value in reached:
                rungs.setdefault(int(rung), []).append(float(value))
        metrics = self.space.metric_names()
        for index, number in enumerate(numbers):
            row = results[index] if index < len(results) else {}
            values = [row.get(name) for name in metrics]
            # A member halving stopped counts with the validation metrics it reached, as Ray's
            # Optuna searcher counts a trial ASHA stopped.
            ok = row.get("status") in ("ok", "stopped")
            if ok and all(isinstance(v, (int, float)) for v in values):
                self.study.tell(number, values if len(values) > 1 else values[0])
            else:
                self.study.tell(number, state=optuna.trial.TrialState.FAIL)


def searcher_class() -> type:
    from ray.tune.search import Searcher

    class RaySearch(Searcher):
        """`PopulationSearch` as Ray Tune's searcher; its state pickles with Ray's
        experiment state (the Optuna study in memory, its sampler included)."""

        def __init__(self, space: SearchSpace, selection: str, size: int, seed: int) -> None:
            super().__init__(metric=None, mode=None)
            self.search = PopulationSearch(space, selection, size, seed)

        def suggest(self, trial_id: str) -> dict | str | None:
            config = self.search.next_members(trial_id)
            return Searcher.FINISHED if config is None else config

        def on_trial_complete(self, trial_id: str, result: dict | None = None,
                              error: bool = False) -> None:  # fmt: skip
            self.search.tell(trial_id, None if error else result)

        def save(self, checkpoint_path: str) -> None:
            with open(checkpoint_path, "wb") as file:
                pickle.dump(self.search, file)

        def restore(self, checkpoint_path: str) -> None:
            with open(checkpoint_path, "rb") as file:
                self.search = pickle.load(file)

    return RaySearch


def population_function(
    config: dict[str, Any],
    resources: TrialResources,
    device: str,
    threads: int,
    finished: dict[str, dict[str, Any]] | None = None,
    halving: Halving | None = None,
) -> None:
    """What a Ray worker runs for one population: its members trained as one program
    (with successive halving at the space's ASHA rungs, ``halving``), one final report
    carrying every member's result (``status`` and ``error`` each). A member
    already recorded (a resumed search) replays its row; where the population as a whole
    fails because a member diverged, the members run one at a time, so only that one fails;
    any other error fails every member with it. A config that cannot batch (a variant of a
    space that mixes both) comes alone and trains as a trial of its own, to the end."""
    import ray
    from ray import tune

    torch.set_num_threads(threads)
    node = f"{socket.gethostname()}/{ray.get_runtime_context().get_node_id()[:12]}"
    population = tune.get_context().get_trial_id()
    members = config[MEMBERS]
    if halving is not None and config.get(RUNG_HISTORY):
        halving = halving.with_history({int(rung): tuple(values)
                                        for rung, values in config[RUNG_HISTORY]})  # fmt: skip
    recorded = [(finished or {}).get(member_id(population, k)) for k in range(len(members))]
    if all(row is not None for row in recorded):
        results = [run_sampled_trial(m, None, device, _no_report, row)
                   for m, row in zip(members, recorded, strict=True)]  # fmt: skip
    else:
        runs = [{**run_configs(m)[0], "device": device} for m in members]
        trained = None
        try:
            # A config that cannot batch comes alone (the searcher places it so): a trial.
            if population_refusal(runs[0]) is None:
                trained = run_population(runs, resources, halving)
        except TrainingDiverged:
            pass  # one member's loss diverged: each member alone, so only that one fails
        except Exception as err:  # noqa: BLE001 - recorded for every member, the search goes on
            line = f"{type(err).__name__}: {' '.join(str(err).split())}"
            trained = [{"status": "failed", "error": line} for _ in members]
        if trained is None:
            results = [run_sampled_trial(m, resources, device, _no_report) for m in members]
        else:
            results = [{**r, "final": 1, "status": r.get("status", "ok"),
                        "error": r.get("error", "")} for r in trained]  # fmt: skip
    clean = [{k: v for k, v in r.items() if is_metric(k) or k in ("final", "status", "error")}
             for r in results]  # fmt: skip
    reached = [[[rung, value] for rung, value in sorted(r.get(RUNG_OBJECTIVES, {}).items())]
               for r in results]  # fmt: skip
    tune.report({"final": 1, "node": node, MEMBERS: clean, RUNGS_REACHED: reached})


def _no_report(row: dict[str, Any]) -> None:
    return None
