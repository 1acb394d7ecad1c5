"""Search spaces: every shipped space loads and suggests configs the methods accept, grids
enumerate exactly, overrides re-validate, and every validation error is one line naming
the file, the key and the problem."""

from __future__ import annotations

import textwrap
from pathlib import Path

import optuna
import pytest
from ray import cloudpickle

from croft_search.contract import DEFAULT_SPACE
from croft_search.errors import ConfigError
from croft_search.search.optuna_bridge import make_sampler, run_configs, study_directions, suggest
from croft_search.search.space import (
    GRID_POINT,
    METHOD_PARAM_SEPARATOR,
    SearchSpace,
    load_space,
    space_names,
)
from croft_search.trial.runner import split_config
from trainables.registry import method_names, resolve_hparams

optuna.logging.set_verbosity(optuna.logging.WARNING)

NINE_METHODS = {
    "zsclip",
    "linear_probe",
    "plp",
    "coop",
    "cocoop",
    "clip_adapter",
    "tip_adapter_f",
    "dplclip",
    "croft",
}
# What every config holds besides the method's fixed and searched values.
TRIAL_KEYS = {"method", "dataset", "target_domain", "backbone", "pretrained"} | {
    "objective_weight",
    "seed",
}
REQUIRED_SPACES = (
    {"croft_pacs", "croft_vlcs", "croft_digits", "baselines_digits"}
    | {"ablation_croft_digits", "ablation_croft_pacs"}
    | {f"{method}_{dataset}" for method in NINE_METHODS for dataset in ("digits", "pacs")}
)


def study_for(space: SearchSpace, seed: int = 0) -> optuna.Study:
    return optuna.create_study(
        directions=study_directions(space), sampler=make_sampler(space, seed)
    )


def ask_configs(space: SearchSpace, count: int, seed: int = 0) -> list[dict]:
    """``count`` suggested configs, each told a made-up result so model-based samplers
    move past their start-up phase."""
    study = study_for(space, seed)
    configs = []
    for index in range(count):
        trial = study.ask()
        configs.append(suggest(space, trial))
        values = [((index * 7) % 11) / 10.0 for _ in space.metric_names()]
        study.tell(trial, values if len(values) > 1 else values[0])
    return configs


def assert_runs(space: SearchSpace, config: dict) -> None:
    """Every run_trial config of ``config`` passes run_trial's own checks."""
    for run_config in run_configs(config):
        settings, hparams = split_config(run_config)
        assert settings["method"] in space.methods
        resolve_hparams(settings["method"], hparams)


