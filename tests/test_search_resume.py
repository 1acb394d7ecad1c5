"""Exactly-once results, through the recorder's public interface and the engine-neutral trial
function, without Ray: every trial once in trials.parquet, the Optuna study and MLflow,
whatever is replayed after a resume; a resumed trial that already has its row replays it;
MLflow down while trials finish loses nothing (the sync command sends the rest)."""

from __future__ import annotations

import json
import socket
import threading

import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from searches import live_child_runs, recorded_config, started_search

from croft_search.contract import OPTUNA_FILE, SEARCH_FILE, TRIALS_FILE
from croft_search.search import recorder as recorder_module
from croft_search.search.recorder import Recorder
from croft_search.search.sampled_trial import run_sampled_trial
from croft_search.sync import main as sync_main
from croft_search.sync import sync_folder
from croft_search.tracking import SearchTracker

OK = {"val_acc": 0.8, "val_auroc": 0.6, "objective": 0.7, "test_acc": 0.6}


@pytest.fixture
def search(tmp_path):
    """A started search folder (search.json, space.yaml, MLflow parent) and its space."""
    return started_search(tmp_path, samples=3)


def study_trials(folder) -> list[optuna.trial.FrozenTrial]:
    storage = f"sqlite:///{folder / OPTUNA_FILE}"
    return optuna.load_study(study_name="s", storage=storage).get_trials()


def record_three(recorder: Recorder) -> None:
    for trial_id in ("t1", "t2", "t3"):
        recorder.trial_started(trial_id, recorded_config(1.0))
    recorder.trial_epoch("t1", recorded_config(1.0), {"epoch": 0, "objective": 0.5, "val_acc": 0.7})
    recorder.trial_finished("t1", recorded_config(1.0), OK, node="n/1")
    recorder.trial_failed("t2", recorded_config(2.0), "ValueError: NaN loss", node="n/1")
    stopped = {"val_acc": 0.3, "objective": 0.2}
    recorder.trial_stopped("t3", recorded_config(3.0), stopped, node="n/2")


def test_every_trial_is_recorded_once_in_parquet_study_and_mlflow(search):
    folder, space, uri = search
    recorder = Recorder(folder, space, echo=False)
    record_three(recorder)
    # Replays after a resume, by this recorder and by a fresh one on the same folder.
    assert recorder.trial_finished("t1", recorded_config(1.0), OK) is False
    recorder.wait()  # one driver at a time: a resumed one starts after the last has stopped
    again = Recorder(folder, space, echo=False)
    assert again.trial_failed("t2", recorded_config(2.0), "other error") is False
    again.close({"trials": 3})

    frame = pd.read_parquet(folder / TRIALS_FILE).set_index("trial_id")
    assert frame["status"].to_dict() == {"t1": "ok", "t2": "failed", "t3": "stopped"}
    assert frame.loc["t2", "error"] == "ValueError: NaN loss"
    assert frame.loc["t1", "test_acc"] == pytest.approx(0.6)
    states = sorted(t.state.name for t in study_trials(folder))
    assert states == ["COMPLETE", "FAIL", "PRUNED"]
    runs = live_child_runs(uri, folder)
    assert {k: r.info.status for k, r in runs.items()} == {
        "t1": "FINISHED", "t2": "FAILED", "t3": "KILLED"
    }  # fmt: skip
    assert {k: r.info.run_id for k, r in runs.items()} == frame["mlflow_run_id"].to_dict()
    history = MlflowClient(uri).get_metric_history(runs["t1"].info.run_id, "epoch_objective")
    assert [(m.step, m.value) for m in history] == [(0, pytest.approx(0.5))]


def test_the_search_is_complete_at_its_sample_count_and_takes_no_surplus(search):
    folder, space, uri = search
    recorder = Recorder(folder, space, echo=False)
    record_three(recorder)
    assert recorder.is_complete() and Recorder.recorded_count(folder) == 3
    assert recorder.trial_finished("t4", recorded_config(4.0), OK) is False
    recorder.trial_started("t5", recorded_config(5.0))
    recorder.trial_epoch("t5", recorded_config(5.0), {"epoch": 0, "objective": 0.1})
    recorder.close({"trials": 3})
    assert len(pd.read_parquet(folder / TRIALS_FILE)) == 3
    assert set(live_child_runs(uri, folder)) == {"t1", "t2", "t3"}  # t5's attempt discarded


