"""The trial contract, declared once for every layer:

- the **trial settings** (what a trial runs under, as opposed to a method's
  hyper-parameters): name, type, default, meaning, where a search space sets it, and the one
  check every reader of a config applies (`check_setting`);
- the **metric schema**: which result keys are metrics, their split (val/test), direction
  and the objective that reads them (`METRICS`, `metric_direction`, `is_metric`);
- the **results files** of a search folder and the fixed columns of trials.parquet;
- the **defaults**: embedded dataset and backbone, default space, objective weight.

It imports nothing of the project but its errors (the two checks that need a registry look
it up when called), so every other module, from the data loaders up, may import it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from croft_search.errors import ConfigError

# ----------------------------------------------------------------------------- defaults
EMBEDDED_DATASET = "digits"
EMBEDDED_BACKBONE = "tiny-digits"
# What `python -m croft_search.run` searches without --space: the embedded default.
DEFAULT_SPACE = "croft_digits"
# The accuracy weight w of the joint objective w * acc + (1 - w) * auroc.
DEFAULT_OBJECTIVE_WEIGHT = 0.5
# The smallest area fraction of an augmented training crop (the reference's: 0.08).
DEFAULT_CROP_SCALE = 0.5
REFERENCE_CROP_SCALE = 0.08

# ----------------------------------------------------------------------------- protocol values
# Whose k shots: k per class and source domain (ours), k per class over the pooled source
# domains (Dassl's generate_fewshot_dataset), or Dassl's PACS sampler (docs/croft_reference.md).
SHOTS_PER = ("class_and_domain", "class", "dassl_balance")
CHECKPOINTS = ("last", "best_val")
# ours: every ID test image against the test split of the open set, our metric conventions;
# reference: the CRoFT reference's sampling and conventions (docs/croft_reference.md);
# openood: our sampling, OpenOOD v1.5's conventions.
EVAL_PROTOCOLS = ("ours", "reference", "openood")
# ours: each method's own defaults; reference: the CRoFT code base's configs and scripts.
RECIPES = ("ours", "reference")
SELECTION_MODES = ("val", "oracle")


# ----------------------------------------------------------------------------- trial settings
@dataclass(frozen=True)
class Setting:
    """One trial setting. ``kind`` names its check (see `check_setting`); ``scope`` says
    where a search space sets it: ``shared`` (one value for the whole search, in the
    top-level fixed block: one feature cache serves every trial), ``per_method`` (a fixed
    block of any method, or searched), or ``own_key`` (the space's top-level key
    ``space_key``)."""

    name: str
    kind: str
    default: Any
    meaning: str
    scope: str = "shared"
    choices: tuple[str, ...] = ()
    space_key: str = ""


SETTINGS: dict[str, Setting] = {s.name: s for s in (
    Setting("method", "name", None, "the method to train", "own_key", space_key="method"),
    Setting("dataset", "name", EMBEDDED_DATASET, "the domain-split dataset", "own_key",
            space_key="dataset"),
    Setting("target_domain", "domains", "all", "held-out domain(s): one, a list, or all",
            "own_key", space_key="target_domains"),
    Setting("backbone", "name", EMBEDDED_BACKBONE, "open_clip model name", "own_key",
            space_key="backbone"),
    Setting("pretrained", "name", "default", "open_clip tag or checkpoint path", "own_key",
            space_key="pretrained"),
    Setting("views", "count", 8, "augmented views per training image"),
    Setting("view_seed", "count", 0, "seed of the augmented views"),
    Setting("crop_scale", "fraction", DEFAULT_CROP_SCALE,
            "smallest area fraction of an augmented view's crop"),
    Setting("score", "score", None, "OOD score (null: the method's or recipe's default)",
            "per_method"),
    Setting("selection", "choice", "val", "val, or oracle (test metrics, flagged)",
            choices=SELECTION_MODES),
    Setting("objective_weight", "weight", DEFAULT_OBJECTIVE_WEIGHT,
            "accuracy weight of the joint objective", "own_key",
            space_key="objective: {joint: W}"),
    Setting("device", "name", "cpu", "torch device of the trial"),
    Setting("data_root", "name", None, "dataset root (default: $CROFT_DATA)"),
    Setting("cache_dir", "name", None, "feature cache folder"),
    Setting("shots_per", "choice", "class_and_domain", "whose k shots", choices=SHOTS_PER),
    Setting("val_shots", "count", 0, "validation images per class (0: the whole split)"),
    Setting("checkpoint", "choice", "last", "last epoch, or best validation accuracy",
            choices=CHECKPOINTS),
    Setting("eval_protocol", "choice", "ours", "how OOD metrics are sampled and computed",
            choices=EVAL_PROTOCOLS),
    Setting("test_open_sets", "open_sets", None,
            "open sets tested against (names; null: the dataset's own)"),
    Setting("recipe", "choice", "ours", "each method's defaults, or the reference's",
            choices=RECIPES),
)}  # fmt: skip
# The settings with their defaults (a config for run_trial is these plus hyper-parameters).
TRIAL_SETTINGS: dict[str, Any] = {name: s.default for name, s in SETTINGS.items()}
# The values each protocol setting takes.
PROTOCOL_CHOICES: dict[str, tuple[str, ...]] = {
    name: SETTINGS[name].choices for name in ("shots_per", "checkpoint", "eval_protocol", "recipe")
}
# Config keys a search space gives meaning to beside the trial settings (its ablation arm,
# its seeds); a method hyper-parameter of any of these names would be routed away from it.
SPACE_KEYS = ("variant", "seeds")
RESERVED_KEYS = (*TRIAL_SETTINGS, *SPACE_KEYS)


def check_setting(name: str, value: Any) -> Any:
    """``value`` checked as trial setting ``name``; a `ConfigError` naming the setting and
    what it accepts otherwise. The search space's parser and the trial runner both call it,
    so a value a space accepts is one a trial accepts."""
    setting = SETTINGS[name]
    kind = setting.kind
    if kind == "count":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
    elif kind == "choice":
        if value not in setting.choices:
            raise ConfigError(
                f"{name}={value!r} is not allowed; expected one of {', '.join(setting.choices)}"
            )
    elif kind == "fraction":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ConfigError(
                f"{name} must be a number in (0, 1] (the smallest crop's area fraction; "
                f"the reference uses {REFERENCE_CROP_SCALE}), got {value!r}"
            )
        return float(value)
    elif kind == "weight":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ConfigError(f"{name} must be a number in [0, 1], got {value!r}")
    elif kind == "score":
        from croft_search.scores import score_names  # the score registry, at call time

        if value is not None and value not in score_names():
            raise ConfigError(
                f"unknown OOD score {value!r}; known scores: {', '.join(score_names())} "
                "(null = the method's default)"
            )
    elif kind == "open_sets":
        open_set_names({name: value})
    elif kind == "name":
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        if name == "dataset" and value is not None and value.lower().endswith((".yaml", ".yml")):
            # A dataset file: absolute, so a trial running elsewhere (a Ray worker's own
            # working folder) reads the same file.
            return os.path.abspath(os.path.expanduser(value))
    return value


def open_set_names(settings: Mapping[str, Any]) -> list[str]:
    """The ``test_open_sets`` setting as names (a list, or one comma-separated string),
    each an open-set dataset; empty for the dataset's own."""
    value = settings.get("test_open_sets")
    if value is None or value == "":
        return []
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [str(name).strip() for name in names if str(name).strip()]
    from croft_search.data import get_dataset_spec  # the dataset registry, at call time

    for name in names:
        if not get_dataset_spec(name).is_open_set:
            raise ConfigError(f"test_open_sets: {name} is not an open-set dataset")
    return names


