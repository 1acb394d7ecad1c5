"""How fast the driver records finished trials: N synthetic trials (a CRoFT config, the
metrics run_trial reports over four target domains) fed to a `Recorder` on a fresh search
folder with a SQLite MLflow store, as the search's driver feeds them: trials one at a
time with 20 epochs of curves each (``--population 1``), and members of populations of K
that finish together, without curves, as a population search records them. Prints
trials/s for the whole recording (parquet, Optuna mirror, MLflow) of each, the target
being at least 20 a second, and how fast the engine's thread (which starts the next
trial) gets its events back, the study's and MLflow's writes running on their own thread.
For populations also how fast the members' finishing writes go once the writes of their
start are done (as when a population has trained meanwhile): what a search's end waits
for after its last populations.

    python bench/recording_speed.py [--trials 200] [--population 32]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from croft_search.search.folder import create_folder
from croft_search.search.recorder import Recorder
from croft_search.search.space import load_space

DOMAINS = ("photo", "sketch", "cartoon", "painting")
METRICS = ("val_acc", "val_auroc", "val_fpr95", "test_acc", "test_auroc", "test_fpr95",
           "test_aupr_in", "test_aupr_out")  # fmt: skip


def synthetic_result(rng: random.Random) -> dict[str, float]:
    result = {name: rng.random() for name in METRICS}
    for domain in DOMAINS:
        result |= {f"{domain}/{name}": rng.random() for name in METRICS}
    return result | {"objective": rng.random(), "train_seconds": 1.0, "epochs_run": 20.0}


def record(trials: int, folder: Path, epochs: int = 20, population: int = 1
           ) -> tuple[float, float, float | None]:  # fmt: skip
    """Trials/s recorded (every write done), trials/s the events returned at, and for
    populations the members/s of their finishing writes alone."""
    space = load_space("croft_digits").with_overrides(num_samples=trials)
    create_folder(folder, "bench", space, f"sqlite:///{folder.parent / 'mlflow.db'}", "val", {})
    recorder = Recorder(folder, space, echo=False)
    rng = random.Random(0)
    configs = [
        {"method": "croft", "lambda1": rng.uniform(0, 15), "lambda2": rng.uniform(0.1, 100),
         "n_ctx": rng.choice([0, 4, 8]), "lr": 1e-3, "seed": 0, "selection": "val"}
        for _ in range(trials)
    ]  # fmt: skip
    started = time.perf_counter()
    finishing = None
    if population > 1:
        returned, finishing = _record_populations(recorder, configs, population, rng)
    else:
        _record_one_at_a_time(recorder, configs, epochs, rng)
        returned = time.perf_counter() - started
    recorder.close({"trials": trials})
    total = time.perf_counter() - started
    return trials / total, trials / returned, finishing and trials / finishing


def _record_populations(recorder: Recorder, configs: list[dict], population: int,
                        rng: random.Random) -> tuple[float, float]:  # fmt: skip
    """Members that finish together, without curves, as a population search records them.
    Returns the seconds the events took to return and the seconds the finishing writes
    took, each population's start written first (a population trains between the two)."""
    returned = finishing = 0.0
    for first in range(0, len(configs), population):
        name = f"p{first:05d}"
        members = range(first, min(first + population, len(configs)))
        started = time.perf_counter()
        for index in members:
            recorder.trial_started(f"{name}_{index - first}", configs[index])
        returned += time.perf_counter() - started
        recorder.wait()
        finished = time.perf_counter()
        with recorder.together():
            for index in members:
                result = synthetic_result(rng)
                recorder.trial_finished(f"{name}_{index - first}", configs[index], result,
                                        node="bench", population=name)  # fmt: skip
        returned += time.perf_counter() - finished
        recorder.wait()
        finishing += time.perf_counter() - finished
    return returned, finishing


def _record_one_at_a_time(recorder: Recorder, configs: list[dict], epochs: int,
                          rng: random.Random) -> None:  # fmt: skip
    """Trials one at a time, each with ``epochs`` epochs of curves."""
    for index, config in enumerate(configs):
        trial_id = f"t{index:05d}"
        recorder.trial_started(trial_id, config)
        for epoch in range(epochs):
            row = {"epoch": epoch, "objective": rng.random(), "val_acc": rng.random(), "lr": 1e-3}
            recorder.trial_epoch(trial_id, config, row)
        recorder.trial_finished(trial_id, config, synthetic_result(rng), node="bench")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--population", type=int, default=32)
    args = parser.parse_args()
    for population in (1, args.population):
        with tempfile.TemporaryDirectory() as tmp:
            rate, returned, finishing = record(args.trials, Path(tmp) / "search",
                                               population=population)  # fmt: skip
        what = ("trials one at a time, 20 epochs of curves each" if population == 1
                else f"members of populations of {population}")  # fmt: skip
        print(
            f"recorded {args.trials} {what}: {rate:.1f} trials/s (target: at least 20); "
            f"the engine's thread got its events back at {returned:.1f} trials/s"
            + (f"; their finishing writes alone: {finishing:.1f} members/s" if finishing else "")
        )


if __name__ == "__main__":
    main()
