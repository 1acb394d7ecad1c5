"""One sampled trial as any engine runs it: the run_trial configs of a sampled config
(seeds averaged where a trial holds several), its per-epoch reports, and its final result
with a status, a trial's own error being a failed result rather than an exception. The Ray
engine's trainables wrap it (`trial_function` here, `ray_populations.population_function`);
a resumed engine replays a recorded row through it.

This module and what it imports are what a Ray worker loads to run a trial: nothing of the
driver's (MLflow, the search folder) belongs here, since every worker process would import
it before its first trial."""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from croft_search.contract import JOINT_METRIC, is_metric
from croft_search.search.optuna_bridge import run_configs
from croft_search.search.results import is_missing
from croft_search.trial.runner import TrialResources, run_trial


def run_sampled_trial(
    config: Mapping[str, Any],
    resources: TrialResources | None,
    device: str,
    report: Callable[[dict[str, Any]], None],
    recorded: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One sampled trial, engine-neutral: ``report`` gets every epoch's validation metrics
    (``final`` 0) and returns nothing; the return value is the final result, ``final`` 1
    with its ``status`` ("ok", "failed" with a one-line ``error``, or a replayed
    "stopped").

    ``recorded`` is the trial's row where the search already holds one (a resumed engine
    can bring back as unfinished a trial that finished just before the driver died): the
    recorded result is returned instead of training again."""
    if recorded is not None:
        metrics = {k: v for k, v in recorded.items() if is_metric(k) and not is_missing(v)}
        return {**metrics, "final": 1, "status": recorded["status"],
                "error": recorded.get("error") or "", "node": recorded.get("node", "")}  # fmt: skip
    runs = run_configs(config)
    started = time.perf_counter()
    try:
        if len(runs) == 1:
            result = run_trial(
                {**runs[0], "device": device},
                resources,
                report=lambda row: report({**row, "final": 0}),
            )
        else:
            # Several seeds per trial: their mean is the trial's result (no per-epoch reports,
            # so ASHA sees only the final one).
            result = _mean_result([run_trial({**run, "device": device}, resources) for run in runs])
    except Exception as err:  # noqa: BLE001 - every trial error is recorded, the search goes on
        message = " ".join(str(err).split()) or type(err).__name__
        return {"final": 1, "status": "failed", "error": f"{type(err).__name__}: {message}"}
    # Time inside run_trial, so a benchmark can tell trial work from search overhead.
    result["trial_seconds"] = time.perf_counter() - started
    return {**result, "final": 1, "status": "ok", "error": ""}


def _mean_result(results: list[dict[str, Any]]) -> dict[str, Any]:
    merged = dict(results[0])
    for key, value in results[0].items():
        if isinstance(value, float):
            merged[key] = sum(r[key] for r in results) / len(results)
    return merged


def trial_function(
    config: dict[str, Any],
    resources: TrialResources,
    device: str,
    threads: int,
    finished: dict[str, dict[str, Any]] | None = None,
    metrics: tuple[str, ...] = (JOINT_METRIC,),
) -> None:
    """What a Ray worker runs for one trial: `run_sampled_trial` reporting through Ray.
    A failed trial's final report holds ``metrics`` (the searcher's and the scheduler's)
    as NaN, since Ray refuses a result without them."""
    import ray
    from ray import tune

    torch.set_num_threads(threads)
    # Host name alone cannot tell two Ray nodes on one machine apart; the node id can.
    node = f"{socket.gethostname()}/{ray.get_runtime_context().get_node_id()[:12]}"
    recorded = (finished or {}).get(tune.get_context().get_trial_id())
    final = run_sampled_trial(
        config, resources, device, lambda row: tune.report({**row, "node": node}), recorded
    )
    if final["status"] == "failed":
        final = {**dict.fromkeys(metrics, math.nan), **final}
    tune.report({"node": node, **final})