# ----------------------------------------------------------------------------- metric schema
VAL_PREFIX, TEST_PREFIX = "val_", "test_"
# A config value's column in trials.parquet and the analysis frames.
CONFIG_PREFIX = "config/"
# A per-target-domain metric is "<domain>/<metric>".
DOMAIN_SEPARATOR = "/"
JOINT_METRIC = "objective"
# Result keys that are figures of a trial (recorded, averaged over seeds) but no metric of
# its quality, and the string-valued labels a result carries.
TIMING_KEYS = ("train_seconds", "trial_seconds", "epochs_run")
LABEL_KEYS = ("selection", "score", "protocol")


@dataclass(frozen=True)
class MetricSpec:
    name: str
    split: str  # "val" or "test"
    maximize: bool
    objectives: tuple[str, ...] = ()  # the objectives that read it: "joint", "pareto"


METRICS: dict[str, MetricSpec] = {m.name: m for m in (
    MetricSpec("val_acc", "val", True, ("joint", "pareto")),
    MetricSpec("val_auroc", "val", True, ("joint", "pareto")),
    MetricSpec("val_fpr95", "val", False, ("pareto",)),
    MetricSpec("test_acc", "test", True, ("oracle", "pareto")),
    MetricSpec("test_auroc", "test", True, ("oracle", "pareto")),
    MetricSpec("test_fpr95", "test", False, ("pareto",)),
    MetricSpec("test_aupr_in", "test", True, ("pareto",)),
    MetricSpec("test_aupr_out", "test", True, ("pareto",)),
)}  # fmt: skip


