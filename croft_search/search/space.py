"""Search spaces: one YAML file per search, validated on load into a `SearchSpace` that
knows nothing of the engine (`optuna_bridge` turns it into Optuna suggestions and samplers).

A space is a name from the packaged ``search_spaces/`` folder (``croft_digits``) or a path
to a YAML file. The format, every key optional unless marked::

    name: croft_digits             # default: the file name without .yaml
    description: CRoFT on the embedded digits benchmark
    method: croft                  # REQUIRED: a method name, or a list of them
    dataset: digits                # default digits; a domain-split dataset
    backbone: tiny-digits          # default tiny-digits; any open_clip model name
    pretrained: default            # default "default"; an open_clip tag or a checkpoint path
    target_domains: all            # default all; one domain, a list, or all: every trial
                                   # trains one leave-one-domain-out split per domain and
                                   # reports the mean
    fixed:                         # values every trial uses: hyper-parameters of the
      epochs: 20                   # method(s), or the trial settings views, view_seed,
      shots: 16                    # score, selection, device, data_root, cache_dir
    search:                        # values the sampler chooses, one distribution each:
      lambda1: {uniform: [0, 15]}          # float in [low, high]; optional step: 0.5
      lambda2: {loguniform: [0.1, 1000]}   # float on a log scale, low > 0
      gen_steps: {int: [0, 3]}             # integer; optional step: 2, or log: true
      n_ctx: {choice: [0, 4, 8]}           # categorical
      ratio_image: {grid: [0.2, 0.5]}      # categorical swept exhaustively: grid sampler only
    methods:                       # multi-method spaces: per-method blocks, merged over the
      coop:                        # top-level fixed/search (which then must suit every
        fixed: {epochs: 20}        # method); parameters of one method are only suggested
        search: {lr: {loguniform: [1.0e-4, 1.0e-2]}}   # when the sampler picks that method
    variants:                      # named component settings (ablations), one categorical
      full: {}                     # axis "variant"; a variant's values win over fixed and
      no_edr: {lambda2: 0}         # searched ones; its name is recorded as config["variant"]
    objective: {joint: 0.5}        # default; maximise w * val_acc + (1 - w) * val_auroc
    # objective: {pareto: {val_acc: max, val_auroc: max}}  # or a list of metric names
    sampler: tpe                   # default tpe; tpe | nsga2 | random | grid
    scheduler: {asha: {grace_period: 5, reduction_factor: 3}}   # default none; max_t
                                   # defaults to the largest number of epochs in the space
    num_samples: 32                # REQUIRED unless sampler is grid (default: the grid size)
    seeds: [0]                     # default [0]; grid sampler: an axis "seed";
                                   # other samplers: every trial runs and averages all seeds

Rules worth knowing:
- The grid sampler visits every combination of the discrete parameters (choice, grid, int,
  uniform with a step) crossed with the variants and seeds; a continuous parameter is an
  error. ``grid`` values under another sampler are an error too, since nothing would visit
  them all (use ``choice`` for a categorical the sampler picks).
- ASHA always stops on the per-epoch ``objective`` (mode max) that run_trial reports, also
  in pareto spaces (with the trial's ``objective_weight``, default 0.5): Ray's ASHA needs
  one metric.
- Pareto metrics are validation metrics (val_acc, val_auroc, val_fpr95); test metrics are
  accepted only with ``fixed: {selection: oracle}``, which every result then records.
- YAML 1.1 reads ``1e-4`` as a string; this loader reads it as the number it looks like.
  Duplicate keys are an error rather than the last one silently winning.

An engine's side (``croft_search.search.ray_engine`` is one)::

    space = load_space("croft_digits").with_overrides(num_samples=8, fixed_overrides={...})
    resources = load_resources(space.feature_settings(), space.target_domain_list())
    study = optuna.create_study(directions=study_directions(space),
                                sampler=make_sampler(space, seed))
    trial = study.ask()
    config = suggest(space, trial)           # optuna_bridge.suggest
    results = [run_trial(run, resources) for run in run_configs(config)]
    # early stopping: ASHA on the per-epoch "objective" at space.scheduler's rungs

``suggest`` returns the complete trial config (method, dataset, target_domain, backbone,
pretrained, objective_weight for joint objectives, fixed and sampled values, variant, and
``seed``, or ``seeds`` where a trial averages several). Optuna parameter names equal config
keys, except in multi-method spaces (``coop.lr``) and conditional grids (one ``grid_point``
axis); an engine may merge those names into the config, so ``run_configs`` drops them, drops
``variant`` (not a run_trial key) and expands ``seeds`` into one run_trial config per seed.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from croft_search.backbones import RANDOM_PRETRAINED
from croft_search.contract import (
    JOINT_METRIC,
    SETTINGS,
    TRIAL_SETTINGS,
    check_setting,
    pareto_metrics,
)
from croft_search.data import get_dataset_spec
from croft_search.errors import ConfigError
from trainables.base import LOOP_HPARAMS, HParam
from trainables.registry import hparam_specs, method_names, resolve_hparams

SPACES_PACKAGE = "search_spaces"
SAMPLERS = ("tpe", "nsga2", "random", "grid")
DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice", "grid")
TOP_LEVEL_KEYS = (
    "name",
    "description",
    "method",
    "methods",
    "dataset",
    "backbone",
    "pretrained",
    "target_domains",
    "fixed",
    "search",
    "variants",
    "objective",
    "sampler",
    "scheduler",
    "num_samples",
    "seeds",
)
# Trial settings a space may fix (croft_search.contract.SETTINGS, by scope); the others have
# their own top-level key or come from the objective. One feature cache serves the whole
# search, so only per-method settings (the post-hoc score) may differ per method or be searched.
SHARED_SETTINGS = tuple(n for n, s in SETTINGS.items() if s.scope == "shared")
PER_METHOD_SETTINGS = tuple(n for n, s in SETTINGS.items() if s.scope == "per_method")
SETTINGS_WITH_OWN_KEY = {
    **{n: s.space_key for n, s in SETTINGS.items() if s.scope == "own_key"},
    "seed": "seeds",
    "variant": "variants",
}
VALIDATION_METRICS = pareto_metrics("val")
TEST_METRICS = pareto_metrics("test")
ASHA_ARGS = ("grace_period", "reduction_factor", "max_t")
ASHA_DEFAULTS = {"grace_period": 1, "reduction_factor": 4}  # Ray's own defaults
# Optuna names that are not config keys (see run_configs).
GRID_POINT = "grid_point"
METHOD_PARAM_SEPARATOR = "."
FLOW_MAPPING_WIDTH = 72
# A grid this large is a typo (an int range meant as a choice), not a plan.
MAX_GRID_POINTS = 100_000


# ---------------------------------------------------------------------------- distributions


@dataclass(frozen=True)
class Param:
    """One searched value: ``kind`` is a DISTRIBUTIONS entry; ``low``/``high`` (with an
    optional ``step``, or ``log`` for int) for ranges, ``choices`` for choice and grid."""

    kind: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    @property
    def is_discrete(self) -> bool:
        return self.kind in ("choice", "grid", "int") or self.step is not None

    def grid_values(self) -> list[Any]:
        """Every value of a discrete parameter, in order."""
        if self.kind in ("choice", "grid"):
            return list(self.choices)
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step is not None:
            count = round((self.high - self.low) / self.step) + 1
            # Rounded so 0.1-steps read 0.3, not 0.30000000000000004, in configs and logs.
            return [round(self.low + index * self.step, 12) for index in range(count)]
        raise ValueError(f"a {self.kind} parameter has no finite set of values")

    def grid_count(self) -> int:
        if self.kind in ("choice", "grid"):
            return len(self.choices)
        return round((self.high - self.low) / (self.step or 1)) + 1

    def to_raw(self) -> dict[str, Any]:
        """The YAML form this parameter was (or could have been) written in."""
        if self.kind in ("choice", "grid"):
            return {self.kind: list(self.choices)}
        raw: dict[str, Any] = {self.kind: [self.low, self.high]}
        if self.step is not None:
            raw["step"] = self.step
        if self.log:
            raw["log"] = True
        return raw


@dataclass(frozen=True)
class SearchObjective:
    """``joint``: maximise ``weight * val_acc + (1 - weight) * val_auroc`` (run_trial's
    ``objective``); ``pareto``: the front of ``directions`` (metric -> "max" | "min")."""

    kind: str
    weight: float | None = None
    directions: dict[str, str] = field(default_factory=dict)

    def to_raw(self) -> dict[str, Any]:
        if self.kind == "joint":
            return {"joint": self.weight}
        return {"pareto": dict(self.directions)}


# ------------------------------------------------------------------------------ the space


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space. ``fixed`` and ``search`` are resolved per method (the
    top-level values merged under each method's block); ``target_domains`` is "all" or a
    tuple of canonical domain names; ``scheduler`` is None or ASHA's keyword arguments
    (grace_period, reduction_factor, max_t)."""

    name: str
    path: str = field(compare=False)
    description: str
    methods: tuple[str, ...]
    dataset: str
    backbone: str
    pretrained: str | None
    target_domains: str | tuple[str, ...]
    fixed: dict[str, dict[str, Any]]
    search: dict[str, dict[str, Param]]
    variants: dict[str, dict[str, Any]]
    objective: SearchObjective
    sampler: str
    scheduler: dict[str, int | float] | None
    num_samples: int
    seeds: tuple[int, ...]

    # -- what the driver calls -----------------------------------------------------------
    def metric_names(self) -> list[str]:
        """What Optuna/Ray optimise: ["objective"] or the pareto metrics."""
        if self.objective.kind == "joint":
            return [JOINT_METRIC]
        return list(self.objective.directions)

    def modes(self) -> list[str]:
        """The direction, "max" or "min", of each entry of metric_names()."""
        if self.objective.kind == "joint":
            return ["max"]
        return list(self.objective.directions.values())

    def grid_size(self) -> int | None:
        """The number of grid points of a grid space (its default num_samples), else None."""
        if self.sampler != "grid":
            return None
        return sum(self._grid_point_counts())

    def to_yaml(self) -> str:
        """The resolved space as YAML (every default written out); loads back to an equal
        space."""
        header = f"# search space {self.name}, resolved from {self.path}\n"
        return header + yaml.dump(self.to_dict(), Dumper=_SpaceDumper, sort_keys=False, width=100)

    def with_overrides(
        self,
        num_samples: int | None = None,
        fixed_overrides: Mapping[str, Any] | None = None,
    ) -> SearchSpace:
        """This space with ``--num-samples`` and ``--set key=value`` applied, re-validated.

        A key is a hyper-parameter or trial setting (fixed for every method that declares
        it, no longer searched), ``method.key`` for one method of a multi-method space, or
        one of the top-level keys dataset, backbone, pretrained, target_domains (or
        target_domain), seeds, sampler, num_samples, objective_weight (a joint objective's
        weight). String values are read as YAML scalars, so "0.01" is a number."""
        raw = self.to_dict()
        if self.scheduler and self.scheduler["max_t"] == self.max_epochs():
            del raw["scheduler"]["asha"]["max_t"]  # defaulted: follow --set epochs=...
        applied = []
        for key, value in (fixed_overrides or {}).items():
            if isinstance(value, str):
                value = read_cli_value(value)
            _apply_override(raw, key, value)
            applied.append(f"{key}={value}")
        if num_samples is not None:
            raw["num_samples"] = num_samples
            applied.append(f"num_samples={num_samples}")
        source = f"{self.path} with {' '.join(applied)}" if applied else self.path
        return parse_space(raw, source, self.path)

    def target_domain_list(self) -> list[str]:
        """The target domains by name, "all" expanded: the splits a search loads features
        for."""
        if self.target_domains == "all":
            return list(get_dataset_spec(self.dataset).target_domains)
        return list(self.target_domains)

    def setting(self, key: str) -> Any:
        """A trial setting the whole search shares (views, view_seed, selection, device,
        data_root, cache_dir): the space's fixed value, else run_trial's default."""
        if key not in SHARED_SETTINGS:
            raise ConfigError(
                f"{key!r} is not a shared trial setting ({', '.join(SHARED_SETTINGS)})"
            )
        return self.fixed[self.methods[0]].get(key, TRIAL_SETTINGS[key])

    def feature_settings(
        self, data_root: str | None = None, cache_dir: str | None = None
    ) -> dict[str, Any]:
        """Every trial setting, as the search's trials share them, for loading the features
        once (`croft_search.trial.runner.load_resources`): loaded on the CPU, ``data_root`` and
        ``cache_dir`` (the command line's) over the space's."""
        settings = dict(TRIAL_SETTINGS)
        settings |= {key: self.setting(key) for key in SHARED_SETTINGS}
        settings |= {"dataset": self.dataset, "backbone": self.backbone}
        settings |= {"pretrained": self.pretrained, "device": "cpu"}
        settings["data_root"] = data_root or settings["data_root"]
        settings["cache_dir"] = cache_dir or settings["cache_dir"]
        return settings

    def max_epochs(self) -> int:
        """The most epochs any trial of this space can train (ASHA's default max_t)."""
        return max(_most_epochs(m, self.fixed[m], self.search[m]) for m in self.methods)

    # -- properties ----------------------------------------------------------------------
    @property
    def is_conditional(self) -> bool:
        """Whether some parameter is only suggested for some methods or variants."""
        if len(self.methods) > 1 and any(self.search[m] for m in self.methods):
            return True
        return any(
            key in settings for settings in self.variants.values() for key in self._searched()
        )

    def param_name(self, method: str, key: str) -> str:
        """The Optuna name of ``method``'s searched ``key``: prefixed in multi-method spaces,
        where two methods' ``lr`` are different parameters with different ranges."""
        if len(self.methods) > 1:
            return f"{method}{METHOD_PARAM_SEPARATOR}{key}"
        return key

    def to_dict(self) -> dict[str, Any]:
        """The resolved space in its YAML form."""
        raw: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "method": self.methods[0] if len(self.methods) == 1 else list(self.methods),
            "dataset": self.dataset,
            "backbone": self.backbone,
            "pretrained": self.pretrained,
            "target_domains": _target_domains_raw(self.target_domains),
        }
        if len(self.methods) == 1:
            method = self.methods[0]
            raw["fixed"] = dict(self.fixed[method])
            raw["search"] = {key: p.to_raw() for key, p in self.search[method].items()}
        else:
            # Values every method shares go to the top level (shared trial settings must).
            first, *rest = (self.fixed[m] for m in self.methods)
            common = {
                key: value
                for key, value in first.items()
                if all(key in other and other[key] == value for other in rest)
            }
            raw["fixed"] = common
            raw["methods"] = {}
            for method in self.methods:
                block: dict[str, Any] = {}
                own = {k: v for k, v in self.fixed[method].items() if k not in common}
                if own:
                    block["fixed"] = own
                if self.search[method]:
                    block["search"] = {k: p.to_raw() for k, p in self.search[method].items()}
                raw["methods"][method] = block
        if self.variants:
            raw["variants"] = {name: dict(values) for name, values in self.variants.items()}
        raw["objective"] = self.objective.to_raw()
        raw["sampler"] = self.sampler
        raw["scheduler"] = {"asha": dict(self.scheduler)} if self.scheduler else "none"
        # A grid space's default follows its grid (so --set seeds=[0] shrinks both).
        if self.sampler != "grid" or self.num_samples != self.grid_size():
            raw["num_samples"] = self.num_samples
        raw["seeds"] = list(self.seeds)
        return raw

    # -- internals -----------------------------------------------------------------------
    def _searched(self) -> set[str]:
        return {key for method in self.methods for key in self.search[method]}

    def config_for(
        self, method: str, variant: str | None, values: Mapping[str, Any], seed: int | None
    ) -> dict[str, Any]:
        config: dict[str, Any] = {
            "method": method,
            "dataset": self.dataset,
            "target_domain": _target_domains_raw(self.target_domains),
            "backbone": self.backbone,
            "pretrained": self.pretrained,
        }
        if self.objective.kind == "joint":
            config["objective_weight"] = self.objective.weight
        config.update(self.fixed[method])
        config.update(values)
        if variant is not None:
            config.update(self.variants[variant])
            config["variant"] = variant
        if seed is not None:
            config["seed"] = seed
        elif len(self.seeds) == 1 or self.sampler == "grid":
            config["seed"] = self.seeds[0]
        else:
            config["seeds"] = list(self.seeds)
        return config

    def _grid_seeds(self) -> list[int | None]:
        return list(self.seeds) if len(self.seeds) > 1 else [None]

    def _grid_cells(self) -> list[tuple[str, str | None, dict[str, Param]]]:
        """(method, variant, the parameters that variant leaves searched) per cell."""
        return [
            (
                method,
                variant,
                {
                    key: param
                    for key, param in self.search[method].items()
                    if key not in self.variants.get(variant, {})
                },
            )
            for method in self.methods
            for variant in (list(self.variants) or [None])
        ]

    def _grid_point_counts(self) -> list[int]:
        seeds = len(self._grid_seeds())
        return [
            math.prod(p.grid_count() for p in params.values()) * seeds
            for _, _, params in self._grid_cells()
        ]

    @functools.cached_property
    def grid_points(
        self,
    ) -> list[tuple[str, str | None, dict[str, Any], int | None]] | None:
        """Every grid point, enumerated, where the grid is not one cartesian product
        (several methods with their own parameters, or variants that fix a searched value):
        GridSampler then walks one ``grid_point`` axis over this list. None otherwise."""
        if self.sampler != "grid" or not self.is_conditional:
            return None
        points = []
        for method, variant, params in self._grid_cells():
            for combo in itertools.product(*(p.grid_values() for p in params.values())):
                for seed in self._grid_seeds():
                    points.append((method, variant, dict(zip(params, combo, strict=True)), seed))
        return points

    def grid_axes(self) -> dict[str, list[Any]]:
        if self.grid_points is not None:
            return {GRID_POINT: list(range(len(self.grid_points)))}
        axes: dict[str, list[Any]] = {}
        if len(self.methods) > 1:
            axes["method"] = list(self.methods)
        if self.variants:
            axes["variant"] = list(self.variants)
        for key, param in self.search[self.methods[0]].items():
            axes[self.param_name(self.methods[0], key)] = param.grid_values()
        if len(self.seeds) > 1:
            axes["seed"] = list(self.seeds)
        return axes


