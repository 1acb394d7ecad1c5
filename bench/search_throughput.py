"""Benchmark: search throughput on a small CRoFT space with the trial settings of
croft_digits (all four target domains, 20 epochs, 16 shots), side by side in one run: the
search with 1 and 2 concurrent trials, the search with populations of K (``--population``),
and a plain Optuna loop calling run_trial in one process (`bench/optuna_loop.py`). For the
per-trial searches, the share of the trials phase's wall time spent outside run_trial (Ray
scheduling, result plumbing, recording).

    python bench/search_throughput.py [--trials 16] [--epochs 20] [--population 8[,64]]
    python bench/search_throughput.py --space croft_digits --trials 32 [--repeats 3]
                                      [--population 8,32]

With ``--space``, a shipped space runs as shipped (its sampler, ASHA, mixed n_ctx): the
per-trial search (``--population 1``, ASHA across trials), the population search (the
default population for this machine, successive halving inside each population), a
population search for each size ``--population`` lists, and the plain Optuna loop, side by
side. With ``--repeats N`` every row runs N times, the rows
taking turns; each row shows its median run and the range, and each ratio is also given
run by run (ASHA's stopping depends on the order trials report in, so a per-trial search of
a space with ASHA varies from run to run).

overhead share = 1 - (sum of time inside run_trial) / (concurrency x wall time of the trials)
training share = (sum of training time) / (concurrency x wall time of the trials), each
population's training counted once (its members' train_seconds are shares of it); "if
only training" divides trials/min by it: the rate with every other cost gone.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import pandas as pd
from optuna_loop import optuna_loop

from croft_search.search.ray_engine import SearchOptions, run_search
from croft_search.search.space import SearchSpace, load_space

SPACE = """description: throughput benchmark
method: croft
dataset: digits
backbone: tiny-digits
pretrained: {pretrained}
target_domains: all
fixed: {{epochs: {epochs}, shots: 16}}
search:
  lambda1: {{uniform: [0, 15]}}
  lambda2: {{loguniform: [0.1, 100]}}
objective: {{joint: 0.5}}
sampler: random
scheduler: none
num_samples: {trials}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--pretrained", default="default")
    parser.add_argument("--population", default=None,
                        help="population sizes, comma-separated (8 without --space)")  # fmt: skip
    parser.add_argument("--space", default=None, help="a shipped space, run as shipped")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of every row, taken in turns; the median is shown")  # fmt: skip
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sizes = [int(size) for size in (args.population or "").split(",") if size]
        if args.space:
            space = load_space(args.space).with_overrides(num_samples=args.trials)
            runs = [("per-trial search (--population 1)", None, 1),
                    ("population search (default population)", None, None)]  # fmt: skip
            runs += [(f"population search (--population {k})", None, k) for k in sizes]
        else:
            space_file = folder / "throughput.yaml"
            space_file.write_text(SPACE.format(**vars(args)))
            space = load_space(str(space_file))
            runs = [(f"{c} concurrent trial(s)", c, 1) for c in (1, 2)]
            runs += [(f"populations of {k}, {c} concurrent", c, k)
                     for k in sizes or [8] for c in (1, 2)]  # fmt: skip
        measured: dict[str, list[dict]] = {}
        for repeat in range(args.repeats):
            # In turns, so that a slower spell of the machine touches every row alike.
            for label, concurrency, population in runs:
                row = search_row(space, folder / f"r{repeat}", label, concurrency, population)
                measured.setdefault(label, []).append(row)
            wall = optuna_loop(space, args.trials)
            measured.setdefault(LOOP, []).append(
                {"run": LOOP, "trials": args.trials, "wall s": round(wall, 1),
                 "trials / min": round(60 * args.trials / wall, 1)})  # fmt: skip
    what = args.space or f"CRoFT, digits, all 4 targets, {args.epochs} epochs, 16 shots"
    print(f"{what}, {args.trials} trials" + (f", median of {args.repeats} runs taken in turns"
                                             if args.repeats > 1 else ""))  # fmt: skip
    rows = [median_row(found) for found in measured.values()]
    table = pd.DataFrame(rows).astype(object).fillna("-")
    print(table.to_string(index=False))
    base = rows[0]
    for row, found in list(zip(rows, measured.values(), strict=True))[1:]:
        each = [f"{r['trials / min'] / b['trials / min']:.2f}x"
                for r, b in zip(found, measured[base["run"]], strict=True)]  # fmt: skip
        runs_each = f" (each run: {', '.join(each)})" if args.repeats > 1 else ""
        ratio = row["trials / min"] / base["trials / min"]
        print(f"{row['run']}: {ratio:.2f}x {base['run']}{runs_each}")


LOOP = "plain Optuna loop, run_trial in one process"


def search_row(space: SearchSpace, folder: Path, label: str, concurrency: int | None,
               population: int | None) -> dict:  # fmt: skip
    """One search of ``space`` and its row of figures."""
    outcome = run_search(
        space,
        SearchOptions(
            storage=folder / "runs",
            name=f"c{concurrency}p{population}",
            max_concurrent=concurrency,
            population=population,
            tracking_uri=f"sqlite:///{folder / 'mlflow.db'}",
            verbose=0,
        ),
    )
    frame = pd.read_parquet(outcome.folder / "trials.parquet")
    wall = outcome.search_seconds
    slots = (concurrency or os.cpu_count() or 1) * wall
    share = "-"
    if "trial_seconds" in frame and frame["trial_seconds"].notna().all():
        share = f"{100 * (1 - frame['trial_seconds'].sum() / slots):.0f}%"
    rate = 60 * len(frame) / wall
    training, only = "-", "-"
    # A trial ASHA stopped (one per Ray trial) has no training time on record.
    if "train_seconds" in frame and frame["train_seconds"].notna().all():
        share_trained = frame["train_seconds"].sum() / slots
        training, only = f"{100 * share_trained:.0f}%", round(rate / share_trained, 1)
    return {"run": label, "trials": len(frame), "wall s": round(wall, 1),
            "trials / min": round(rate, 1), "overhead share": share,
            "training share": training, "if only training": only}  # fmt: skip


def median_row(found: list[dict]) -> dict:
    """The run of median trials/min (the lower middle one of an even count) and the range
    of all of them."""
    ordered = sorted(found, key=lambda row: row["trials / min"])
    row = dict(ordered[(len(ordered) - 1) // 2])
    if len(found) > 1:
        row["range"] = f"{ordered[0]['trials / min']}-{ordered[-1]['trials / min']}"
    return row


if __name__ == "__main__":
    main()