def test_a_restarted_trial_keeps_only_its_last_attempt(search):
    folder, space, uri = search
    recorder = Recorder(folder, space, echo=False)
    recorder.trial_started("t1", recorded_config(1.0))
    recorder.trial_epoch("t1", recorded_config(1.0), {"epoch": 0, "objective": 0.9})
    recorder.trial_restarted("t1")  # its node died
    recorder.trial_epoch("t1", recorded_config(1.0), {"epoch": 0, "objective": 0.4})
    recorder.trial_finished("t1", recorded_config(1.0), OK, attempts=2)
    recorder.wait()
    runs = live_child_runs(uri, folder)
    history = MlflowClient(uri).get_metric_history(runs["t1"].info.run_id, "epoch_objective")
    assert [m.value for m in history] == [pytest.approx(0.4)]
    assert pd.read_parquet(folder / TRIALS_FILE)["attempts"].tolist() == [2]


def test_a_started_trial_has_its_running_child_run_and_finishing_completes_that_run(search):
    folder, space, uri = search
    recorder = Recorder(folder, space, echo=False)
    recorder.trial_started("t1", recorded_config(1.5))
    recorder.wait()
    (running,) = live_child_runs(uri, folder).values()
    assert running.info.status == "RUNNING" and running.data.metrics == {}
    assert running.data.params["lambda1"] == "1.5" and running.data.params["epochs"] == "2"
    recorder.trial_finished("t1", recorded_config(1.5), OK)
    recorder.trial_started("t1", recorded_config(1.5))  # a replay after a resume
    recorder.wait()
    (finished,) = live_child_runs(uri, folder).values()
    assert finished.info.run_id == running.info.run_id and finished.info.status == "FINISHED"
    assert finished.data.metrics["objective"] == pytest.approx(0.7)
    frame = pd.read_parquet(folder / TRIALS_FILE)
    assert frame["mlflow_run_id"].tolist() == [running.info.run_id]


def test_recorded_trials_replay_instead_of_training(search):
    folder, space, _ = search
    recorder = Recorder(folder, space, echo=False)
    record_three(recorder)
    rows = Recorder.recorded_rows(folder)
    reports: list[dict] = []
    # resources=None: a trial that tried to train instead of replaying would fail on it.
    ok = run_sampled_trial(recorded_config(1.0), None, "cpu", reports.append, rows["t1"])
    assert ok["final"] == 1 and ok["status"] == "ok" and ok["node"] == "n/1"
    assert ok["objective"] == pytest.approx(0.7) and ok["test_acc"] == pytest.approx(0.6)
    failed = run_sampled_trial(recorded_config(2.0), None, "cpu", reports.append, rows["t2"])
    assert failed["status"] == "failed" and failed["error"] == "ValueError: NaN loss"
    stopped = run_sampled_trial(recorded_config(3.0), None, "cpu", reports.append, rows["t3"])
    assert stopped["status"] == "stopped" and "test_acc" not in stopped
    assert reports == []


def test_a_trial_error_is_a_failed_result_on_one_line():
    reports: list[dict] = []
    result = run_sampled_trial(
        {"method": "croft", "no_such_hparam": 1}, None, "cpu", reports.append
    )
    assert result["final"] == 1 and result["status"] == "failed"
    assert result["error"].startswith("ConfigError: unknown hyper-parameter(s) no_such_hparam")
    assert "\n" not in result["error"] and reports == []


def _dead_uri() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there once the probe is closed


