"""The trial contract: every trial setting (what a trial runs under, as opposed to a
method's hyper-parameters), its default and the values a protocol setting takes. A config
for `run_trial` is these keys plus the method's hyper-parameters; `RESERVED_KEYS` are names
no method may give a hyper-parameter."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from croft_search.backbones import DEFAULT_CROP_SCALE
from croft_search.config import EMBEDDED_BACKBONE, EMBEDDED_DATASET
from croft_search.data import SHOTS_PER, get_dataset_spec
from croft_search.errors import ConfigError
from croft_search.metrics import DEFAULT_OBJECTIVE_WEIGHT
from trainables.base import RECIPES

# ours: every ID test image against the test split of the open set, our metric conventions;
# reference: the CRoFT reference's sampling and conventions (docs/croft_reference.md);
# openood: our sampling, OpenOOD v1.5's conventions.
EVAL_PROTOCOLS = ("ours", "reference", "openood")

# Trial settings that are not hyper-parameters of the method, with their defaults.
TRIAL_SETTINGS: dict[str, Any] = {
    "method": None,
    "dataset": EMBEDDED_DATASET,
    "target_domain": "all",
    "backbone": EMBEDDED_BACKBONE,
    "pretrained": "default",
    "views": 8,
    "view_seed": 0,
    "crop_scale": DEFAULT_CROP_SCALE,
    "score": None,
    "selection": "val",
    "objective_weight": DEFAULT_OBJECTIVE_WEIGHT,
    "device": "cpu",
    "data_root": None,
    "cache_dir": None,
    # The protocol, as the CRoFT reference runs it or as we do (docs/croft_reference.md).
    "shots_per": "class_and_domain",
    "val_shots": 0,
    "checkpoint": "last",
    "eval_protocol": "ours",
    "test_open_sets": None,
    "recipe": "ours",
}
# The values each protocol setting takes.
PROTOCOL_CHOICES: dict[str, tuple[str, ...]] = {
    "shots_per": SHOTS_PER,
    "checkpoint": ("last", "best_val"),
    "eval_protocol": EVAL_PROTOCOLS,
    "recipe": RECIPES,
}
# Config keys a search space gives meaning to beside the trial settings (its ablation arm,
# its seeds); a method hyper-parameter of any of these names would be routed away from it.
SPACE_KEYS = ("variant", "seeds")
RESERVED_KEYS = (*TRIAL_SETTINGS, *SPACE_KEYS)


def open_set_names(settings: Mapping[str, Any]) -> list[str]:
    """The ``test_open_sets`` setting as names (a list, or one comma-separated string);
    empty for the dataset's own."""
    value = settings.get("test_open_sets")
    if value is None or value == "":
        return []
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [str(name).strip() for name in names if str(name).strip()]
    for name in names:
        spec = get_dataset_spec(name)
        if spec.kind != "open_set":
            raise ConfigError(f"test_open_sets: {name} is not an open-set dataset")
    return names
