"""Benchmark: search throughput with 1 and 2 concurrent trials on a small CRoFT space with the
trial settings of croft_digits (all four target domains, 20 epochs, 16 shots),
and the share of the trials phase's wall time spent outside run_trial (Ray scheduling,
result plumbing, MLflow and trials.parquet logging), measured side by side in one run.

    python bench/search_throughput.py [--trials 16] [--epochs 20] [--pretrained default]

overhead share = 1 - (sum of time inside run_trial) / (concurrency x wall time of the trials)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pandas as pd

from croft_search.search.ray_engine import SearchOptions, run_search
from croft_search.search.space import load_space

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
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        space_file = folder / "throughput.yaml"
        space_file.write_text(SPACE.format(**vars(args)))
        space = load_space(str(space_file))
        rows = []
        for concurrency in (1, 2):
            outcome = run_search(
                space,
                SearchOptions(
                    storage=folder / "runs",
                    name=f"c{concurrency}",
                    max_concurrent=concurrency,
                    tracking_uri=f"sqlite:///{folder / 'mlflow.db'}",
                    verbose=0,
                ),
            )
            frame = pd.read_parquet(outcome.folder / "trials.parquet")
            inside = frame["trial_seconds"].sum()
            wall = outcome.search_seconds
            rows.append(
                {
                    "concurrent trials": concurrency,
                    "trials": len(frame),
                    "wall s": round(wall, 1),
                    "trials / min": round(60 * len(frame) / wall, 1),
                    "mean s in run_trial": round(frame["trial_seconds"].mean(), 2),
                    "overhead share": f"{100 * (1 - inside / (concurrency * wall)):.0f}%",
                }
            )
    table = pd.DataFrame(rows)
    print(f"CRoFT, digits, all 4 targets, {args.epochs} epochs, 16 shots, {args.trials} trials")
    print(table.to_string(index=False))
    print(f"speed-up with 2 concurrent trials: {rows[0]['wall s'] / rows[1]['wall s']:.2f}x")


if __name__ == "__main__":
    main()