def test_mlflow_down_loses_nothing_and_sync_sends_the_rest(search, capsys, monkeypatch):
    monkeypatch.setattr(recorder_module, "MLFLOW_END_PATIENCE_SECONDS", 0.0)
    folder, space, uri = search
    meta_file = folder / SEARCH_FILE
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "tracking_uri": _dead_uri()}))
    recorder = Recorder(folder, space, echo=False)
    record_three(recorder)
    recorder.close({"trials": 3})
    (folder / "summary.json").write_text(json.dumps({"trials": 3}))
    err = capsys.readouterr().err
    assert "the search goes on" in err and "python -m croft_search.sync" in err
    frame = pd.read_parquet(folder / TRIALS_FILE)
    assert len(frame) == 3 and set(frame["mlflow_run_id"]) == {""}
    assert len(study_trials(folder)) == 3

    with pytest.raises(SystemExit) as exit_info:
        sync_main([str(folder)])  # still down
    assert exit_info.value.code == 2 and "does not answer" in capsys.readouterr().err

    assert sync_folder(folder, uri) == (3, 0)  # the server is back (here: at another URI)
    runs = live_child_runs(uri, folder)
    assert {k: r.info.status for k, r in runs.items()} == {
        "t1": "FINISHED", "t2": "FAILED", "t3": "KILLED"
    }  # fmt: skip
    assert runs["t1"].data.metrics["test_acc"] == pytest.approx(0.6)
    assert runs["t1"].data.params["lambda1"] == "1.0"
    frame = pd.read_parquet(folder / TRIALS_FILE).set_index("trial_id")
    assert frame["mlflow_run_id"].to_dict() == {k: r.info.run_id for k, r in runs.items()}
    assert sync_folder(folder, uri) == (0, 0)  # nothing sent twice
    parent = MlflowClient(uri).get_run(meta["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED"


def test_mlflow_failing_just_before_the_end_still_gets_every_trial(search, monkeypatch):
    """A server that fails the last trial's run, moments before the search ends (inside the
    retry window), and answers again: the search's end sends that trial all the same."""
    monkeypatch.setattr(recorder_module, "MLFLOW_END_RETRY_SECONDS", 0.1)
    folder, space, uri = search
    finish_trial = SearchTracker.finish_trial
    failures = iter([True])

    def flaky(tracker, trial_id, *args, **kwargs):
        if trial_id == "t3" and next(failures, False):
            raise ConnectionError("503 Service Unavailable")
        return finish_trial(tracker, trial_id, *args, **kwargs)

    monkeypatch.setattr(SearchTracker, "finish_trial", flaky)
    recorder = Recorder(folder, space, echo=False)
    record_three(recorder)
    recorder.wait()
    assert recorder.mlflow.missing(recorder.table) == 1
    recorder.close({"trials": 3})
    runs = live_child_runs(uri, folder)
    assert {k: r.info.status for k, r in runs.items()} == {
        "t1": "FINISHED", "t2": "FAILED", "t3": "KILLED"
    }  # fmt: skip
    frame = pd.read_parquet(folder / TRIALS_FILE).set_index("trial_id")
    assert frame["mlflow_run_id"].to_dict() == {k: r.info.run_id for k, r in runs.items()}


def test_a_row_written_before_its_run_is_completed_on_the_next_open(search):
    """A driver killed between writing a trial's row and ending its child run: the next
    recorder ends the run from the row, and adds the row's study entry if it was missing."""
    folder, space, uri = search
    recorder = Recorder(folder, space, echo=False)
    recorder.trial_started("t1", recorded_config(1.0))
    recorder.trial_epoch("t1", recorded_config(1.0), {"epoch": 0, "objective": 0.5})
    recorder.mlflow.call(lambda tracker: tracker.child("t1", recorded_config(1.0)))  # the run, open
    recorder.table.add("t1", recorded_config(1.0), OK, "ok")  # the row, as the kill left it
    Recorder(folder, space, echo=False).close({"trials": 1})
    runs = live_child_runs(uri, folder)
    assert runs["t1"].info.status == "FINISHED"
    assert runs["t1"].data.metrics["objective"] == pytest.approx(0.7)
    assert [t.state.name for t in study_trials(folder)] == ["COMPLETE"]
    frame = pd.read_parquet(folder / TRIALS_FILE)
    assert frame["mlflow_run_id"].tolist() == [runs["t1"].info.run_id]


def test_trials_parquet_keeps_real_types(search):
    folder, space, _ = search
    recorder = Recorder(folder, space, echo=False)
    recorder.trial_finished("a", {"method": "croft", "lambda1": 0, "n_ctx": 4, "seed": 3}, OK)
    recorder.trial_finished("b", {"method": "coop", "lambda1": 2.5, "seeds": [0, 1, 2]}, OK)
    frame = pd.read_parquet(folder / TRIALS_FILE).set_index("trial_id")
    assert str(frame["config/lambda1"].dtype) == "float64"  # 0 beside 2.5
    assert str(frame["config/n_ctx"].dtype) == "Int64" and pd.isna(frame.loc["b", "config/n_ctx"])
    assert str(frame["seed"].dtype) == "Int64" and frame.loc["a", "seed"] == 3
    assert pd.isna(frame.loc["b", "seed"]) and frame.loc["b", "config/seeds"] == "0,1,2"


def test_trials_that_finish_together_cost_one_write(search):
    folder, space, uri = search
    recorder = Recorder(folder, space, echo=False)
    with recorder.together():
        for index in range(3):
            assert recorder.trial_finished(f"p_{index}", recorded_config(float(index)), OK)
            assert Recorder.recorded_count(folder) == 0  # not yet written
        assert recorder.trial_finished("p_0", recorded_config(0.0), OK) is False  # still once
    assert Recorder.recorded_count(folder) == 3
    recorder.wait()
    assert set(live_child_runs(uri, folder)) == {"p_0", "p_1", "p_2"}
    rows = pd.read_parquet(folder / TRIALS_FILE)
    assert rows["mlflow_run_id"].str.len().gt(0).all()


def test_recording_returns_before_the_study_and_mlflow_have_written(search, monkeypatch):
    """The engine's thread (which starts the next trial) does not wait on the study or
    MLflow: a trial's row is written when its event returns, its study entry and child run
    after, in order; `wait` waits for them, and the run ids reach trials.parquet."""
    folder, space, uri = search
    finish_trial = SearchTracker.finish_trial
    mlflow_free = threading.Event()

    def held(tracker, *args, **kwargs):
        assert mlflow_free.wait(timeout=60)
        return finish_trial(tracker, *args, **kwargs)

    monkeypatch.setattr(SearchTracker, "finish_trial", held)
    recorder = Recorder(folder, space, echo=False)
    with recorder.together():
        for index in range(3):
            recorder.trial_started(f"p_{index}", recorded_config(float(index)))
            assert recorder.trial_finished(f"p_{index}", recorded_config(float(index)), OK)
    frame = pd.read_parquet(folder / TRIALS_FILE)
    assert frame["trial_id"].tolist() == ["p_0", "p_1", "p_2"]
    assert set(frame["mlflow_run_id"]) == {""} and len(study_trials(folder)) < 3
    # Only the runs the starts opened, none finished yet.
    assert {r.info.status for r in live_child_runs(uri, folder).values()} <= {"RUNNING"}
    mlflow_free.set()
    recorder.wait()
    assert len(study_trials(folder)) == 3
    runs = live_child_runs(uri, folder)
    assert {k: r.info.status for k, r in runs.items()} == {f"p_{i}": "FINISHED" for i in range(3)}
    frame = pd.read_parquet(folder / TRIALS_FILE).set_index("trial_id")
    assert frame["mlflow_run_id"].to_dict() == {k: r.info.run_id for k, r in runs.items()}
    recorder.close({"trials": 3})
    assert set(live_child_runs(uri, folder)) == {"p_0", "p_1", "p_2"}  # none sent twice


def test_an_error_while_writing_in_the_background_reaches_the_engine(search, monkeypatch):
    """A study write that raises (a bug, a full disk) is not lost on the writer's thread: the
    recorder raises it on the engine's thread, at its next event or wait."""
    folder, space, _ = search
    recorder = Recorder(folder, space, echo=False)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(recorder.study, "add", broken)
    recorder.trial_finished("t1", recorded_config(1.0), OK)
    with pytest.raises(OSError, match="disk full"):
        recorder.wait()
    assert pd.read_parquet(folder / TRIALS_FILE)["trial_id"].tolist() == ["t1"]
