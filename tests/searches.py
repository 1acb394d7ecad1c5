"""Helpers of the end-to-end search tests (test_search.py, test_faults.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from croft_search.contract import SEARCH_FILE
from croft_search.search.folder import create_folder
from croft_search.search.space import load_space
from croft_search.tracking import TRIAL_TAG

# The ray CLI of the interpreter running the tests (the venv may not be on PATH).
RAY = str(Path(sys.executable).with_name("ray"))


def write_space(folder: Path, name: str, weights: Path | str, body: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(
        f"description: test space\ndataset: digits\nbackbone: tiny-digits\n"
        f"pretrained: {weights}\ntarget_domains: [sketch]\n" + body
    )
    return path


def gcs_address(output: str) -> str:
    """The address `ray start --head` prints for other nodes to join."""
    for line in output.splitlines():
        if "--address='" in line:
            return line.split("--address='")[1].split("'")[0]
    raise AssertionError(f"no address in ray start output: {output[-1000:]}")


def live_child_runs(uri: str, folder: Path) -> dict[str, object]:
    """The live (not deleted) child runs of a search's MLflow parent, by trial id; two for
    one trial fail the test."""
    parent = json.loads((Path(folder) / SEARCH_FILE).read_text())["mlflow_parent_run_id"]
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_run(parent).info.experiment_id
    runs = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}'")
    found: dict[str, object] = {}
    for run in runs:
        trial_id = run.data.tags[TRIAL_TAG]
        assert trial_id not in found, f"two live child runs for trial {trial_id}"
        found[trial_id] = run
    return found


RECORDED_SPACE = (
    "method: croft\nfixed: {epochs: 2}\nsearch: {lambda1: {uniform: [0, 15]}}\nnum_samples: {n}\n"
)


def recorded_config(lambda1: float) -> dict:
    """A sampled config of `RECORDED_SPACE`, as a recorder is told it."""
    return {"method": "croft", "epochs": 2, "lambda1": lambda1, "seed": 0, "selection": "val"}


def started_search(tmp_path: Path, samples: int) -> tuple[Path, object, str]:
    """A started search folder of `RECORDED_SPACE` (search.json, space.yaml, MLflow parent
    in a SQLite store under ``tmp_path``): (folder, space, tracking URI)."""
    path = tmp_path / "space.yaml"
    path.write_text(RECORDED_SPACE.replace("{n}", str(samples)))
    space = load_space(str(path))
    folder = tmp_path / "runs" / "s"
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    create_folder(folder, "s", space, uri, "val", {"space": space.name})
    return folder, space, uri