# ---------------------------------------------------------------------------- loading


def space_names() -> list[str]:
    """The packaged spaces (search_spaces/*.yaml), by name."""
    folder = resources.files(SPACES_PACKAGE)
    return sorted(
        entry.name[: -len(".yaml")] for entry in folder.iterdir() if entry.name.endswith(".yaml")
    )


def load_space(name_or_path: str | Path) -> SearchSpace:
    """A packaged space by name, or a YAML file by path; validated."""
    text_name = str(name_or_path)
    looks_like_path = (
        isinstance(name_or_path, Path)
        or text_name.endswith((".yaml", ".yml"))
        or "/" in text_name
        or "\\" in text_name
    )
    if looks_like_path:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise ConfigError(f"{text_name}: no such search-space file")
        return load_space_text(path.read_text(encoding="utf-8"), text_name, path.stem)
    packaged = resources.files(SPACES_PACKAGE) / f"{text_name}.yaml"
    if not packaged.is_file():
        raise ConfigError(
            f"unknown search space {text_name!r}; known spaces: {', '.join(space_names())} "
            f"(or pass a path to a .yaml file)"
        )
    return load_space_text(
        packaged.read_text(encoding="utf-8"), f"{SPACES_PACKAGE}/{text_name}.yaml", text_name
    )


