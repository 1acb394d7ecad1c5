"""What keeps a resumed search from running a finished trial again or running more trials
than the space asks for, tested without starting Ray: a trial already in trials.parquet
replays its recorded result, and the search stops once every sample has its row."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pandas as pd
import pytest
from ray import cloudpickle, tune

from croft_search import search
from croft_search.results import TrialTable
from croft_search.spaces import load_space
from croft_search.tracking import SearchTracker


@pytest.fixture
def recorded(tmp_path):
    table = TrialTable(tmp_path, "s", "croft_digits")
    config = {"method": "croft", "lambda2": 2.0, "seed": 0}
    table.add(
        "done01", config, {"val_acc": 0.8, "objective": 0.7, "test_acc": 0.6}, "ok", node="n/1"
    )
    table.add("bad002", config, {}, "failed", error="ValueError: NaN loss", node="n/1")
    table.add("asha03", config, {"val_acc": 0.3, "objective": 0.2}, "stopped", node="n/2")
    return tmp_path


@pytest.fixture
def reports(monkeypatch):
    sent: list[dict] = []
    monkeypatch.setattr(tune, "report", lambda metrics, **_: sent.append(metrics))
    return sent


def run_as(trial_id: str, monkeypatch, folder) -> None:
    monkeypatch.setattr(tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: trial_id))
    # resources=None: a trial that tried to train instead of replaying would fail on it.
    search.trial_function({}, None, "cpu", 1, finished=search._finished_rows(folder))


def test_finished_trial_replays_its_recorded_result(recorded, reports, monkeypatch):
    run_as("done01", monkeypatch, recorded)
    assert len(reports) == 1
    assert reports[0]["objective"] == pytest.approx(0.7)
    assert reports[0]["test_acc"] == pytest.approx(0.6)
    assert reports[0]["final"] == 1 and reports[0]["node"] == "n/1"


def test_stopped_trial_replays_as_not_final(recorded, reports, monkeypatch):
    run_as("asha03", monkeypatch, recorded)
    assert reports[0]["final"] == 0 and reports[0]["objective"] == pytest.approx(0.2)
    assert "test_acc" not in reports[0]


def test_failed_trial_fails_again_with_its_error(recorded, reports, monkeypatch):
    with pytest.raises(search.TrialFailed, match="NaN loss"):
        run_as("bad002", monkeypatch, recorded)
    assert reports == []


def test_search_stops_once_every_sample_has_a_row(tmp_path):
    _, stopper_class = search._driver_callback_classes()
    stopper = stopper_class(tmp_path, 4)
    assert not stopper.stop_all()  # no table yet
    table = TrialTable(tmp_path, "s", "croft_digits")
    for index in range(3):
        table.add(f"t{index}", {"method": "croft"}, {"objective": 0.1}, "ok")
    assert not stopper.stop_all()  # 3 of 4
    # The stopper Ray restores is a copy of its own, so it must read the file.
    restored = cloudpickle.loads(cloudpickle.dumps(stopper))
    TrialTable(tmp_path, "s", "croft_digits").add("t3", {"method": "croft"}, {}, "ok")
    assert stopper.stop_all() and restored.stop_all()
    assert stopper("t3", {}) is False


def test_replayed_trial_adds_no_epoch_to_its_recorded_run(tmp_path):
    space_file = tmp_path / "space.yaml"
    space_file.write_text(
        "method: croft\nfixed: {epochs: 2}\nsearch: {lambda1: {uniform: [0, 15]}}\nnum_samples: 3\n"
    )
    space = load_space(str(space_file))
    tracker = SearchTracker(f"sqlite:///{tmp_path / 'm.db'}", space.name)
    parent = tracker.start_parent("s", {}, "", None)
    config = {"method": "croft", "lambda1": 2.0}
    tracker.log_epoch("asha03", config, {"epoch": 0, "objective": 0.2})
    run_id = tracker.finish_trial("asha03", config, {"objective": 0.2}, "stopped")
    (tmp_path / search.SEARCH_FILE).write_text(
        json.dumps({"tracking_uri": tracker.tracking_uri, "mlflow_parent_run_id": parent})
    )
    TrialTable(tmp_path, "s", space.name).add("asha03", config, {"objective": 0.2}, "stopped")

    recorder_class, _ = search._driver_callback_classes()
    recorder = recorder_class(tmp_path, space, "s")
    recorder.setup()
    trial = SimpleNamespace(trial_id="asha03", config=config)
    # What _replay sends for a stopped trial after a resume.
    recorder.on_trial_result(0, [], trial, {"final": 0, "objective": 0.2, "node": "n/2"})
    recorder.tracker._send_epochs(run_id)
    history = recorder.tracker.client.get_metric_history(run_id, "epoch_objective")
    assert [(m.step, m.value) for m in history] == [(0, pytest.approx(0.2))]


def test_diverged_trial_fails_with_its_one_line_reason(reports, monkeypatch):
    # What a Ray worker does when run_trial meets a NaN loss: the trial fails with the
    # reason on one line (the driver writes it to trials.parquet as a failed row).
    import ray

    from trainables.loop import TrainingDiverged

    def diverge(*args, **kwargs):
        raise TrainingDiverged("loss became nan\nin epoch 3")

    monkeypatch.setattr(tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: "t1"))
    node = SimpleNamespace(get_node_id=lambda: "0123456789abcdef")
    monkeypatch.setattr(ray, "get_runtime_context", lambda: node)
    monkeypatch.setattr(search, "run_trial", diverge)
    config = {"method": "croft", "target_domain": "sketch", "epochs": 2}
    with pytest.raises(search.TrialFailed) as failed:
        search.trial_function(config, None, "cpu", 1)
    assert str(failed.value) == "TrainingDiverged: loss became nan in epoch 3"
    assert reports == []


def test_a_trial_averaging_several_seeds_has_no_seed_of_its_own(tmp_path):
    table = TrialTable(tmp_path, "s", "croft_digits")
    table.add("one", {"method": "croft", "seed": 3}, {"objective": 0.5}, "ok")
    table.add("avg", {"method": "croft", "seeds": [0, 1, 2]}, {"objective": 0.6}, "ok")
    table.add("dflt", {"method": "croft"}, {"objective": 0.7}, "ok")
    frame = pd.read_parquet(tmp_path / "trials.parquet").set_index("trial_id")
    assert str(frame["seed"].dtype) == "Int64"
    assert frame.loc["one", "seed"] == 3 and frame.loc["dflt", "seed"] == 0
    assert pd.isna(frame.loc["avg", "seed"]) and frame.loc["avg", "config/seeds"] == "0,1,2"
