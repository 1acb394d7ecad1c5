"""One sampled trial as any engine runs it: the run_trial configs of a sampled config
(seeds averaged where a trial holds several), its per-epoch reports, and its final result
with a status, a trial's own error being a failed result rather than an exception. The Ray
engine's trainables wrap it; a resumed engine replays a recorded row through it."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from croft_search.contract import is_metric
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