def load_space_text(text: str, source: str, default_name: str) -> SearchSpace:
    """Parse and validate YAML ``text``; ``source`` names it in error messages."""
    try:
        raw = yaml.load(text, Loader=_SpaceLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = err.problem or err.context or "unreadable"
        raise ConfigError(f"{source}: not valid YAML ({where}{problem})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML ({_one_line(str(err))})") from None
    if raw is None:
        raise ConfigError(f"{source}: the file is empty; a search space needs at least 'method'")
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: a search space is a mapping of keys, not a {type(raw).__name__}"
        )
    raw.setdefault("name", default_name)
    return parse_space(raw, source, source)


def parse_space(raw: Mapping[str, Any], source: str, path: str) -> SearchSpace:
    """Validate the YAML form ``raw`` of a space. Errors read ``SOURCE: KEY: problem``."""
    return _Parser(source).parse(raw, path)


class _SpaceLoader(yaml.SafeLoader):
    """SafeLoader that reads 1e-4 as a float and refuses duplicate keys."""


_SpaceLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


class _SpaceDumper(yaml.SafeDumper):
    """Writes lists and short flat mappings (a distribution, a variant) on one line, the
    way the shipped files are written, and everything else as blocks."""


def _represent_list(dumper: yaml.SafeDumper, value: list[Any]) -> yaml.Node:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True)


