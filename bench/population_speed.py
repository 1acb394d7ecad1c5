"""The same N configurations trained one at a time with `run_trial` and as populations of
K members (`croft_search.trial.population`), side by side in one process on one thread:
trials/min and the speed-up over one at a time, per method. The members differ in seed,
learning rate, momentum and weight decay (what a population lets differ); every trial
trains on the digits benchmark's sketch split with the shipped model, or with ``--target
all`` on its four leave-one-domain-out splits, where a member's splits train as programs of
up to ``--rows-per-program`` rows (each value a row of figures; 1: each split apart).

    python bench/population_speed.py [--trials 64] [--sizes 1,4,16,64] [--methods ...]
                                     [--target all] [--rows-per-program 1,64]

A method a population cannot train is listed with the reason instead of figures.
"""

from __future__ import annotations

import argparse
import time

import torch

from croft_search.trial.population import ROWS_PER_PROGRAM, population_refusal, run_population
from croft_search.trial.runner import resources_for, run_trial, split_config, target_domains

# Each benchmarked method with what its trials fix (the issue's three first).
CASES = {
    "croft (n_ctx 0)": {"method": "croft", "n_ctx": 0, "epochs": 10},
    "croft (n_ctx 8)": {"method": "croft", "n_ctx": 8, "epochs": 3},
    "coop": {"method": "coop", "n_ctx": 4, "ctx_init": "", "epochs": 3},
    "clip_adapter": {"method": "clip_adapter", "epochs": 10},
    "tip_adapter_f": {"method": "tip_adapter_f", "epochs": 10},
}


def configs(case: dict, count: int, target: str) -> list[dict]:
    return [
        {**case, "target_domain": target, "seed": index, "lr": 0.0005 * (1 + index % 8),
         "momentum": 0.9 if index % 2 else 0.5, "weight_decay": 5e-4 * (index % 3)}
        for index in range(count)
    ]  # fmt: skip


def rate(count: int, seconds: float) -> float:
    return 60 * count / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--sizes", default="1,4,16,64")
    parser.add_argument("--methods", default=",".join(CASES))
    parser.add_argument("--target", default="sketch", help="a digits domain, or all")
    parser.add_argument("--rows-per-program", default=str(ROWS_PER_PROGRAM))
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    layouts = [int(rows) for rows in args.rows_per_program.split(",")]
    torch.set_num_threads(1)
    first = split_config({"method": "zsclip", "target_domain": args.target})[0]
    resources = resources_for(first, target_domains("digits", args.target))
    print(
        f"{args.trials} trials per row, target {args.target}, one thread; "
        "trials/min (speed-up over run_trial)"
    )
    for name in args.methods.split(","):
        batch = configs(CASES[name], args.trials, args.target)
        refusal = population_refusal(batch[0])
        if refusal:
            print(f"{name:16s} not batched: {refusal}")
            continue
        run_trial(batch[0], resources)  # warm-up: first-call costs out of the timing
        started = time.perf_counter()
        for config in batch:
            run_trial(config, resources)
        alone = rate(len(batch), time.perf_counter() - started)
        for rows in layouts:
            cells = [f"run_trial {alone:7.1f}"]
            for size in sizes:
                started = time.perf_counter()
                for start in range(0, len(batch), size):
                    run_population(batch[start : start + size], resources,
                                   rows_per_program=rows)  # fmt: skip
                pooled = rate(len(batch), time.perf_counter() - started)
                cells.append(f"K={size} {pooled:7.1f} ({pooled / alone:4.1f}x)")
            label = f"{name} [{rows} rows]" if len(layouts) > 1 else name
            print(f"{label:16s} " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