def pareto_metrics(split: str) -> dict[str, str]:
    """The metrics of ``split`` a pareto objective may name, each with its mode."""
    return {
        name: "max" if spec.maximize else "min"
        for name, spec in METRICS.items()
        if spec.split == split and "pareto" in spec.objectives
    }


# Which way a metric outside METRICS is better, by its own name (the part after the last
# "/", so "photo/test_acc" reads as "test_acc"): the first pattern matching its end wins.
DIRECTION_PATTERNS: tuple[tuple[str, bool], ...] = (
    (r"fpr\d*", False),  # false-positive rate (fpr95): lower is better
    (r"seconds", False),  # time: lower is better
    (r"acc|accuracy", True),
    (r"auroc", True),
    (r"aupr(_in|_out)?", True),
    (r"objective", True),
)


def metric_direction(name: str) -> bool | None:
    """True when larger is better, False when smaller is, None when the name is unknown."""
    base = name.rsplit(DOMAIN_SEPARATOR, 1)[-1].lower()
    if base in METRICS:
        return METRICS[base].maximize
    for pattern, maximize in DIRECTION_PATTERNS:
        if re.search(rf"(^|_)({pattern})$", base):
            return maximize
    return None


def metric_mode(name: str) -> str:
    """Ray's and Optuna's word for the direction of a known metric: "max" or "min"."""
    return "max" if metric_direction(name) is not False else "min"


def metric_split(name: str) -> str | None:
    """ "val" or "test" for a metric key (per-domain ones included), else None."""
    base = name.rsplit(DOMAIN_SEPARATOR, 1)[-1]
    if base.startswith(VAL_PREFIX):
        return "val"
    if base.startswith(TEST_PREFIX):
        return "test"
    return None


def is_metric(key: str) -> bool:
    """Whether a result key is part of a trial's recorded result (a metric, a per-domain
    metric, the objective, a timing or a label) rather than a report's bookkeeping."""
    return (
        metric_split(key) is not None
        or key.startswith(JOINT_METRIC)
        or key in TIMING_KEYS
        or key in LABEL_KEYS
        or (DOMAIN_SEPARATOR in key and not key.startswith(CONFIG_PREFIX))
    )


def config_column(key: str) -> str:
    return f"{CONFIG_PREFIX}{key}"


def config_key(column: str) -> str | None:
    """The config key of a ``config/<key>`` column, else None."""
    column = str(column)
    return column[len(CONFIG_PREFIX) :] if column.startswith(CONFIG_PREFIX) else None


# ----------------------------------------------------------------------------- results files
# The files of a search folder (runs/<space>/<name>/); the space and summary files are
# also the parent MLflow run's artifacts.
TRIALS_FILE = "trials.parquet"
SEARCH_FILE = "search.json"
OPTUNA_FILE = "optuna.db"
SPACE_FILE = "space.yaml"
SUMMARY_FILE = "summary.json"
# The fixed columns of trials.parquet and their types; then every config value as
# ``config/<key>`` and every numeric metric, each a column of its own type.
TRIAL_COLUMNS: dict[str, str] = {
    "trial_id": "string", "search": "string", "space": "string", "method": "string",
    "status": "string", "error": "string", "seed": "Int64", "selection": "string",
    "protocol": "string", "wall_seconds": "float64", "train_seconds": "float64",
    "node": "string", "attempts": "Int64", "population": "string", "mlflow_run_id": "string",
    "finished_at": "string",
}  # fmt: skip
TRIAL_STATUSES = ("ok", "failed", "stopped")
