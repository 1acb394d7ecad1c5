"""`python -m croft_search.run`: run (or resume) a hyper-parameter or ablation search.

Without --space it runs the embedded default space (CRoFT on the digits benchmark with the
tiny CLIP); --space takes a shipped space name or a path to a YAML file."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from croft_search.contract import DEFAULT_SPACE, TRIALS_FILE, config_key
from croft_search.errors import OneLineArgumentParser, exit_on_user_error
from croft_search.search.ray_engine import SearchOptions, run_search
from croft_search.search.space import load_space, space_names
from croft_search.train import parse_assignments

# Config keys every trial of a search shares: not repeated for the best trial.
SHARED_BY_EVERY_TRIAL = ("dataset", "backbone", "pretrained", "selection")


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(prog="python -m croft_search.run", description=__doc__)
    parser.add_argument(
        "--space",
        default=DEFAULT_SPACE,
        help=f"space name ({', '.join(space_names())}) or YAML path",
    )
    parser.add_argument("--num-samples", type=int, default=None)
    parser.add_argument("--max-concurrent", type=int, default=None)
    parser.add_argument(
        "--population",
        type=int,
        default=None,
        help="configurations one Ray trial trains at once as one vectorised program, "
        "halved at the space's ASHA rungs; 1: a Ray trial each (default: chosen for the "
        "hardware, 1 where the space's trials cannot batch)",
    )
    parser.add_argument(
        "--gpus-per-trial",
        type=float,
        default=None,
        help="fractional GPUs per trial (default 0.25 with CUDA, else 0)",
    )
    parser.add_argument("--cpus-per-trial", type=float, default=1.0)
    parser.add_argument("--address", default=None, help="join an existing Ray cluster")
    parser.add_argument("--storage", default="runs", help="results root (default ./runs)")
    parser.add_argument("--name", default=None, help="search name (default: a timestamp)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted search")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI")
    parser.add_argument(
        "--selection",
        default=None,
        choices=("val", "oracle"),
        help="model selection every trial records (default: the space's, else val)",
    )
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--seed", type=int, default=0, help="sampler seed")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fix a value of the space, repeatable",
    )
    return parser


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    args = build_parser().parse_args(argv)
    space = load_space(args.space)
    options = SearchOptions(
        storage=Path(args.storage),
        name=args.name,
        resume=args.resume,
        num_samples=args.num_samples,
        max_concurrent=args.max_concurrent,
        gpus_per_trial=args.gpus_per_trial,
        cpus_per_trial=args.cpus_per_trial,
        address=args.address,
        tracking_uri=args.tracking_uri,
        selection=args.selection,
        data_root=args.data_root,
        cache_dir=args.cache_dir,
        seed=args.seed,
        population=args.population,
        overrides=parse_assignments(args.set),
    )
    outcome = run_search(space, options)
    print(f"\n{outcome.trials} trials finished ({outcome.failed} failed) in {outcome.folder}")
    if outcome.population > 1:
        print(f"trained in populations of up to {outcome.population} (--population)")
    if not args.resume and outcome.search_seconds > 0:
        # A resumed search's table also holds the trials of the runs before it.
        print(
            f"time: {outcome.search_seconds:.0f} s of trials "
            f"({60 * outcome.trials / outcome.search_seconds:.1f} trials/min), "
            f"{time.perf_counter() - started:.0f} s in all (start-up, features, Ray)"
        )
    label = "best trial by validation" if len(outcome.best) <= 1 else "validation Pareto set"
    print(f"{label}:")
    for row in outcome.best:
        config = {
            config_key(k): v
            for k, v in row.items()
            if config_key(k) not in (None, *SHARED_BY_EVERY_TRIAL)
        }
        val = ", ".join(f"{k} {row[k]:.3f}" for k in ("val_acc", "val_auroc") if k in row)
        test = ", ".join(
            f"{k} {row[k]:.3f}"
            for k in ("test_acc", "test_auroc", "test_fpr95")
            if row.get(k) is not None
        )
        print(f"  {row.get('method')} {config}\n    validation: {val}\n    test: {test}")
    print(f"results: {outcome.folder / TRIALS_FILE}")
    print(
        f"MLflow: {outcome.tracking_uri} (parent run {outcome.parent_run_id}); "
        "browse with `mlflow ui` in this folder"
    )
    print(f"report: python analysis/pareto.py {outcome.folder}")
    return 0


if __name__ == "__main__":
    main()
