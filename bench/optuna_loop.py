"""What a user would script instead of croft-search: a plain Optuna ask-and-tell loop
calling `run_trial` in one process, on one space, with the space's own sampler.

    python bench/optuna_loop.py --space croft_digits [--trials 16]

Prints trials/min; `bench/search_throughput.py` runs it beside the searches.
"""

from __future__ import annotations

import argparse
import time

import optuna
import torch

from croft_search.search.optuna_bridge import make_sampler, run_configs, study_directions, suggest
from croft_search.search.space import SearchSpace, load_space
from croft_search.trial.runner import load_resources, run_trial


def optuna_loop(space: SearchSpace, trials: int, seed: int = 0, threads: int = 1) -> float:
    """Run ``trials`` trials of ``space`` one after another on ``threads`` torch threads (a
    search's trial gets one per CPU it asks for); returns the seconds taken (features
    loaded before the clock starts, as a search loads them before its trials)."""
    torch.set_num_threads(threads)
    resources = load_resources(space.feature_settings(), space.target_domain_list())
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=study_directions(space),
                                sampler=make_sampler(space, seed))  # fmt: skip
    names = space.metric_names()
    started = time.perf_counter()
    for _ in range(trials):
        trial = study.ask()
        results = [run_trial(run, resources) for run in run_configs(suggest(space, trial))]
        values = [sum(r[name] for r in results) / len(results) for name in names]
        study.tell(trial, values if len(values) > 1 else values[0])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", default="croft_digits")
    parser.add_argument("--trials", type=int, default=16)
    args = parser.parse_args()
    space = load_space(args.space).with_overrides(num_samples=args.trials)
    seconds = optuna_loop(space, args.trials)
    print(f"{args.trials} trials in {seconds:.1f} s: {60 * args.trials / seconds:.1f} trials/min")


if __name__ == "__main__":
    main()
