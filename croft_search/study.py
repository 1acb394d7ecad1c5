"""The search's Optuna study on disk (`optuna.db`), for optuna-dashboard and later analysis.

Ray Tune's OptunaSearch keeps its own study in memory and checkpoints it with the rest of the
experiment state, so a driver killed with SIGKILL resumes from one consistent snapshot. This
mirror is written from the driver as trials finish and is keyed by Ray's trial id, so a
resumed search never adds a trial twice."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna

from croft_search.config import OPTUNA_FILE
from croft_search.spaces import SearchSpace

TRIAL_ATTR = "ray_trial_id"


class StudyMirror:
    def __init__(self, folder: Path, name: str, space: SearchSpace) -> None:
        self.space = space
        self.metrics = space.metric_names()
        directions = ["maximize" if m == "max" else "minimize" for m in space.modes()]
        self.study = optuna.create_study(
            storage=f"sqlite:///{Path(folder) / OPTUNA_FILE}",
            study_name=name,
            directions=directions,
            load_if_exists=True,
        )
        self.known = {t.user_attrs.get(TRIAL_ATTR) for t in self.study.get_trials(deepcopy=False)}

    def add(self, trial_id: str, config: Mapping[str, Any], metrics: Mapping[str, Any],
            status: str) -> None:  # fmt: skip
        """Record one finished trial: its sampled parameters (with their distributions,
        replayed through the space) and its objective value(s)."""
        if trial_id in self.known:
            return
        replay = optuna.trial.FixedTrial(dict(config))
        try:
            self.space.suggest(replay)
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