def _represent_dict(dumper: yaml.SafeDumper, value: dict[Any, Any]) -> yaml.Node:
    flat = not any(isinstance(item, dict) for item in value.values())
    short = len(repr(value)) <= FLOW_MAPPING_WIDTH
    return dumper.represent_mapping("tag:yaml.org,2002:map", value, flow_style=flat and short)


_SpaceDumper.add_representer(list, _represent_list)
_SpaceDumper.add_representer(dict, _represent_dict)


def _construct_unique_mapping(loader: _SpaceLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key; the base constructor explains it
            break
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_SpaceLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


# ---------------------------------------------------------------------------- validation


class _Parser:
    """Turns the YAML form into a SearchSpace; every problem is one ConfigError line
    naming the source, the key path and what is wrong."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str | None, problem: str) -> ConfigError:
        where = f"{key}: " if key else ""
        return ConfigError(f"{self.source}: {where}{_one_line(problem)}")

    def parse(self, raw: Mapping[str, Any], path: str) -> SearchSpace:
        unknown = [key for key in raw if key not in TOP_LEVEL_KEYS]
        if unknown:
            raise self.fail(
                None,
                f"unknown top-level key {unknown[0]!r}{_did_you_mean(unknown[0], TOP_LEVEL_KEYS)} "
                f"(known: {', '.join(TOP_LEVEL_KEYS)})",
            )
        name = self.text(raw, "name", required=True)
        description = self.text(raw, "description", default="")
        methods = self.methods(raw.get("method"))
        dataset, target_domains = self.dataset(raw)
        backbone = self.backbone(raw.get("backbone", TRIAL_SETTINGS["backbone"]))
        pretrained = self.pretrained(backbone, raw.get("pretrained", "default"))
        sampler = self.sampler(raw.get("sampler", "tpe"))

        top_fixed = self.fixed_block(raw.get("fixed"), "fixed", methods, top_level=True)
        top_search = self.search_block(raw.get("search"), "search", methods, sampler)
        self.check_disjoint(top_fixed, top_search, "search")
        blocks = self.method_blocks(raw.get("methods"), methods, sampler)
        fixed: dict[str, dict[str, Any]] = {}
        search: dict[str, dict[str, Param]] = {}
        for method in methods:
            own_fixed, own_search = blocks.get(method, ({}, {}))
            # A method's own value replaces a shared one, fixed or searched alike.
            fixed[method] = {
                k: v for k, v in {**top_fixed, **own_fixed}.items() if k not in own_search
            }
            search[method] = {
                k: p for k, p in {**top_search, **own_search}.items() if k not in own_fixed
            }
        variants = self.variants(raw.get("variants"), methods)
        for method in methods:
            for variant, settings in (variants or {None: {}}).items():
                self.check_resolves(method, variant, {**fixed[method], **settings})

        objective = self.objective(raw.get("objective", {"joint": 0.5}), fixed, methods)
        seeds = self.seeds(raw.get("seeds", [0]))
        scheduler = self.scheduler(raw.get("scheduler"), fixed, search, methods)
        space = SearchSpace(
            name=name,
            path=path,
            description=description,
            methods=methods,
            dataset=dataset,
            backbone=backbone,
            pretrained=pretrained,
            target_domains=target_domains,
            fixed=fixed,
            search=search,
            variants=variants,
            objective=objective,
            sampler=sampler,
            scheduler=scheduler,
            num_samples=1,
            seeds=seeds,
        )
        num_samples = self.num_samples(raw.get("num_samples"), space)
        return dataclasses.replace(space, num_samples=num_samples)

    def check_disjoint(
        self, fixed: Mapping[str, Any], search: Mapping[str, Param], where: str
    ) -> None:
        for key in search:
            if key in fixed:
                raise self.fail(
                    f"{where}.{key}", f"{key} is also fixed; a value is either fixed or searched"
                )

    # -- scalars -------------------------------------------------------------------------
    def text(
        self, raw: Mapping[str, Any], key: str, default: str = "", required: bool = False
    ) -> str:
        value = raw.get(key, default)
        if not isinstance(value, str) or (required and not value):
            raise self.fail(key, f"must be a non-empty string, got {value!r}")
        return value

    def methods(self, value: Any) -> tuple[str, ...]:
        if value is None:
            raise self.fail("method", "missing; name a method or a list of methods")
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not names:
            raise self.fail("method", f"must be a method name or a list of them, got {value!r}")
        known = method_names()
        for name in names:
            if name not in known:
                raise self.fail(
                    "method",
                    f"unknown method {name!r}{_did_you_mean(name, known)} "
                    f"(known: {', '.join(known)})",
                )
        if len(set(names)) != len(names):
            raise self.fail("method", f"lists a method twice: {names}")
        return tuple(names)

    def dataset(self, raw: Mapping[str, Any]) -> tuple[str, str | tuple[str, ...]]:
        try:
            spec = get_dataset_spec(str(raw.get("dataset", "digits")))
        except ConfigError as err:
            raise self.fail("dataset", str(err)) from None
        if spec.kind != "domain_split":
            raise self.fail(
                "dataset",
                f"{spec.name} is an open-set dataset; a search trains on a domain-split "
                f"dataset (PACS, VLCS, digits)",
            )
        value = raw.get("target_domains", "all")
        if value == "all":
            return spec.name, "all"
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise self.fail(
                "target_domains", f"must be 'all', a domain or a list of domains, got {value!r}"
            )
        try:
            domains = tuple(spec.canonical_domain(name) for name in names)
        except ConfigError as err:
            raise self.fail("target_domains", str(err)) from None
        if len(set(domains)) != len(domains):
            raise self.fail("target_domains", f"lists a domain twice: {names}")
        return spec.name, domains

    def backbone(self, value: Any) -> str:
        from croft_search.backbones import backbone_names  # open_clip: only when loading

        if not isinstance(value, str):
            raise self.fail("backbone", f"must be an open_clip model name, got {value!r}")
        normalised = value.replace("/", "-")  # open_clip's old spelling ViT-B/16
        known = backbone_names()
        if normalised not in known:
            close = difflib.get_close_matches(normalised, known, n=3, cutoff=0.6)
            hint = f" (close: {', '.join(close)})" if close else ""
            raise self.fail("backbone", f"unknown open_clip model {value!r}{hint}")
        return normalised

    def pretrained(self, backbone: str, value: Any) -> str | None:
        """ "default", an open_clip tag of ``backbone``, a checkpoint path, or null / "random"
        (untrained weights, for tests and smoke runs). Whether a path exists is the loader's
        business: a space may name a checkpoint that exists only on the machines that run
        the trials."""
        import open_clip

        if value is None or value in ("default", RANDOM_PRETRAINED):
            return value
        if not isinstance(value, str) or not value:
            raise self.fail("pretrained", f"must be a tag, a path or 'default', got {value!r}")
        tags = open_clip.list_pretrained_tags_by_model(backbone)
        path_like = any(ch in value for ch in "/\\~") or Path(value).suffix != ""
        if value not in tags and not path_like:
            raise self.fail(
                "pretrained",
                f"{value!r} is neither an open_clip tag of {backbone} "
                f"(known: {', '.join(tags) or 'none'}) nor a checkpoint path",
            )
        return value

    def sampler(self, value: Any) -> str:
        if value not in SAMPLERS:
            raise self.fail("sampler", f"sampler {value!r} unknown (use {', '.join(SAMPLERS)})")
        return value

    def seeds(self, value: Any) -> tuple[int, ...]:
        seeds = [value] if isinstance(value, int) and not isinstance(value, bool) else value
        if not isinstance(seeds, list) or not seeds:
            raise self.fail("seeds", f"must be an integer or a list of integers, got {value!r}")
        spec = LOOP_HPARAMS["seed"]
        checked = []
        for seed in seeds:
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise self.fail("seeds", f"seeds are integers, got {seed!r}")
            try:
                checked.append(spec.coerce("seed", seed))
            except ConfigError as err:
                raise self.fail("seeds", str(err)) from None
        if len(set(checked)) != len(checked):
            raise self.fail("seeds", f"lists a seed twice: {seeds}")
        return tuple(checked)

    # -- fixed values and settings -------------------------------------------------------
    def setting_value(self, key_path: str, key: str, value: Any) -> Any:
        """A trial setting's value, checked as every trial checks it."""
        try:
            return check_setting(key, value)
        except ConfigError as err:
            raise self.fail(key_path, str(err)) from None

    def value_for(
        self, key_path: str, key: str, value: Any, methods: Sequence[str], top_level: bool
    ) -> Any:
        """A fixed (or variant) value of ``key``, checked for every method of the block."""
        if key in SETTINGS_WITH_OWN_KEY:
            raise self.fail(key_path, f"set it with the top-level key {SETTINGS_WITH_OWN_KEY[key]}")
        if key in SHARED_SETTINGS:
            if not top_level:
                raise self.fail(
                    key_path,
                    f"{key} is shared by the whole search (one feature cache); "
                    f"set it in the top-level fixed block",
                )
            return self.setting_value(key_path, key, value)
        if key in PER_METHOD_SETTINGS:
            return self.setting_value(key_path, key, value)
        coerced = value
        for method in methods:
            coerced = self.hparam(method, key_path, key).coerce_or_fail(self, key_path, value)
        return coerced

    def hparam(self, method: str, key_path: str, key: str) -> _CheckedHParam:
        specs = hparam_specs(method)
        if key not in specs:
            known = sorted(specs) + sorted(SHARED_SETTINGS + PER_METHOD_SETTINGS)
            raise self.fail(
                key_path,
                f"unknown hyper-parameter {key!r} for {method}{_did_you_mean(key, known)} "
                f"(known: {', '.join(known)})",
            )
        return _CheckedHParam(method, specs[key])

    def fixed_block(
        self, value: Any, where: str, methods: Sequence[str], top_level: bool
    ) -> dict[str, Any]:
        return self.each(value, where, lambda path, key, item: self.value_for(
            path, key, item, methods, top_level))  # fmt: skip

    def each(self, value: Any, where: str, check: Any) -> dict[str, Any]:
        """A mapping block with ``check(key_path, key, value)`` applied to every entry."""
        block = self.mapping(value, where)
        return {key: check(f"{where}.{key}", key, item) for key, item in block.items()}

    def mapping(self, value: Any, where: str) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(where, f"must be a mapping of keys to values, got {value!r}")
        for key in value:
            if not isinstance(key, str):
                raise self.fail(where, f"keys are names, got {key!r}")
        return value

    def check_resolves(self, method: str, variant: str | None, values: Mapping[str, Any]) -> None:
        """The whole fixed set through the registry, as run_trial will see it."""
        settings = SHARED_SETTINGS + PER_METHOD_SETTINGS
        hparams = {k: v for k, v in values.items() if k not in settings}
        try:
            resolve_hparams(method, hparams, values.get("recipe", TRIAL_SETTINGS["recipe"]))
        except ConfigError as err:
            where = f"variants.{variant}" if variant else "fixed"
            raise self.fail(where, f"{method}: {err}") from None

    # -- searched values -----------------------------------------------------------------
    def search_block(
        self, value: Any, where: str, methods: Sequence[str], sampler: str
    ) -> dict[str, Param]:
        return self.each(value, where, lambda path, key, item: self.param(
            path, key, item, methods, sampler))  # fmt: skip

    def param(
        self, key_path: str, key: str, raw: Any, methods: Sequence[str], sampler: str
    ) -> Param:
        if key in SETTINGS_WITH_OWN_KEY or key in SHARED_SETTINGS:
            raise self.fail(
                key_path,
                f"{key} cannot be searched (one feature cache and one setup per search); "
                f"only hyper-parameters and the OOD score can",
            )
        if not isinstance(raw, dict):
            raise self.fail(
                key_path,
                f"needs a distribution such as {{uniform: [0, 1]}} "
                f"(one of {', '.join(DISTRIBUTIONS)}), got {raw!r}",
            )
        kinds = [k for k in raw if k in DISTRIBUTIONS]
        if len(kinds) != 1:
            raise self.fail(
                key_path,
                f"name exactly one distribution ({', '.join(DISTRIBUTIONS)}), got {sorted(raw)}",
            )
        kind = kinds[0]
        extra = sorted(set(raw) - {kind, "step", "log"})
        if extra:
            raise self.fail(key_path, f"unknown option {extra[0]!r} (options: step, log)")
        if kind == "grid" and sampler != "grid":
            raise self.fail(
                key_path,
                f"grid values need sampler: grid (the {sampler} sampler would not visit them "
                f"all); use choice for a categorical the sampler picks",
            )
        if key in PER_METHOD_SETTINGS:
            if kind not in ("choice", "grid"):
                raise self.fail(key_path, f"{key} is categorical; use choice or grid")
            values = self.choices(key_path, raw[kind])
            return Param(kind, choices=tuple(self.setting_value(key_path, key, v) for v in values))
        checks = [self.hparam(method, key_path, key) for method in methods]
        if kind in ("choice", "grid"):
            if set(raw) != {kind}:
                raise self.fail(key_path, f"{kind} takes a list of values, no step or log")
            values = self.choices(key_path, raw[kind])
            for check in checks:
                coerced = [check.coerce_or_fail(self, key_path, v) for v in values]
            if len(set(map(repr, coerced))) != len(coerced):
                raise self.fail(key_path, f"lists a value twice: {values}")
            return Param(kind, choices=tuple(coerced))
        return self.range_param(key_path, key, kind, raw, checks, sampler)

    def choices(self, key_path: str, values: Any) -> list[Any]:
        if not isinstance(values, list) or not values:
            raise self.fail(key_path, f"needs a non-empty list of values, got {values!r}")
        for value in values:
            if not (value is None or isinstance(value, (bool, int, float, str))):
                raise self.fail(key_path, f"values must be numbers, strings or booleans: {value!r}")
        return values

    def range_param(
        self,
        key_path: str,
        key: str,
        kind: str,
        raw: Mapping[str, Any],
        checks: Sequence[_CheckedHParam],
        sampler: str,
    ) -> Param:
        bounds = raw[kind]
        if (
            not isinstance(bounds, list)
            or len(bounds) != 2
            or not all(_is_number(b) for b in bounds)
        ):
            raise self.fail(key_path, f"{kind} needs [low, high], got {bounds!r}")
        low, high = bounds
        if low > high:
            raise self.fail(key_path, f"low {low} > high {high}")
        if low == high:
            raise self.fail(key_path, f"low = high = {low}; put a single value under fixed")
        for check in checks:
            type_name = check.type_name
            if type_name in ("bool", "str"):
                raise self.fail(key_path, f"{key} is a {type_name} for {check.method}; use choice")
            if kind != "int" and type_name == "int":
                raise self.fail(
                    key_path,
                    f"{key} is an integer for {check.method}; use int: [low, high]",
                )
            for bound in bounds:
                check.coerce_or_fail(self, key_path, bound)
        step, log = raw.get("step"), raw.get("log", False)
        if not isinstance(log, bool):
            raise self.fail(key_path, f"log must be true or false, got {log!r}")
        if log and kind != "int":
            raise self.fail(key_path, "log is an option of int; for floats use loguniform")
        if kind == "loguniform" and low <= 0:
            raise self.fail(key_path, f"loguniform needs low > 0, got {low}")
        if kind == "int":
            if not all(isinstance(b, int) for b in bounds):
                raise self.fail(key_path, f"int needs integer bounds, got {bounds}")
            if log and low < 1:
                raise self.fail(key_path, f"int with log needs low >= 1, got {low}")
        if step is not None:
            if kind == "loguniform" or log:
                raise self.fail(key_path, "a log scale takes no step")
            wanted = "integer" if kind == "int" else "number"
            if not _is_number(step) or step <= 0 or (kind == "int" and not isinstance(step, int)):
                raise self.fail(key_path, f"step must be a positive {wanted}, got {step!r}")
            count = (high - low) / step
            if abs(count - round(count)) > 1e-9:
                raise self.fail(key_path, f"step {step} does not divide [{low}, {high}]")
        param = Param(
            kind,
            low=int(low) if kind == "int" else float(low),
            high=int(high) if kind == "int" else float(high),
            step=None if step is None else (int(step) if kind == "int" else float(step)),
            log=log,
        )
        if sampler == "grid":
            if not param.is_discrete:
                raise self.fail(
                    key_path,
                    f"the grid sampler needs discrete values and {kind} is continuous "
                    f"(use choice or grid, int, or uniform with a step)",
                )
            if param.grid_count() > MAX_GRID_POINTS:
                raise self.fail(key_path, f"{param.grid_count()} grid values; too many to visit")
        return param

    def method_blocks(
        self, value: Any, methods: Sequence[str], sampler: str
    ) -> dict[str, tuple[dict[str, Any], dict[str, Param]]]:
        blocks = self.mapping(value, "methods")
        parsed = {}
        for method, block in blocks.items():
            where = f"methods.{method}"
            if method not in methods:
                raise self.fail(
                    where, f"{method!r} is not in this space's method list ({', '.join(methods)})"
                )
            block = self.mapping(block, where)
            unknown = sorted(set(block) - {"fixed", "search"})
            if unknown:
                raise self.fail(
                    where, f"unknown key {unknown[0]!r} (a method block holds fixed and search)"
                )
            own_fixed = self.fixed_block(
                block.get("fixed"), f"{where}.fixed", [method], top_level=False
            )
            own_search = self.search_block(
                block.get("search"), f"{where}.search", [method], sampler
            )
            self.check_disjoint(own_fixed, own_search, f"{where}.search")
            parsed[method] = (own_fixed, own_search)
        return parsed

    def variants(self, value: Any, methods: Sequence[str]) -> dict[str, dict[str, Any]]:
        block = self.mapping(value, "variants")
        variants = {}
        for name, settings in block.items():
            where = f"variants.{name}"
            variants[name] = self.fixed_block(settings, where, methods, top_level=True)
        return variants

    # -- objective, scheduler, budget ----------------------------------------------------
    def objective(
        self, value: Any, fixed: Mapping[str, Mapping[str, Any]], methods: Sequence[str]
    ) -> SearchObjective:
        if value == "joint":
            value = {"joint": 0.5}
        if (
            not isinstance(value, dict)
            or len(value) != 1
            or next(iter(value))
            not in (
                "joint",
                "pareto",
            )
        ):
            raise self.fail(
                "objective",
                f"must be {{joint: WEIGHT}} or {{pareto: {{METRIC: max|min, ...}}}}, got {value!r}",
            )
        kind, body = next(iter(value.items()))
        if kind == "joint":
            if not _is_number(body) or not 0.0 <= body <= 1.0:
                raise self.fail(
                    "objective.joint",
                    f"the weight on val_acc (1 - weight on val_auroc) must be in [0, 1], "
                    f"got {body!r}",
                )
            return SearchObjective("joint", weight=float(body))
        oracle = any(fixed[m].get("selection") == "oracle" for m in methods)
        known = {**VALIDATION_METRICS, **(TEST_METRICS if oracle else {})}
        if isinstance(body, list):
            body = {metric: known.get(metric) for metric in body}
        if not isinstance(body, dict) or len(body) < 2:
            raise self.fail(
                "objective.pareto", f"needs two or more metrics with directions, got {body!r}"
            )
        for metric, direction in body.items():
            if metric not in known:
                hint = (
                    "; test metrics select on test data: allowed only with "
                    "fixed: {selection: oracle}"
                    if metric in TEST_METRICS
                    else ""
                )
                raise self.fail(
                    "objective.pareto",
                    f"unknown metric {metric!r} (known: {', '.join(known)}){hint}",
                )
            if direction != known[metric]:
                raise self.fail(
                    f"objective.pareto.{metric}",
                    f"{metric} is to {'maximise' if known[metric] == 'max' else 'minimise'}: "
                    f"direction {known[metric]}, not {direction!r}",
                )
        return SearchObjective("pareto", directions=dict(body))

    def scheduler(
        self,
        value: Any,
        fixed: Mapping[str, Mapping[str, Any]],
        search: Mapping[str, Mapping[str, Param]],
        methods: Sequence[str],
    ) -> dict[str, int | float] | None:
        if value is None or value == "none":
            return None
        if value == "asha":
            value = {"asha": {}}
        if not isinstance(value, dict) or list(value) != ["asha"]:
            raise self.fail("scheduler", f"must be none or {{asha: {{...}}}}, got {value!r}")
        args = self.mapping(value["asha"], "scheduler.asha")
        unknown = sorted(set(args) - set(ASHA_ARGS))
        if unknown:
            raise self.fail(
                "scheduler.asha", f"unknown argument {unknown[0]!r} (known: {', '.join(ASHA_ARGS)})"
            )
        most_epochs = max(_most_epochs(m, fixed[m], search[m]) for m in methods)
        resolved: dict[str, int | float] = {**ASHA_DEFAULTS, "max_t": most_epochs, **args}
        for key in ("grace_period", "max_t"):
            item = resolved[key]
            if isinstance(item, bool) or not isinstance(item, int) or item < 1:
                if key == "max_t" and key not in args:
                    raise self.fail(
                        "scheduler",
                        "asha stops trials between epochs, and no method here trains for "
                        "epochs (epochs = 0); use scheduler: none",
                    )
                raise self.fail(f"scheduler.asha.{key}", f"must be an integer >= 1, got {item!r}")
        factor = resolved["reduction_factor"]
        if not _is_number(factor) or factor <= 1:
            raise self.fail(
                "scheduler.asha.reduction_factor", f"must be a number > 1, got {factor!r}"
            )
        if resolved["grace_period"] > resolved["max_t"]:
            raise self.fail(
                "scheduler.asha.grace_period",
                f"{resolved['grace_period']} exceeds max_t {resolved['max_t']} (epochs)",
            )
        return resolved

    def num_samples(self, value: Any, space: SearchSpace) -> int:
        grid = space.grid_size()
        if grid is not None and grid > MAX_GRID_POINTS:
            raise self.fail("search", f"the grid has {grid} points; too many to visit")
        if value is None:
            if grid is None:
                raise self.fail(
                    "num_samples", "missing (how many trials to run; only grid spaces default)"
                )
            return grid
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.fail("num_samples", f"must be an integer >= 1, got {value!r}")
        if grid is not None and value > grid:
            raise self.fail(
                "num_samples",
                f"{value} exceeds the grid's {grid} points (the grid sampler would repeat "
                f"configurations); leave it out to run the whole grid",
            )
        return value


@dataclass(frozen=True)
class _CheckedHParam:
    """A method's HParam with parser-friendly errors."""

    method: str
    spec: HParam

    @property
    def type_name(self) -> str:
        return type(self.spec.default).__name__

    def coerce_or_fail(self, parser: _Parser, key_path: str, value: Any) -> Any:
        key = key_path.rsplit(".", 1)[-1]
        try:
            return self.spec.coerce(key, value)
        except ConfigError as err:
            raise parser.fail(key_path, f"{err} (for {self.method})") from None


# ------------------------------------------------------------------------------- helpers


def _most_epochs(method: str, fixed: Mapping[str, Any], search: Mapping[str, Param]) -> int:
    if "epochs" in search:
        param = search["epochs"]
        return int(max(param.choices) if param.choices else param.high)
    if "epochs" in fixed:
        return int(fixed["epochs"])
    recipe = fixed.get("recipe", TRIAL_SETTINGS["recipe"])
    return int(resolve_hparams(method, {}, recipe)["epochs"])  # the recipe's, if it sets them


def _target_domains_raw(domains: str | tuple[str, ...]) -> str | list[str]:
    """The YAML form of target domains, which is also run_trial's ``target_domain``: "all",
    one name, or a list."""
    if domains == "all":
        return "all"
    return domains[0] if len(domains) == 1 else list(domains)


def _apply_override(raw: dict[str, Any], key: str, value: Any) -> None:
    """Write one ``--set`` into the YAML form ``raw`` (see SearchSpace.with_overrides)."""
    if key in ("target_domain", "target_domains"):
        raw["target_domains"] = value
    elif key in ("dataset", "backbone", "pretrained", "seeds", "sampler", "num_samples"):
        raw[key] = value
    elif key == "objective_weight":
        raw["objective"] = {"joint": value}
    elif METHOD_PARAM_SEPARATOR in key:
        method, name = key.split(METHOD_PARAM_SEPARATOR, 1)
        block = raw.setdefault("methods", {}).setdefault(method, {})
        block.setdefault("fixed", {})[name] = value
        block.get("search", {}).pop(name, None)
    else:
        raw.setdefault("fixed", {})[key] = value
        raw.get("search", {}).pop(key, None)
        for block in raw.get("methods", {}).values():
            block.get("fixed", {}).pop(key, None)
            block.get("search", {}).pop(key, None)


def read_cli_value(text: str) -> Any:
    """A ``--set`` value (every command's) as the space files read YAML: "0.01" and "1e-3"
    are floats, "[0, 1]" a list, "true" a bool; text that does not parse stays text."""
    try:
        return yaml.load(text, Loader=_SpaceLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError:
        return text


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _did_you_mean(word: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), list(known), n=1, cutoff=0.75)
    return f"; did you mean {close[0]!r}?" if close else ""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())
