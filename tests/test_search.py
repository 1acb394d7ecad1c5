"""End-to-end searches on the embedded digits data with a random-init tiny CLIP: results
table, MLflow parent/child runs, failed-trial isolation, resume after SIGKILL, and a local
two-node Ray cluster. Slow (Ray start-up), so marked; CI runs them."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from searches import RAY, gcs_address, write_space

from croft_search.run import main as run_main
from croft_search.search.ray_engine import SearchOptions, concurrent_slots, run_search
from croft_search.search.ray_populations import (
    CPU_POPULATION,
    MEMBERS,
    RUNG_HISTORY,
    RUNGS_REACHED,
    PopulationSearch,
    default_population,
)
from croft_search.search.space import load_space
from croft_search.trial.runner import run_trial

pytestmark = pytest.mark.slow
TUNE_RESULT_FILES = {"progress.csv", "result.json"}


CROFT_BODY = """method: croft
fixed: {epochs: 2, shots: 2, views: 2}
search:
  lambda2: {loguniform: [0.1, 10]}
objective: {joint: 0.5}
sampler: random
scheduler: none
num_samples: 3
"""


def search_here(space, tmp_path: Path, digits_root: Path, name: str, uri: str, population=1):
    """One in-process search of ``space`` with everything under ``tmp_path``, one trial per
    configuration unless ``population`` says otherwise."""
    options = SearchOptions(
        population=population,
        storage=tmp_path / "runs",
        name=name,
        tracking_uri=uri,
        data_root=str(digits_root),
        cache_dir=str(tmp_path / "cache"),
        verbose=0,
    )
    return run_search(space, options)


def children(tracking_uri: str, experiment: str, parent: str):
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    return client, runs


def test_search_writes_parquet_and_mlflow_parent_child(tmp_path, weights, digits_root):
    space = load_space(str(write_space(tmp_path, "croft_tiny", weights, CROFT_BODY)))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    outcome = search_here(space, tmp_path, digits_root, "s1", uri)
    frame = pd.read_parquet(outcome.folder / "trials.parquet")
    assert len(frame) == 3 and frame["trial_id"].is_unique
    # Results live in trials.parquet and MLflow only; Ray Tune's own per-trial result files
    # are switched off for the search, and the switch is put back afterwards.
    assert not [p.name for p in outcome.folder.rglob("*") if p.name in TUNE_RESULT_FILES]
    assert "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS" not in os.environ
    assert set(frame["status"]) == {"ok"}
    assert {"config/lambda2", "val_acc", "test_auroc", "objective", "node", "wall_seconds"} <= set(
        frame.columns
    )
    assert frame["config/lambda2"].between(0.1, 10).all()
    assert len(outcome.best) == 1
    assert outcome.best[0]["objective"] == pytest.approx(frame["objective"].max())

    client, runs = children(uri, "croft_tiny", outcome.parent_run_id)
    assert len(runs) == 3
    assert {r.info.run_id for r in runs} == set(frame["mlflow_run_id"])
    run = runs[0]
    assert run.data.params["method"] == "croft" and "lambda2" in run.data.params
    assert {"test_acc", "val_auroc", "objective"} <= set(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "epoch_val_acc")) == 2
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(outcome.parent_run_id)}
    assert {"space.yaml", "summary.json"} <= artifacts
    study = optuna.load_study(study_name="s1", storage=f"sqlite:///{outcome.folder / 'optuna.db'}")
    assert len(study.get_trials(states=[optuna.trial.TrialState.COMPLETE])) == 3
    assert sorted(t.value for t in study.trials) == sorted(frame["objective"])


def test_a_search_without_address_ignores_a_cluster_left_behind(tmp_path, weights, digits_root):
    # A Ray head killed without `ray stop` leaves its address in the Ray temp folder's
    # ray_current_cluster; a search given no --address must start its own instance instead
    # of waiting minutes on that address (a CI run failed so).
    ray_temp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # unix sockets: a short path
    try:
        (ray_temp / "ray").mkdir()
        (ray_temp / "ray" / "ray_current_cluster").write_text("192.0.2.2:40465\n")
        space = write_space(tmp_path, "croft_tiny", weights, CROFT_BODY.replace(
            "num_samples: 3", "num_samples: 1"))  # fmt: skip
        env = {**os.environ, "RAY_TMPDIR": str(ray_temp), "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)
        done = subprocess.run(
            [sys.executable, "-m", "croft_search.run", "--space", str(space), "--name", "s",
             "--storage", str(tmp_path / "runs"), "--data-root", str(digits_root),
             "--cache-dir", str(tmp_path / "cache"),
             "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        frame = pd.read_parquet(tmp_path / "runs" / "croft_tiny" / "s" / "trials.parquet")
        assert list(frame["status"]) == ["ok"]
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)


def test_a_search_runs_the_protocol_its_space_fixes(tmp_path, weights, digits_root):
    # The features a search loads once must be the ones its trials' protocol needs: the
    # reference's open-set splits, every test open set, the crop scale's views.
    fixed = (
        "fixed: {epochs: 2, shots: 2, views: 2, score: knn, eval_protocol: reference,\n"
        "        crop_scale: 0.08, view_order: epoch,\n"
        "        test_open_sets: 'digits_open_test,digits_open_val'}"
    )
    body = CROFT_BODY.replace("fixed: {epochs: 2, shots: 2, views: 2}", fixed)
    body = body.replace("num_samples: 3", "num_samples: 1")
    space = load_space(str(write_space(tmp_path, "croft_protocol", weights, body)))
    outcome = search_here(space, tmp_path, digits_root, "r", f"sqlite:///{tmp_path / 'm.db'}")
    row = pd.read_parquet(outcome.folder / "trials.parquet").iloc[0]
    assert row["status"] == "ok"
    assert row["protocol"] == (
        "eval=reference;checkpoint=last;shots_per=class_and_domain;val_shots=0;"
        "crop_scale=0.08;recipe=ours;test_open_sets=digits_open_test,digits_open_val"
    )
    per_set = (row["test_auroc_digits_open_test"] + row["test_auroc_digits_open_val"]) / 2
    assert row["test_auroc"] == pytest.approx(per_set)
    assert row["test_auroc"] == pytest.approx(row["test_knn10_auroc"])
    assert any(p.name.startswith("aug2s0c0.08") for p in (tmp_path / "cache").rglob("*"))


def test_pareto_search_returns_the_validation_pareto_set(tmp_path, weights, digits_root):
    body = CROFT_BODY.replace("num_samples: 3", "num_samples: 4").replace(
        "objective: {joint: 0.5}\nsampler: random",
        "objective: {pareto: {val_acc: max, val_fpr95: min}}\nsampler: nsga2",
    )
    space = load_space(str(write_space(tmp_path, "croft_pareto", weights, body)))
    outcome = search_here(space, tmp_path, digits_root, "p", f"sqlite:///{tmp_path / 'm.db'}")
    frame = pd.read_parquet(outcome.folder / "trials.parquet")
    assert len(frame) == 4 and set(frame["status"]) == {"ok"}
    # The reported best is exactly the non-dominated set over (val_acc max, val_fpr95 min).
    dominated = [
        any(
            o.val_acc >= r.val_acc and o.val_fpr95 <= r.val_fpr95
            and (o.val_acc > r.val_acc or o.val_fpr95 < r.val_fpr95)
            for o in frame.itertuples()
        )
        for r in frame.itertuples()
    ]  # fmt: skip
    expected = set(frame.loc[[not d for d in dominated], "trial_id"])
    assert {row["trial_id"] for row in outcome.best} == expected
    study = optuna.load_study(study_name="p", storage=f"sqlite:///{outcome.folder / 'optuna.db'}")
    assert study.directions == [
        optuna.study.StudyDirection.MAXIMIZE,
        optuna.study.StudyDirection.MINIMIZE,
    ]
    done = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    assert sorted(tuple(t.values) for t in done) == sorted(
        zip(frame["val_acc"], frame["val_fpr95"], strict=True)
    )


def test_failed_trial_is_recorded_and_the_search_goes_on(tmp_path, weights, digits_root):
    body = """method: coop
