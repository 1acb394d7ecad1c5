"""`python -m croft_search.train`: one trial without Ray. Trains a method from cached features
on one leave-one-domain-out split (or all of them) and prints its validation and test
metrics; `--json` writes them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from croft_search.contract import PROTOCOL_CHOICES, TRIAL_SETTINGS
from croft_search.errors import ConfigError, OneLineArgumentParser, exit_on_user_error
from croft_search.search.space import read_cli_value
from croft_search.trial.runner import run_trial
from trainables.registry import hparam_specs, method_names

SHOWN = (
    "val_acc",
    "val_auroc",
    "val_fpr95",
    "test_acc",
    "test_auroc",
    "test_fpr95",
    "test_aupr_in",
    "test_aupr_out",
    "objective",
    "train_seconds",
)


def parse_assignments(items: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are read as the space files read YAML (1e-3, true, 16,
    "text"; `croft_search.search.space.read_cli_value`)."""
    values: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        values[key.strip()] = read_cli_value(raw) if raw.strip() else ""
    return values


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(prog="python -m croft_search.train", description=__doc__)
    parser.add_argument("--method", required=True, help=f"one of: {', '.join(method_names())}")
    parser.add_argument("--dataset", default=TRIAL_SETTINGS["dataset"])
    parser.add_argument("--target-domain", default="all", help="a domain, or 'all'")
    parser.add_argument("--backbone", default=TRIAL_SETTINGS["backbone"])
    parser.add_argument("--pretrained", default=TRIAL_SETTINGS["pretrained"])
    parser.add_argument("--views", type=int, default=TRIAL_SETTINGS["views"])
    parser.add_argument(
        "--crop-scale",
        type=float,
        default=TRIAL_SETTINGS["crop_scale"],
        help="smallest area fraction of an augmented view's crop (the reference: 0.08)",
    )
    parser.add_argument("--score", default=None, help="OOD score (default: the method's)")
    parser.add_argument("--selection", default="val", choices=("val", "oracle"))
    parser.add_argument(
        "--objective-weight", type=float, default=TRIAL_SETTINGS["objective_weight"]
    )
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--device", default="cpu")
    for key, allowed in PROTOCOL_CHOICES.items():
        flag = "--" + key.replace("_", "-")
        parser.add_argument(flag, default=TRIAL_SETTINGS[key], choices=allowed)
    parser.add_argument(
        "--val-shots", type=int, default=0, help="validation images per class; 0 = all"
    )
    parser.add_argument(
        "--test-open-sets", default=None, help="comma-separated open sets (default: dataset's)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="hyper-parameter override, repeatable",
    )
    parser.add_argument("--list-hparams", action="store_true", help="print them and exit")
    parser.add_argument("--json", default=None, help="write the metrics to this JSON file")
    return parser


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_hparams:
        for key, spec in hparam_specs(args.method).items():
            print(f"{key:<18} default {spec.default!r:<12} {spec.help}")
        return 0
    config = {
        "method": args.method,
        "dataset": args.dataset,
        "target_domain": args.target_domain,
        "backbone": args.backbone,
        "pretrained": args.pretrained,
        "views": args.views,
        "crop_scale": args.crop_scale,
        "score": args.score,
        "selection": args.selection,
        "objective_weight": args.objective_weight,
        "data_root": args.data_root,
        "cache_dir": args.cache_dir,
        "device": args.device,
        **{key: getattr(args, key) for key in PROTOCOL_CHOICES},
        "val_shots": args.val_shots,
        "test_open_sets": args.test_open_sets,
    }
    overrides = parse_assignments(args.set)
    clash = sorted(set(overrides) & set(config))
    if clash:
        raise ConfigError(f"set {', '.join(clash)} with its own flag, not --set")
    result = run_trial(config | overrides)
    print(
        f"{args.method} on {args.dataset}, target {result['target_domains']}, "
        f"selection {result['selection']}, score {result['score']}"
    )
    for key in SHOWN:
        print(f"  {key:<14} {result[key]:.4f}")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    main()
