"""Every method with its default hyper-parameters on every leave-one-domain-out split of a
dataset, over several seeds: target-domain accuracy, AUROC and FPR95 (mean and std over
seeds of the mean over target domains) and seconds per trial (one target domain). CRoFT has
a row per implementation (paper: its equations; reference: what the authors' code computes).

    python bench/methods_table.py [--seeds 0 1 2] [--methods croft coop ...]
        [--croft-implementations paper reference] [--recipe ours|reference] [--markdown PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from croft_search.contract import RECIPES
from croft_search.data import get_dataset_spec
from croft_search.errors import CroftError
from croft_search.trial.runner import TrialResources, run_trial
from trainables.croft_variants import IMPLEMENTATIONS
from trainables.registry import method_names


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.1f} ± {100 * spread:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--pretrained", default="default")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument(
        "--croft-implementations", nargs="+", default=["paper", "reference"],
        choices=IMPLEMENTATIONS, help="one CRoFT row for each",
    )  # fmt: skip
    parser.add_argument(
        "--recipe", default="ours", choices=RECIPES,
        help="every method's defaults (ours) or the CRoFT code base's (reference)",
    )  # fmt: skip
    parser.add_argument("--markdown", default=None, help="also write the table here")
    args = parser.parse_args()

    methods = args.methods or [m for m in method_names() if not m.startswith("_")]
    domains = list(get_dataset_spec(args.dataset).domains)
    resources = TrialResources.load(args.dataset, domains, pretrained=args.pretrained)
    header = (
        "| method | target acc | AUROC | FPR95 | val objective | s / trial |\n"
        "|---|---|---|---|---|---|"
    )
    lines = [header]
    print(
        f"{args.dataset}, targets {', '.join(domains)}, seeds {args.seeds}, recipe "
        f"{args.recipe}, backbone {resources.backbone.identity}; mean ± std over seeds, in %"
    )
    print(header)
    rows: list[tuple[str, dict]] = []
    for method in methods:
        if method == "croft":
            rows += [
                (f"croft ({implementation})", {"method": method, "implementation": implementation})
                for implementation in args.croft_implementations
            ]
        else:
            rows.append((method, {"method": method}))
    for label, chosen in rows:
        results = []
        started = time.perf_counter()
        for seed in args.seeds:
            config = {
                **chosen,
                "dataset": args.dataset,
                "target_domain": domains,
                "seed": seed,
                "recipe": args.recipe,
            }
            try:
                results.append(run_trial(config, resources))
            except CroftError as err:  # a recipe the backbone cannot hold (16 tokens)
                lines.append(f"| {label} | {' '.join(str(err).split())} |")
                print(lines[-1], flush=True)
                break
        if len(results) < len(args.seeds):
            continue
        per_trial = (time.perf_counter() - started) / (len(args.seeds) * len(domains))
        line = (
            f"| {label} | {mean_std([r['test_acc'] for r in results])} "
            f"| {mean_std([r['test_auroc'] for r in results])} "
            f"| {mean_std([r['test_fpr95'] for r in results])} "
            f"| {mean_std([r['objective'] for r in results])} | {per_trial:.1f} |"
        )
        lines.append(line)
        print(line, flush=True)
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
