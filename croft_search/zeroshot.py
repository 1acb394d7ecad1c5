"""`python -m croft_search.zeroshot`: zero-shot CLIP quality of a backbone on every domain of a
domain-split dataset: top-1 accuracy on the ID classes with the dataset's hand-written
template, and MCM AUROC/FPR95 of the domain's ID images against the test open-set images."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from croft_search.backbones import load_backbone
from croft_search.config import data_root
from croft_search.contract import EMBEDDED_BACKBONE, EMBEDDED_DATASET
from croft_search.data import get_dataset_spec, load_domain_split
from croft_search.errors import ConfigError, OneLineArgumentParser, exit_on_user_error
from croft_search.features import FeatureCache
from croft_search.metrics import accuracy, ood_metrics
from croft_search.prompts import class_prompts, zero_shot_logits
from croft_search.scores import get_score


def zero_shot_report(
    cache: FeatureCache, dataset: str, template: str | None = None
) -> dict[str, dict[str, dict[str, float]]]:
    """{"domains": {domain: {"acc", "auroc", "fpr95", "n_id", "n_ood"}}, "mean": {...}}.

    ID images of a domain are every image of its split file's test list; OOD images are the
    dataset's test open sets, restricted to that domain where the open set records domains."""
    spec = get_dataset_spec(dataset)
    template = template or spec.prompt_template
    logit_scale = cache.backbone.logit_scale
    mcm = get_score("mcm", logit_scale=logit_scale)
    report: dict[str, dict[str, float]] = {}
    for domain in spec.target_domains:
        split = load_domain_split(spec.name, cache.data_root, domain)
        text = cache.text_features(class_prompts(template, split.classnames))
        id_logits = zero_shot_logits(cache.features_of(spec.name, split.test), text, logit_scale)
        ood = cache.open_set_features(spec.test_open_sets, "test", domains=(domain,))
        ood_logits = zero_shot_logits(ood, text, logit_scale)
        labels = torch.as_tensor([s.label for s in split.test])
        detection = ood_metrics(mcm(id_logits), mcm(ood_logits))
        report[domain] = {
            "acc": accuracy(id_logits, labels),
            "auroc": detection["auroc"],
            "fpr95": detection["fpr95"],
            "n_id": len(split.test),
            "n_ood": len(ood),
        }
    mean = {
        key: sum(r[key] for r in report.values()) / len(report) for key in ("acc", "auroc", "fpr95")
    }
    return {"domains": report, "mean": mean}


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(prog="python -m croft_search.zeroshot", description=__doc__)
    parser.add_argument("--dataset", default=EMBEDDED_DATASET)
    parser.add_argument("--backbone", default=EMBEDDED_BACKBONE)
    parser.add_argument("--pretrained", default="default", help="tag or local checkpoint path")
    parser.add_argument("--template", default=None, help="prompt template with {} for the class")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return parser


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    spec = get_dataset_spec(args.dataset)
    if spec.kind != "domain_split":
        raise ConfigError(f"{spec.name} is an open-set dataset; pass a domain-split dataset")
    backbone = load_backbone(args.backbone, args.pretrained, device=args.device)
    cache = FeatureCache(backbone, data_root(args.data_root), cache_dir=args.cache_dir)
    report = zero_shot_report(cache, spec.name, args.template)
    print(f"zero-shot {backbone.identity} on {spec.name} (MCM score, test open sets as OOD)")
    print(f"{'domain':<16}{'acc':>8}{'AUROC':>8}{'FPR95':>8}{'#ID':>7}{'#OOD':>7}")
    for domain, row in report["domains"].items():
        print(
            f"{domain:<16}{row['acc']:>8.3f}{row['auroc']:>8.3f}{row['fpr95']:>8.3f}"
            f"{row['n_id']:>7}{row['n_ood']:>7}"
        )
    mean = report["mean"]
    print(f"{'mean':<16}{mean['acc']:>8.3f}{mean['auroc']:>8.3f}{mean['fpr95']:>8.3f}")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    main()