fixed: {epochs: 1, shots: 2, views: 1}
search:
  n_ctx: {choice: [4, 13]}
objective: {joint: 0.5}
sampler: grid
scheduler: none
"""  # n_ctx 13 plus a class name does not fit tiny-digits' 16-token context: that trial fails
    space = load_space(str(write_space(tmp_path, "coop_tiny", weights, body)))
    outcome = search_here(space, tmp_path, digits_root, "f", f"sqlite:///{tmp_path / 'm.db'}")
    frame = pd.read_parquet(outcome.folder / "trials.parquet").set_index("config/n_ctx")
    assert frame.loc[4, "status"] == "ok" and frame.loc[13, "status"] == "failed"
    assert "context length" in frame.loc[13, "error"]
    assert "\n" not in frame.loc[13, "error"]
    assert outcome.failed == 1


@pytest.mark.parametrize(
    "extra", [["--population", "1"], ["--population", "2"]], ids=["trials", "populations"]
)
def test_resume_after_sigkill_neither_loses_nor_duplicates(tmp_path, weights, digits_root, extra):
    # Enough samples that the kill lands mid-search: a population of 2 records its rows in
    # well under a second, so 6 samples were once all recorded between two polls.
    samples = 10
    body = (
        CROFT_BODY.replace("num_samples: 3", f"num_samples: {samples}")
        .replace("epochs: 2", "epochs: 3")
        .replace("shots: 2", "shots: 8")
    )
    space_file = write_space(tmp_path, "croft_resume", weights, body)
    env = {**os.environ, "CROFT_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    argv = [
        sys.executable,
        "-m",
        "croft_search.run",
        "--space",
        str(space_file),
        "--name",
        "r",
        "--storage",
        str(tmp_path / "runs"),
        "--data-root",
        str(digits_root),
        "--max-concurrent",
        "1",
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'm.db'}",
        *extra,
    ]
    table = tmp_path / "runs" / "croft_resume" / "r" / "trials.parquet"
    driver = subprocess.Popen(
        argv,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and driver.poll() is None:
            if table.exists() and len(pd.read_parquet(table)) >= 2:
                break
            time.sleep(0.1)
        assert driver.poll() is None, "the search finished before it could be interrupted"
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        # SIGKILL leaves the driver's local Ray processes behind; the test owns them.
        os.killpg(driver.pid, signal.SIGKILL) if driver.poll() is None else None
        subprocess.run([RAY, "stop", "--force"], capture_output=True, env=env)
    before = pd.read_parquet(table)
    assert 2 <= len(before) < samples

    done = subprocess.run(
        [*argv, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, done.stderr[-2000:]
    after = pd.read_parquet(table)
    assert len(after) == samples and after["trial_id"].is_unique
    assert set(before["trial_id"]) <= set(after["trial_id"])
    meta = json.loads((table.parent / "search.json").read_text())
    _, runs = children(meta["tracking_uri"], "croft_resume", meta["mlflow_parent_run_id"])
    trial_tags = [r.data.tags["croft.trial_id"] for r in runs]
    assert len(trial_tags) == len(set(trial_tags)) == samples


def test_a_space_mixing_batchable_and_unbatchable_variants_trains_every_one(tmp_path, digits_root):
    """CRoFT's reference implementation does not batch; in a population search of a space
    whose other variant does, each of its configs trains alone, as run_trial would."""
    body = """method: croft
