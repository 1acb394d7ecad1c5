"""MLflow logging from the driver: per-epoch metrics are batched (the first epoch at once,
then at most every EPOCH_FLUSH_SECONDS, the rest when the trial ends), and none is lost."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from croft_search import tracking
from croft_search.tracking import SearchTracker


@pytest.fixture
def tracker(tmp_path) -> SearchTracker:
    tracker = SearchTracker(f"sqlite:///{tmp_path / 'm.db'}", "croft_digits")
    tracker.start_parent("s", {"space": "croft_digits"}, "method: croft\n", None)
    return tracker


def history(tracker: SearchTracker, trial_id: str, key: str) -> list[tuple[int, float]]:
    client = MlflowClient(tracker.tracking_uri)
    run_id = tracker.child(trial_id, {})
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_epoch_metrics_are_batched_and_all_arrive(tracker, monkeypatch):
    monkeypatch.setattr(tracking, "EPOCH_FLUSH_SECONDS", 3600.0)
    config = {"method": "croft", "lambda2": 1.0}
    for epoch in range(4):
        tracker.log_epoch("t1", config, {"epoch": epoch, "val_acc": 0.5 + epoch / 10, "lr": 0.1})
    # The first epoch is sent at once (the run shows up live); the others wait.
    assert history(tracker, "t1", "epoch_val_acc") == [(0, 0.5)]
    tracker.finish_trial("t1", config, {"val_acc": 0.9, "test_acc": 0.8}, "ok")
    assert history(tracker, "t1", "epoch_val_acc") == [
        (0, 0.5),
        (1, pytest.approx(0.6)),
        (2, pytest.approx(0.7)),
        (3, pytest.approx(0.8)),
    ]
    assert history(tracker, "t1", "test_acc") == [(0, pytest.approx(0.8))]
    assert [s for s, _ in history(tracker, "t1", "epoch_lr")] == [0, 1, 2, 3]


def test_epoch_metrics_flow_live_when_the_interval_has_passed(tracker, monkeypatch):
    monkeypatch.setattr(tracking, "EPOCH_FLUSH_SECONDS", 0.0)
    config = {"method": "coop"}
    for epoch in range(3):
        tracker.log_epoch("t2", config, {"epoch": epoch, "objective": epoch / 4})
    assert [s for s, _ in history(tracker, "t2", "epoch_objective")] == [0, 1, 2]


def test_unrecorded_child_runs_are_discarded_and_stay_gone_after_reattaching(tracker):
    # A killed driver leaves the child run of a trial cut off mid-way; a resumed search must
    # not show it beside the trials that have rows (CI once counted 7 child runs for 6 rows).
    config = {"method": "croft"}
    tracker.finish_trial("done", config, {"val_acc": 0.9}, "ok")
    tracker.log_epoch("cut", config, {"epoch": 0, "val_acc": 0.4})
    resumed = SearchTracker(tracker.tracking_uri, "croft_digits")
    resumed.start_parent("s", {}, "", tracker.parent_run_id)
    assert resumed.has_child("cut") and resumed.has_child("done")
    cut_run = resumed.child("cut", config)

    assert resumed.discard_unrecorded({"done"}) == ["cut"]
    assert not resumed.has_child("cut")
    client = MlflowClient(tracker.tracking_uri)
    live = client.search_runs(
        [tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{tracker.parent_run_id}'"
    )
    assert [r.data.tags[tracking.TRIAL_TAG] for r in live] == ["done"]
    again = SearchTracker(tracker.tracking_uri, "croft_digits")
    again.start_parent("s", {}, "", tracker.parent_run_id)
    assert again.has_child("done") and not again.has_child("cut")
    # The trial can run again under a fresh child run.
    assert again.child("cut", config) != cut_run


@pytest.mark.parametrize(
    ("status", "expected"), [("ok", "FINISHED"), ("stopped", "KILLED"), ("failed", "FAILED")]
)
def test_child_run_status_follows_the_trial_status(tracker, status, expected):
    run_id = tracker.finish_trial(f"t-{status}", {"method": "croft"}, {"val_acc": 0.5}, status)
    run = MlflowClient(tracker.tracking_uri).get_run(run_id)
    assert run.info.status == expected and run.data.tags["status"] == status


@pytest.mark.parametrize("curves", [False, True])
def test_a_finished_trial_has_its_params_metrics_and_tags_with_or_without_curves(tracker, curves):
    # A population's member sends everything at its end, in the batch of its metrics.
    config = {"method": "croft", "lambda1": 2.5, "n_ctx": 0}
    if curves:
        tracker.log_epoch("m", config, {"epoch": 0, "val_acc": 0.4})
    run_id = tracker.finish_trial("m", config, {"val_acc": 0.9, "test_auroc": 0.7}, "ok",
                                  population="pop1")  # fmt: skip
    run = MlflowClient(tracker.tracking_uri).get_run(run_id)
    assert run.data.params == {"method": "croft", "lambda1": "2.5", "n_ctx": "0"}
    assert run.data.metrics["val_acc"] == 0.9 and run.data.metrics["test_auroc"] == 0.7
    assert run.data.tags[tracking.POPULATION_TAG] == "pop1"
    assert run.data.tags[tracking.TRIAL_TAG] == "m" and run.info.status == "FINISHED"
    assert ("epoch_val_acc" in run.data.metrics) is curves


def test_a_trial_with_more_entries_than_one_batch_takes_sends_them_all(tracker):
    config = {f"p{i:03d}": i for i in range(60)}
    metrics = {f"m{i:04d}": i / 1000 for i in range(tracking.MAX_METRICS_PER_BATCH - 20)}
    run_id = tracker.finish_trial("big", config, metrics, "ok")
    run = MlflowClient(tracker.tracking_uri).get_run(run_id)
    assert len(run.data.params) == 60 and len(run.data.metrics) == len(metrics)


def test_a_sqlite_store_writes_ahead(tmp_path):
    # Waiting for the disk at every commit made recording slower than a population's members
    # arrive; a write-ahead log with normal syncs keeps the store corruption-safe.
    import sqlite3

    SearchTracker(f"sqlite:///{tmp_path / 'w.db'}", "croft_digits").start_parent("s", {}, "", None)
    with sqlite3.connect(tmp_path / "w.db") as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
