"""The dashboards a researcher opens on a search: MLflow's UI on the runs table (the
experiment's kind), optuna-dashboard on the search's optuna.db (served in-process on the
loopback and read back over HTTP)."""

from __future__ import annotations

import json
import threading
import urllib.request
from wsgiref.simple_server import WSGIRequestHandler, make_server

import optuna_dashboard
import pytest
from mlflow.tracking import MlflowClient
from searches import recorded_config, started_search

from croft_search.contract import OPTUNA_FILE
from croft_search.search.recorder import Recorder
from croft_search.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING, SearchTracker


@pytest.fixture
def search(tmp_path):
    """A search folder with two finished trials recorded (parquet, optuna.db, MLflow)."""
    folder, space, uri = started_search(tmp_path, samples=2)
    recorder = Recorder(folder, space, echo=False)
    for trial_id, lambda1, objective in (("t1", 1.0, 0.7), ("t2", 4.0, 0.8)):
        recorder.trial_started(trial_id, recorded_config(lambda1))
        metrics = {"val_acc": objective, "val_auroc": objective, "objective": objective}
        recorder.trial_finished(trial_id, recorded_config(lambda1), metrics, node="n/1")
    recorder.close({"trials": 2})
    return folder, space, uri


def test_a_search_experiment_opens_on_the_runs_table(search):
    _, space, uri = search
    experiment = MlflowClient(uri).get_experiment_by_name(space.name)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING == "custom_model_development"


def test_an_experiment_made_before_the_kind_existed_gets_it(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    old = client.create_experiment("older")
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    assert SearchTracker(uri, "older").experiment_id == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args) -> None:  # noqa: ANN002 - the test's output stays clean
        pass


def test_optuna_dashboard_serves_a_search_study(search):
    folder, _, _ = search
    app = optuna_dashboard.wsgi(f"sqlite:///{folder / OPTUNA_FILE}")
    server = make_server("127.0.0.1", 0, app, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        with urllib.request.urlopen(f"{base}/api/studies", timeout=30) as response:
            studies = json.load(response)["study_summaries"]
        assert [s["study_name"] for s in studies] == ["s"]
        with urllib.request.urlopen(f"{base}/api/studies/{studies[0]['study_id']}",
                                    timeout=30) as response:  # fmt: skip
            detail = json.load(response)
        trials = sorted(detail["trials"], key=lambda t: t["number"])
        assert [t["state"] for t in trials] == ["Complete", "Complete"]
        assert [t["values"] for t in trials] == [[0.7], [0.8]]
        assert [p["param_external_value"] for t in trials for p in t["params"]] == ["1.0", "4.0"]
    finally:
        server.shutdown()
        server.server_close()