fixed: {epochs: 2, shots: 2, views: 2}
variants:
  full: {}
  reference: {implementation: reference}
objective: {joint: 0.5}
sampler: grid
scheduler: none
seeds: [0, 1]
"""
    space = load_space(str(write_space(tmp_path, "croft_mixed", "default", body)))
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    outcome = search_here(space, tmp_path, digits_root, "mixed", uri, population=2)
    frame = pd.read_parquet(outcome.folder / "trials.parquet")
    assert len(frame) == 4 and set(frame["status"]) == {"ok"}, frame["error"].tolist()
    alone = frame.groupby("population")["config/variant"].agg(lambda v: len(v) == 1)
    by_variant = frame.set_index("population")["config/variant"]
    assert all(alone[population] for population in by_variant[by_variant == "reference"].index)
    reference = frame[frame["config/variant"] == "reference"].iloc[0]
    config = {key[len("config/"):]: value for key, value in reference.drop("config/variant").items()
              if key.startswith("config/") and not pd.isna(value)}  # fmt: skip
    config = {k: (v.item() if hasattr(v, "item") else v) for k, v in config.items()}
    by_itself = run_trial({**config, "data_root": str(digits_root),
                           "cache_dir": str(tmp_path / "cache")})  # fmt: skip
    assert reference["test_acc"] == pytest.approx(by_itself["test_acc"], abs=1e-4)


def test_a_population_search_records_every_member_as_run_trial_scores_it(tmp_path, digits_root):
    body = CROFT_BODY.replace("num_samples: 3", "num_samples: 5").replace(
        "lambda2: {loguniform: [0.1, 10]}",
        "lambda2: {loguniform: [0.1, 10]}\n  lambda1: {uniform: [1, 10]}\n"
        "  lr: {loguniform: [0.0005, 0.005]}",
    )
    # The shipped model: a random-init one scores ID and OOD images alike, so AUROC turns
    # on near-ties that float rounding reorders, and equality to 1e-4 would test the noise.
    space = load_space(str(write_space(tmp_path, "croft_pop", "default", body)))
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    options = SearchOptions(
        storage=tmp_path / "runs", name="p", tracking_uri=uri, data_root=str(digits_root),
        cache_dir=str(tmp_path / "cache"), verbose=0, population=2,
    )  # fmt: skip
    outcome = run_search(space, options)
    frame = pd.read_parquet(outcome.folder / "trials.parquet")
    assert len(frame) == 5 and frame["trial_id"].is_unique and set(frame["status"]) == {"ok"}
    assert sorted(frame.groupby("population").size()) == [1, 2, 2]
    assert (frame["trial_id"].str.rsplit("_", n=1).str[0] == frame["population"]).all()
    for _, row in frame.iterrows():
        config = {key[len("config/"):]: value for key, value in row.items()
                  if key.startswith("config/") and not pd.isna(value)}  # fmt: skip
        config = {k: (v.item() if hasattr(v, "item") else v) for k, v in config.items()}
        alone = run_trial({**config, "data_root": str(digits_root),
                           "cache_dir": str(tmp_path / "cache")})  # fmt: skip
        for metric in ("val_acc", "val_auroc", "test_acc", "test_auroc", "objective"):
            assert row[metric] == pytest.approx(alone[metric], abs=1e-4), metric
    _, runs = children(uri, "croft_pop", outcome.parent_run_id)
    tags = {r.data.tags["croft.trial_id"]: r.data.tags.get("croft.population") for r in runs}
    assert tags == dict(zip(frame["trial_id"], frame["population"], strict=True))
    study = optuna.load_study(study_name="p", storage=f"sqlite:///{outcome.folder / 'optuna.db'}")
    assert len(study.trials) == 5


def test_a_population_halves_its_members_at_the_spaces_asha_rungs(tmp_path, weights, digits_root):
    body = (
        CROFT_BODY.replace("num_samples: 3", "num_samples: 4")
        .replace("scheduler: none", "scheduler: {asha: {grace_period: 1, reduction_factor: 2}}")
        .replace("epochs: 2", "epochs: 4")
    )
    space = load_space(str(write_space(tmp_path, "croft_halving", weights, body)))
    options = SearchOptions(
        storage=tmp_path / "runs", name="h", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
        data_root=str(digits_root), cache_dir=str(tmp_path / "cache"), verbose=0, population=4,
    )  # fmt: skip
    outcome = run_search(space, options)
    frame = pd.read_parquet(outcome.folder / "trials.parquet").set_index("trial_id")
    assert frame["population"].nunique() == 1
    assert sorted(frame["status"]) == ["ok", "stopped", "stopped", "stopped"]
    assert sorted(frame["epochs_run"]) == [1, 1, 2, 4]
    stopped = frame[frame["status"] == "stopped"]
    assert stopped["test_acc"].isna().all() and stopped["val_auroc"].notna().all()
    study = optuna.load_study(study_name="h", storage=f"sqlite:///{outcome.folder / 'optuna.db'}")
    assert len(study.trials) == 4


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--population", "0"], "--population must be >= 1"),
        (["--space", "dplclip_digits", "--population", "4"], "method dplclip"),
    ],
)
def test_what_populations_refuse_is_one_line(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main([*argv, "--storage", str(tmp_path / "runs")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_later_populations_get_the_objectives_earlier_members_reached_at_the_rungs():
    """The searcher keeps ASHA's record across populations: what each member reached at
    each rung comes back with its population and goes out with the next ones."""
    search = PopulationSearch(load_space("croft_digits"), "val", 1, seed=0)
    assert RUNG_HISTORY not in search.next_members("a")
    search.tell("a", {MEMBERS: [{}], RUNGS_REACHED: [[[5, 0.7], [15, 0.8]]]})
    assert search.next_members("b")[RUNG_HISTORY] == [[5, [0.7]], [15, [0.8]]]
    search.tell("b", {MEMBERS: [{}], RUNGS_REACHED: [[[5, 0.6]]]})
    assert search.next_members("c")[RUNG_HISTORY] == [[5, [0.7, 0.6]], [15, [0.8]]]


def test_the_last_samples_join_populations_instead_of_trailing_alone():
    """Once the samples left would not fill a population, the searcher asks them all: from
    then on each n_ctx of croft_digits is placed in one population, not in trailing
    small ones (asked one population at a time, 32 samples made populations of 2 and 1)."""
    space = load_space("croft_digits").with_overrides(num_samples=32)
    search = PopulationSearch(space, "val", 16, seed=0)
    placed = [search.next_members("a"), search.next_members("b")]
    assert search.asked == 32 and len(search.placed["a"]) + len(search.placed["b"]) < 32
    tail = []
    while (config := search.next_members(f"t{len(tail)}")) is not None:
        tail.append(config)
    placed += tail
    numbers = sorted(n for trial in search.placed.values() for n in trial)
    assert numbers == list(range(32))
    n_ctx = [{member["n_ctx"] for member in config[MEMBERS]} for config in placed]
    assert all(len(values) == 1 for values in n_ctx)
    tail_keys = [values.pop() for values in n_ctx[2:]]
    assert len(tail_keys) == len(set(tail_keys))  # one population per n_ctx once all are asked
    assert min(len(config[MEMBERS]) for config in placed) > 1


def test_trials_started_at_once_follow_the_clusters_cpus_and_gpus():
    """Without --max-concurrent a search runs this many trials together."""
    assert concurrent_slots({"CPU": 2.0}, 1.0, 0.0) == 2
    assert concurrent_slots({"CPU": 16.0, "GPU": 1.0}, 1.0, 0.25) == 4
    assert concurrent_slots({"CPU": 16.0, "GPU": 2.0}, 4.0, 0.25) == 4
    assert concurrent_slots({"CPU": 2.0}, 4.0, 0.0) == 1
    assert concurrent_slots({"CPU": 16.0, "GPU": 1.0}, 1.0, 0.1) == 10


def test_the_default_population_follows_the_hardware_and_the_space(monkeypatch):
    assert default_population(load_space("croft_digits"), 0.0, 128) == CPU_POPULATION
    # What cannot batch runs a Ray trial per configuration, without an error.
    assert default_population(load_space("dplclip_digits"), 0.0, 128) == 1
    assert default_population(load_space("croft_pacs"), 0.0, 512) == 1  # reference CRoFT
    # Its reference and sw_* variants do not batch: they would train alone, the rest in
    # populations of a few members each.
    assert default_population(load_space("ablation_croft_digits"), 0.0, 128) == 1

    class H200Share:
        total_memory = 80 * 2**30

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: H200Share())
    # A quarter of 80 GiB, half of it used, 24 fp32 512 x 512 matrices a member:
    # 80 * 2**30 * 0.25 * 0.5 / (24 * 512 * 512 * 4) = 426.7.
    assert default_population(load_space("croft_digits"), 0.25, 512) == 426
    assert default_population(load_space("croft_digits"), 1.0, 128) == 1024  # the cap
    # The training views a population puts on the device come first: 8 GiB of them leave
    # (10 GiB - 8 GiB) / 24 MiB = 85 members.
    assert default_population(load_space("croft_digits"), 0.25, 512, 8 * 2**30) == 85
    assert default_population(load_space("croft_digits"), 0.25, 512, 20 * 2**30) == 1


def test_a_resumed_search_keeps_the_population_it_started_with(tmp_path, capsys):
    folder = tmp_path / "runs" / "croft_digits" / "x"
    folder.mkdir(parents=True)
    (folder / "search.json").write_text(json.dumps({"population": 4}))
    with pytest.raises(SystemExit) as exit_info:
        run_main(["--space", "croft_digits", "--resume", "--name", "x", "--population", "2",
                  "--storage", str(tmp_path / "runs")])  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "started with --population 4" in err[0]


def test_two_node_cluster_runs_trials_on_both_nodes(tmp_path, weights, digits_root):
    # Ray >= 2.59 switches token authentication on by itself for a head started where a
    # token exists, but not for a joining node: every process of the cluster, the driver
    # included, gets the same explicit mode (as the README asks of a real cluster), and the
    # driver runs in a process of its own so nothing cached in this one leaks into it.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
    token = subprocess.run(
        [RAY, "get-auth-token", "--generate"], capture_output=True, text=True, env=env
    )
    assert token.returncode == 0, token.stderr[-2000:]
    head = subprocess.run(
        [
            RAY,
            "start",
            "--head",
            "--port=0",
            "--num-cpus=1",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    try:
        assert head.returncode == 0, head.stderr[-2000:]
        address = gcs_address(head.stdout + head.stderr)
        worker = subprocess.run(
            [RAY, "start", f"--address={address}", "--num-cpus=1", "--disable-usage-stats"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert worker.returncode == 0, worker.stderr[-2000:]
        # Trials (about 20 s each) long enough that the second node's worker process is up
        # before the first node's worker, reused trial after trial, has run them all.
        body = CROFT_BODY.replace("num_samples: 3", "num_samples: 4").replace(
            "{epochs: 2, shots: 2", "{epochs: 900, shots: 8"
        )
        space = write_space(tmp_path, "croft_cluster", weights, body)
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "croft_search.run",
                "--space",
                str(space),
                "--address",
                address,
                "--name",
                "c",
                "--storage",
                str(tmp_path / "runs"),
                "--data-root",
                str(digits_root),
                "--cache-dir",
                str(tmp_path / "cache"),
                "--tracking-uri",
                f"sqlite:///{tmp_path / 'm.db'}",
                "--population",
                "1",
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        frame = pd.read_parquet(tmp_path / "runs" / "croft_cluster" / "c" / "trials.parquet")
        assert len(frame) == 4 and set(frame["status"]) == {"ok"}
        assert frame["node"].nunique() == 2, frame["node"].tolist()
        timing = re.search(r"time: (\d+) s of trials \(([\d.]+) trials/min\)", done.stdout)
        assert timing and float(timing[2]) == pytest.approx(4 * 60 / int(timing[1]), rel=0.1)
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, env=env)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--space", "no_such_space"], "no_such_space"),
        (["--space", "croft_digits", "--resume", "--name", "nothing"], "nothing to resume"),
        (["--space", "croft_digits", "--gpus-per-trial", "-1"], "--gpus-per-trial"),
        (["--space", "croft_digits", "--set", "lambda1=-3"], "lambda1"),
    ],
)
def test_run_command_bad_input_is_one_line(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main([*argv, "--storage", str(tmp_path / "runs")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without GPUs")
def test_resources_the_cluster_lacks_are_refused_before_anything_is_written(
    tmp_path, weights, digits_root, capsys
):
    space = write_space(tmp_path, "croft_fits", weights, CROFT_BODY)
    common = ["--space", str(space), "--storage", str(tmp_path / "runs"), "--data-root",
              str(digits_root), "--cache-dir", str(tmp_path / "cache"), "--tracking-uri",
              f"sqlite:///{tmp_path / 'm.db'}"]  # fmt: skip
    for extra, message in (
        (["--gpus-per-trial", "0.5"], "--gpus-per-trial 0.5 but the Ray cluster has 0 GPU(s)"),
        (["--cpus-per-trial", "64"], "--cpus-per-trial 64 but the Ray cluster has"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            run_main([*common, *extra])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err  # the first round also shows feature encoding
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last and "Traceback" not in err, last
    assert not (tmp_path / "runs" / "croft_fits").exists()


def test_existing_search_needs_resume_or_a_new_name(tmp_path):
    (tmp_path / "runs" / "croft_digits" / "x").mkdir(parents=True)
    (tmp_path / "runs" / "croft_digits" / "x" / "search.json").write_text("{}")
    with pytest.raises(SystemExit):
        run_main(["--name", "x", "--storage", str(tmp_path / "runs")])