def write(tmp_path: Path, text: str, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


MINIMAL = """\
method: croft
fixed: {epochs: 2}
search:
  lambda1: {uniform: [0, 15]}
num_samples: 4
"""


# --------------------------------------------------------------------- shipped spaces


def test_every_required_space_ships():
    assert REQUIRED_SPACES <= set(space_names())
    assert DEFAULT_SPACE == "croft_digits"
    assert set(load_space("baselines_digits").methods) == NINE_METHODS


@pytest.mark.parametrize("name", space_names())
def test_shipped_space_suggests_configs_every_method_accepts(name):
    space = load_space(name)
    assert space.name == name
    assert space.description
    grid = space.grid_size()
    configs = ask_configs(space, grid if grid is not None else 12)
    for config in configs:
        assert config["dataset"] == space.dataset
        assert config["backbone"] == space.backbone
        assert_runs(space, config)
    if grid is not None:
        distinct = {tuple(sorted((k, repr(v)) for k, v in c.items())) for c in configs}
        assert len(distinct) == grid == space.num_samples


@pytest.mark.parametrize("name", space_names())
def test_to_yaml_reloads_to_an_equal_space(name, tmp_path):
    space = load_space(name)
    reloaded = load_space(write(tmp_path, space.to_yaml(), "resolved.yaml"))
    assert reloaded == space
    assert reloaded.to_yaml().split("\n", 1)[1] == space.to_yaml().split("\n", 1)[1]


def test_croft_spaces_search_what_the_issue_names():
    expected = {"lambda1", "lambda2", "n_ctx", "lr", "ratio_image", "ratio_text"}
    for name, contexts in (("croft_digits", (0, 4, 8)), ("croft_pacs", (0, 4, 8, 16))):
        space = load_space(name)
        assert set(space.search["croft"]) == expected
        assert space.search["croft"]["n_ctx"].choices == contexts
    pacs = load_space("croft_pacs")
    assert (pacs.backbone, pacs.pretrained, pacs.dataset) == ("ViT-B-16", "openai", "PACS")
    assert load_space("croft_vlcs").dataset == "VLCS"


def test_search_wide_settings_for_the_driver(tmp_path):
    space = load_space("croft_digits")
    assert space.target_domain_list() == ["photo", "sketch", "cartoon", "painting"]
    assert space.setting("views") == 8 and space.setting("selection") == "val"
    assert space.max_epochs() == 20 == space.scheduler["max_t"]
    assert load_space("plp_digits").max_epochs() == 300
    text = MINIMAL.replace("epochs: 2", "epochs: 2, views: 2") + "target_domains: SKETCH\n"
    one = load_space(write(tmp_path, text))
    assert one.target_domain_list() == ["sketch"] and one.setting("views") == 2
    with pytest.raises(ConfigError, match="not a shared trial setting"):
        space.setting("lr")


def test_unknown_space_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown search space 'croft_digit'.*croft_digits"):
        load_space("croft_digit")
    with pytest.raises(ConfigError, match="missing.yaml: no such search-space file"):
        load_space("/nonexistent/missing.yaml")


# ------------------------------------------------------------------- the suggestions


def test_single_method_config_is_ready_for_run_trial():
    space = load_space("croft_digits")
    config = ask_configs(space, 1)[0]
    assert config["method"] == "croft"
    assert config["target_domain"] == "all"
    assert config["objective_weight"] == 0.5
    assert config["seed"] == 0
    assert config["epochs"] == 20
    assert 0 <= config["lambda1"] <= 15 and 0.1 <= config["lambda2"] <= 1000
    assert config["n_ctx"] in (0, 4, 8)
    assert run_configs(config) == [config]
    assert space.metric_names() == ["objective"] and space.modes() == ["max"]
    assert isinstance(make_sampler(space, 0), optuna.samplers.TPESampler)


def test_multi_method_parameters_are_conditional_on_the_method():
    space = load_space("baselines_digits")
    assert space.is_conditional
    study = study_for(space)
    seen = set()
    for index in range(40):
        trial = study.ask()
        config = suggest(space, trial)
        method = config["method"]
        seen.add(method)
        # Optuna names are method-prefixed, and only the chosen method's are suggested.
        assert all(name in ("method",) or name.startswith(f"{method}.") for name in trial.params), (
            trial.params
        )
        for key in space.search[method]:
            assert config[key] == trial.params[f"{method}.{key}"]
        allowed = TRIAL_KEYS | set(space.fixed[method]) | set(space.search[method])
        assert set(config) <= allowed, set(config) - allowed
        # Ray merges Optuna's names into the config it hands over; run_configs drops them.
        merged = {**trial.params, **config}
        assert run_configs(merged) == [config]
        assert_runs(space, merged)
        study.tell(trial, (index % 5) / 5)
    assert len(seen) >= 5


@pytest.mark.parametrize("name", ["baselines_digits", "ablation_croft_digits"])
def test_ray_tune_optuna_searcher_drives_the_space(name):
    """Ray's OptunaSearch wraps the trial and merges Optuna's parameter names into the
    config; run_configs turns that back into run_trial configs, and telling the last grid
    point completes it (plain GridSampler would raise inside Ray and leave it RUNNING)."""
    from ray.tune.search.optuna import OptunaSearch

    space = load_space(name)
    metrics, modes = space.metric_names(), space.modes()
    searcher = OptunaSearch(
        space=lambda trial: suggest(space, trial),
        metric=metrics[0] if len(metrics) == 1 else metrics,
        mode=modes[0] if len(modes) == 1 else modes,
        sampler=make_sampler(space, 0),
    )
    count = space.grid_size() or 12
    for index in range(count):
        config = searcher.suggest(f"trial_{index}")
        for run_config in run_configs(config):
            assert METHOD_PARAM_SEPARATOR not in "".join(run_config)
            assert_runs(space, run_config)
        searcher.on_trial_complete(f"trial_{index}", {"objective": 0.5})
    states = {trial.state for trial in searcher._ot_study.trials}
    assert states == {optuna.trial.TrialState.COMPLETE}


def test_ablation_grid_is_variants_times_seeds():
    space = load_space("ablation_croft_digits")
    components = ["full", "no_generator", "no_edr", "image_only", "text_only", "edr_id_only"]
    switches = [
        "lc_norm", "gen_moves_adapters", "gen_optimizer", "gen_in_main_step", "shift_readapt",
        "shift_partner", "edr_delta", "edr_shared_delta", "edr_transpose",
        "edr_stack_shifted", "edr_shifted_readapt",
    ]  # fmt: skip
    variants = components + ["reference"] + [f"sw_{name}" for name in switches]
    assert list(space.variants) == variants
    # Each switch arm flips its switch to the reference's value and nothing else.
    reference = resolve_hparams("croft", {"implementation": "reference"})
    for name in switches:
        arm = space.variants[f"sw_{name}"]
        assert arm["implementation"] == "custom" and arm[name] == reference[name]
    assert space.seeds == (0, 1, 2)
    assert space.grid_size() == space.num_samples == 3 * len(variants)
    configs = ask_configs(space, 3 * len(variants))
    assert sorted((c["variant"], c["seed"]) for c in configs) == sorted(
        (v, s) for v in variants for s in (0, 1, 2)
    )
    for config in configs:
        expected = {
            "lambda1": 5.0,
            "lambda2": 1.0,
            "gen_steps": 1,
            "ratio_image": 0.2,
            "ratio_text": 0.5,
            "edr_on_shifted": True,
        }
        expected |= space.variants[config["variant"]]
        assert {key: config[key] for key in expected} == expected
        (run_config,) = run_configs(config)
        assert "variant" not in run_config and run_config["seed"] == config["seed"]
    by_variant = {c["variant"]: c for c in configs}
    assert (
        by_variant["no_generator"]["lambda1"] == 0 and by_variant["no_generator"]["gen_steps"] == 0
    )
    assert by_variant["no_edr"]["lambda2"] == 0
    assert by_variant["image_only"]["ratio_text"] == 0
    assert by_variant["text_only"]["ratio_image"] == 0
    assert by_variant["edr_id_only"]["edr_on_shifted"] is False


def test_grid_over_several_methods_walks_one_grid_point_axis(tmp_path):
    space = load_space(
        write(
            tmp_path,
            """\
            method: [zsclip, croft]
            fixed: {shots: 4}
            methods:
              zsclip: {search: {ensemble: {grid: [false, true]}}}
              croft:
                fixed: {epochs: 2}
                search: {lambda1: {grid: [0, 5, 15]}, gen_steps: {int: [0, 2], step: 2}}
            sampler: grid
            seeds: [0, 1]
            """,
            "grid.yaml",
        )
    )
    assert space.grid_size() == (2 + 3 * 2) * 2 == space.num_samples
    study = study_for(space)
    configs = []
    for _ in range(space.grid_size()):
        trial = study.ask()
        configs.append(suggest(space, trial))
        assert set(trial.params) == {GRID_POINT}
        study.tell(trial, 0.5)
    distinct = {tuple(sorted((k, repr(v)) for k, v in c.items())) for c in configs}
    assert len(distinct) == 16
    assert {c["gen_steps"] for c in configs if c["method"] == "croft"} == {0, 2}
    assert all("lambda1" not in c for c in configs if c["method"] == "zsclip")
    assert run_configs({**configs[0], GRID_POINT: 3}) == [configs[0]]


def test_several_seeds_outside_a_grid_average_within_a_trial(tmp_path):
    space = load_space(write(tmp_path, MINIMAL + "seeds: [3, 4]\n", "seeds.yaml"))
    config = ask_configs(space, 1)[0]
    assert config["seeds"] == [3, 4] and "seed" not in config
    runs = run_configs(config)
    assert [run["seed"] for run in runs] == [3, 4]
    assert run_configs(dict(config)) == runs
    assert all("seeds" not in run for run in runs)


def test_pareto_objective_names_metrics_and_directions(tmp_path):
    path = write(
        tmp_path,
        MINIMAL + "objective: {pareto: {val_acc: max, val_auroc: max, val_fpr95: min}}\n"
        "sampler: nsga2\n",
        "pareto.yaml",
    )
    space = load_space(path)
    assert space.metric_names() == ["val_acc", "val_auroc", "val_fpr95"]
    assert space.modes() == ["max", "max", "min"]
    assert isinstance(make_sampler(space, 0), optuna.samplers.NSGAIISampler)
    config = ask_configs(space, 3)[0]
    assert "objective_weight" not in config
    # A list takes each metric's natural direction.
    listed = write(tmp_path, MINIMAL + "objective: {pareto: [val_acc, val_fpr95]}\n", "listed.yaml")
    assert load_space(listed).modes() == ["max", "min"]
    # Pareto with the grid sampler is fine.
    grid = write(
        tmp_path,
        "method: croft\nsearch: {lambda1: {grid: [0, 5]}}\nsampler: grid\n"
        "objective: {pareto: [val_acc, val_auroc]}\n",
        "pareto_grid.yaml",
    )
    assert len(ask_configs(load_space(grid), 2)) == 2
    # Test metrics select on test data: only where the space says so.
    oracle = write(
        tmp_path,
        MINIMAL.replace("fixed: {epochs: 2}", "fixed: {epochs: 2, selection: oracle}")
        + "objective: {pareto: [test_acc, test_auroc]}\n",
        "oracle.yaml",
    )
    assert load_space(oracle).metric_names() == ["test_acc", "test_auroc"]


def test_samplers_are_built_and_seeded(tmp_path):
    random_space = load_space(write(tmp_path, MINIMAL + "sampler: random\n", "random.yaml"))
    assert isinstance(make_sampler(random_space, 1), optuna.samplers.RandomSampler)
    first = ask_configs(random_space, 3, seed=5)
    assert ask_configs(random_space, 3, seed=5) == first
    assert ask_configs(random_space, 3, seed=6) != first
    grid = load_space("zsclip_digits")
    assert isinstance(make_sampler(grid, 0), optuna.samplers.GridSampler)
    assert load_space("croft_digits").grid_size() is None


def test_yaml_reads_exponents_as_numbers(tmp_path):
    path = write(
        tmp_path, MINIMAL.replace("lambda1: {uniform: [0, 15]}", "lr: {loguniform: [1e-4, 1e-2]}")
    )
    param = load_space(path).search["croft"]["lr"]
    assert (param.low, param.high) == (1e-4, 1e-2)


def test_scheduler_defaults_max_t_to_the_most_epochs(tmp_path):
    space = load_space(write(tmp_path, MINIMAL + "scheduler: asha\n"))
    assert space.scheduler == {"grace_period": 1, "reduction_factor": 4, "max_t": 2}
    assert load_space(write(tmp_path, MINIMAL + "scheduler: none\n")).scheduler is None


# -------------------------------------------------------------------------- overrides


def test_overrides_fix_values_and_change_the_budget():
    space = load_space("croft_digits")
    changed = space.with_overrides(
        num_samples=4, fixed_overrides={"lambda1": "3", "epochs": "5", "views": 2}
    )
    assert changed.num_samples == 4
    assert changed.fixed["croft"]["lambda1"] == 3.0
    assert "lambda1" not in changed.search["croft"]
    assert changed.scheduler["max_t"] == 5
    config = ask_configs(changed, 1)[0]
    assert (config["lambda1"], config["epochs"], config["views"]) == (3.0, 5, 2)
    assert space.fixed["croft"]["epochs"] == 20  # the original is untouched
    assert space.with_overrides() == space


def test_overrides_of_top_level_keys():
    space = load_space("croft_digits").with_overrides(
        fixed_overrides={
            "target_domain": "sketch",
            "objective_weight": "0.7",
            "seeds": "[1, 2]",
            "sampler": "random",
        }
    )
    assert space.target_domains == ("sketch",)
    assert space.objective.weight == 0.7
    assert space.seeds == (1, 2)
    config = ask_configs(space, 1)[0]
    assert config["target_domain"] == "sketch" and config["seeds"] == [1, 2]


def test_grid_size_follows_overrides():
    space = load_space("ablation_croft_digits").with_overrides(fixed_overrides={"seeds": "[0]"})
    assert space.grid_size() == space.num_samples == len(space.variants)


def test_per_method_override_in_a_multi_method_space():
    space = load_space("baselines_digits").with_overrides(
        fixed_overrides={"coop.lr": "0.01", "shots": "4"}
    )
    assert space.fixed["coop"]["lr"] == 0.01
    assert "lr" not in space.search["coop"]
    assert "lr" in space.search["croft"]
    assert all(space.fixed[m]["shots"] == 4 for m in space.methods)


def test_bad_override_names_the_override():
    with pytest.raises(ConfigError) as caught:
        load_space("croft_digits").with_overrides(fixed_overrides={"lamda1": "3"})
    assert str(caught.value).startswith(
        "search_spaces/croft_digits.yaml with lamda1=3: fixed.lamda1: "
        "unknown hyper-parameter 'lamda1' for croft"
    )
    with pytest.raises(ConfigError, match="num_samples: must be an integer >= 1, got 0"):
        load_space("croft_digits").with_overrides(num_samples=0)
    grid = load_space("ablation_croft_digits")
    points = 3 * len(grid.variants)
    with pytest.raises(ConfigError, match=f"exceeds the grid's {points} points"):
        grid.with_overrides(num_samples=points + 1)


# ------------------------------------------------------------------ validation errors

BAD_SPACES = [
    # (YAML, the key path, fragments of the problem)
    (MINIMAL.replace("uniform: [0, 15]", "uniform: [5, 1]"), "search.lambda1", "low 5 > high 1"),
    (MINIMAL.replace("method: croft", "method: crof"), "method", "unknown method 'crof'"),
    (
        MINIMAL.replace("lambda1:", "lamda1:"),
        "search.lamda1",
        "unknown hyper-parameter 'lamda1' for croft; did you mean 'lambda1'? (known: ",
    ),
    (
        MINIMAL.replace("fixed: {epochs: 2}", "fixed: {epochs: 2, lamda1: 3}"),
        "fixed.lamda1",
        "unknown hyper-parameter 'lamda1' for croft",
    ),
    (
        MINIMAL.replace("lambda1: {uniform: [0, 15]}", "lr: {loguniform: [0, 0.1]}"),
        "search.lr",
        "loguniform needs low > 0",
    ),
    (
        MINIMAL + "objective: {pareto: {acc: max, val_auroc: max}}\n",
        "objective.pareto",
        "unknown metric 'acc' (known: val_acc, val_auroc, val_fpr95)",
    ),
    (
        MINIMAL + "objective: {pareto: {val_acc: max, test_auroc: max}}\n",
        "objective.pareto",
        "allowed only with fixed: {selection: oracle}",
    ),
    (
        MINIMAL + "objective: {pareto: {val_acc: max, val_fpr95: max}}\n",
        "objective.pareto.val_fpr95",
        "direction min",
    ),
    (MINIMAL + "objective: {pareto: [val_acc]}\n", "objective.pareto", "two or more metrics"),
    (MINIMAL + "objective: {joint: 1.5}\n", "objective.joint", "must be in [0, 1], got 1.5"),
    (MINIMAL + "sampler: cmaes\n", "sampler", "sampler 'cmaes' unknown (use tpe, nsga2"),
    (
        "method: croft\nfixed:\n  epochs: 2\n    shots: 4\n",
        None,
        "not valid YAML (line 4, column 10: mapping values are not allowed here)",
    ),
    (
        "method: croft\nfixed: {epochs: 2}\nfixed: {shots: 2}\nnum_samples: 2\n",
        None,
        "not valid YAML (line 3, column 1: duplicate key 'fixed')",
    ),
    (MINIMAL.replace("search:", "serch:"), None, "unknown top-level key 'serch'; did you mean"),
    (
        MINIMAL.replace("epochs: 2", "epochs: two"),
        "fixed.epochs",
        "must be of type int (for croft)",
    ),
    (MINIMAL.replace("epochs: 2", "lambda1: -1"), "fixed.lambda1", "below its minimum 0.0"),
    (
        MINIMAL.replace("uniform: [0, 15]", "uniform: [0, 500]"),
        "search.lambda1",
        "lambda1=500.0 is above its maximum 100.0",
    ),
    (
        MINIMAL.replace("lambda1: {uniform: [0, 15]}", "n_ctx: {choice: [0, 4, 32]}"),
        "search.n_ctx",
        "32 is above its maximum 16",
    ),
    (
        MINIMAL.replace("lambda1: {uniform: [0, 15]}", "n_ctx: {uniform: [0, 8]}"),
        "search.n_ctx",
        "n_ctx is an integer for croft; use int",
    ),
    (
        MINIMAL.replace("lambda1: {uniform: [0, 15]}", "edr_on_shifted: {uniform: [0, 1]}"),
        "search.edr_on_shifted",
        "use choice",
    ),
    (
        MINIMAL.replace("lambda1: {uniform: [0, 15]}", "gen_steps: {int: [0, 10], step: 3}"),
        "search.gen_steps",
        "step 3 does not divide [0, 10]",
    ),
    (MINIMAL + "dataset: mnist\n", "dataset", "unknown dataset 'mnist'"),
    (MINIMAL + "dataset: DTD\n", "dataset", "DTD is an open-set dataset"),
    (MINIMAL + "target_domains: clipart\n", "target_domains", "unknown domain 'clipart'"),
    (MINIMAL + "backbone: ViT-B-61\n", "backbone", "unknown open_clip model 'ViT-B-61'"),
    (MINIMAL + "pretrained: openia\n", "pretrained", "neither an open_clip tag"),
    (MINIMAL.replace("num_samples: 4", "num_samples: 0"), "num_samples", ">= 1, got 0"),
    (MINIMAL.replace("num_samples: 4\n", ""), "num_samples", "missing"),
    (
        MINIMAL.replace("lambda1: {uniform: [0, 15]}", "lr: {loguniform: [1.0e-4, 1.0e-2]}")
        + "sampler: grid\n",
        "search.lr",
        "the grid sampler needs discrete values and loguniform is continuous",
    ),
    (
        MINIMAL.replace("uniform: [0, 15]", "grid: [0, 15]"),
        "search.lambda1",
        "grid values need sampler: grid",
    ),
    (
        MINIMAL.replace("fixed: {epochs: 2}", "fixed: {epochs: 2, lambda1: 3}"),
        "search.lambda1",
        "also fixed",
    ),
    (
        MINIMAL.replace("fixed: {epochs: 2}", "fixed: {backbone: RN50}"),
        "fixed.backbone",
        "set it with the top-level key backbone",
    ),
    (
        MINIMAL.replace("fixed: {epochs: 2}", "fixed: {score: entropy}"),
        "fixed.score",
        "unknown OOD score 'entropy'",
    ),
    (
        MINIMAL + "variants: {full: {}, no_edr: {lamda2: 0}}\n",
        "variants.no_edr.lamda2",
        "unknown hyper-parameter 'lamda2' for croft",
    ),
    (MINIMAL + "seeds: [0, 0]\n", "seeds", "lists a seed twice"),
    (
        MINIMAL + "scheduler: {asha: {grace_period: 5}}\n",
        "scheduler.asha.grace_period",
        "5 exceeds max_t 2",
    ),
    (
        "method: zsclip\nsearch: {ensemble: {choice: [false, true]}}\nnum_samples: 2\n"
        "scheduler: asha\n",
        "scheduler",
        "no method here trains for epochs",
    ),
    (
        "method: [zsclip, coop]\nfixed: {C: 1.0}\nnum_samples: 2\n",
        "fixed.C",
        "unknown hyper-parameter 'C' for zsclip",
    ),
    (
        "method: [zsclip, coop]\nmethods: {coop: {fixed: {views: 2}}}\nnum_samples: 2\n",
        "methods.coop.fixed.views",
        "set it in the top-level fixed block",
    ),
    (
        "method: [zsclip, coop]\nmethods: {croft: {}}\nnum_samples: 2\n",
        "methods.croft",
        "not in this space's method list",
    ),
    (
        "method: croft\nsearch: {lambda1: {grid: [0, 5]}}\nsampler: grid\nnum_samples: 3\n",
        "num_samples",
        "3 exceeds the grid's 2 points",
    ),
    ("- method: croft\n", None, "a search space is a mapping of keys, not a list"),
]


@pytest.mark.parametrize(("text", "key", "problem"), BAD_SPACES)
def test_validation_errors_name_file_key_and_problem(tmp_path, text, key, problem):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_space(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    if key is not None:
        assert message.startswith(f"{path}: {key}: "), message
    assert problem in message, message


def test_unknown_method_lists_the_known_ones(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_space(write(tmp_path, MINIMAL.replace("method: croft", "method: crof")))
    assert f"(known: {', '.join(method_names())})" in str(caught.value)


def test_packaged_space_errors_name_the_packaged_file(monkeypatch):
    import croft_search.search.space as spaces

    original = spaces.load_space_text

    def broken(text, source, default_name):
        return original(text.replace("lambda1: {uniform: [0, 15]}", "lamda1: {uniform: [0, 1]}"),
                        source, default_name)  # fmt: skip

    monkeypatch.setattr(spaces, "load_space_text", broken)
    with pytest.raises(ConfigError, match=r"^search_spaces/croft_digits.yaml: search.lamda1: "):
        spaces.load_space("croft_digits")


def test_untrained_weights_can_be_named_in_a_space(tmp_path: Path) -> None:
    space = load_space(str(write(tmp_path, MINIMAL + "pretrained: random\n", "random.yaml")))
    assert space.pretrained == "random"
    assert space.with_overrides(fixed_overrides={"pretrained": "default"}).pretrained == "default"


@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "random", "grid"])
def test_every_sampler_survives_the_pickling_ray_tune_does(tmp_path, sampler):
    # Ray Tune pickles its searcher, sampler included, when it builds the Tuner and at every
    # experiment checkpoint; Optuna 5.1's genetic samplers hold an unpicklable lock.
    body = MINIMAL + f"sampler: {sampler}\n"
    if sampler == "grid":
        body = body.replace("{uniform: [0, 15]}", "{grid: [0, 5, 15]}").replace(
            "num_samples: 4\n", ""
        )
    space = load_space(write(tmp_path, body, f"{sampler}.yaml"))
    original = make_sampler(space, 3)
    restored = cloudpickle.loads(cloudpickle.dumps(original))
    assert type(restored) is type(original)
    directions = ["maximize"] * len(space.metric_names())
    study = optuna.create_study(directions=directions, sampler=restored)
    for number in range(3):
        trial = study.ask()
        lambda1 = trial.suggest_float("lambda1", 0, 15)
        study.tell(trial, [float(number)] * len(directions))
        assert 0 <= lambda1 <= 15
    assert len(study.trials) == 3
    # The restored sampler is usable again after a second round-trip.
    cloudpickle.loads(cloudpickle.dumps(restored))


def test_the_reference_recipe_sets_the_epochs_asha_runs_to(tmp_path):
    # Tip-Adapter-F trains 20 epochs by default and 50 under the reference recipe.
    body = (
        "method: tip_adapter_f\nfixed: {recipe: reference}\n"
        "search:\n  lr: {loguniform: [1.0e-4, 1.0e-2]}\n"
        "scheduler: {asha: {grace_period: 2}}\nnum_samples: 2\n"
    )
    space = load_space(write(tmp_path, body, "tip_reference.yaml"))
    assert space.max_epochs() == 50 == space.scheduler["max_t"]
    ours = load_space(write(tmp_path, body.replace("{recipe: reference}", "{}"), "tip_ours.yaml"))
    assert ours.max_epochs() == 20
