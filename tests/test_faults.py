"""Faults a long search meets, end to end: the MLflow tracking server going down mid-search
and coming back, and a Ray worker node killed while it runs a trial. Each search runs as its
own process, as a user starts it. Slow (servers and Ray start-up), so marked; CI runs them."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from searches import RAY, gcs_address, live_child_runs, write_space

from croft_search.contract import TRIALS_FILE

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def long_trials_space(tmp_path: Path, weights: Path, samples: int, epochs: int) -> Path:
    body = f"""method: croft
fixed: {{epochs: {epochs}, shots: 8, views: 2}}
search:
  lambda2: {{loguniform: [0.1, 10]}}
objective: {{joint: 0.5}}
sampler: random
scheduler: none
num_samples: {samples}
"""
    return write_space(tmp_path, "faults", weights, body)


def start_search(tmp_path, space: Path, digits_root, uri: str, *extra: str, env=None):
    argv = [sys.executable, "-m", "croft_search.run", "--space", str(space), "--name", "f",
            "--storage", str(tmp_path / "runs"), "--data-root", str(digits_root),
            "--cache-dir", str(tmp_path / "cache"), "--tracking-uri", uri, "--population", "1",
            *extra]  # fmt: skip
    return subprocess.Popen(
        argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip


def rows(folder: Path) -> int:
    try:
        return len(pd.read_parquet(folder / TRIALS_FILE))
    except (FileNotFoundError, OSError, ValueError):
        return 0


def wait_for(condition, timeout: float, what: str, driver=None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if driver is not None and driver.poll() is not None:
            raise AssertionError(f"the search ended while waiting for {what}: "
                                 f"{driver.stderr.read()[-3000:]}")  # fmt: skip
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_mlflow_server(tmp_path: Path, port: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--default-artifact-root", str(tmp_path / "artifacts")],  # fmt: skip
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip

    def answers() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    wait_for(answers, 90, "the MLflow server")
    return server


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_mlflow_server_down_mid_search_loses_nothing(tmp_path, weights, digits_root):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp_path, port)
    space = long_trials_space(tmp_path, weights, samples=6, epochs=300)
    driver = start_search(tmp_path, space, digits_root, uri, "--max-concurrent", "1")
    folder = tmp_path / "runs" / "faults" / "f"
    try:
        wait_for(lambda: rows(folder) >= 1, 400, "the first trial", driver)
        stop(server)  # down while trials 2 and 3 finish
        wait_for(lambda: rows(folder) >= 3, 400, "two trials with MLflow down", driver)
        server = start_mlflow_server(tmp_path, port)
        out, err = driver.communicate(timeout=600)
        assert driver.returncode == 0, err[-3000:]
        assert "the search goes on" in err and "answers again" in err, err[-3000:]
        frame = pd.read_parquet(folder / TRIALS_FILE).set_index("trial_id")
        assert len(frame) == 6 and set(frame["status"]) == {"ok"}
        runs = live_child_runs(uri, folder)
        assert set(runs) == set(frame.index)
        assert {r.info.status for r in runs.values()} == {"FINISHED"}
        assert frame["mlflow_run_id"].to_dict() == {k: r.info.run_id for k, r in runs.items()}
        for trial_id, run in runs.items():
            assert run.data.metrics["objective"] == pytest.approx(frame.loc[trial_id, "objective"])
    finally:
        stop(driver)
        stop(server)


def _descendants(root: int) -> list[int]:
    """``root`` and every process below it, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _runs_a_trial(root: int) -> bool:
    for pid in _descendants(root):
        try:
            if "ImplicitFunc.train" in Path(f"/proc/{pid}/cmdline").read_text():
                return True
        except OSError:
            continue
    return False


def test_a_worker_node_killed_mid_trial_is_retried_on_the_survivor(tmp_path, weights, digits_root):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
    token = subprocess.run([RAY, "get-auth-token", "--generate"], capture_output=True, text=True,
                           env=env)  # fmt: skip
    assert token.returncode == 0, token.stderr[-2000:]
    head = subprocess.run(
        [RAY, "start", "--head", "--port=0", "--num-cpus=1", "--include-dashboard=false",
         "--disable-usage-stats"],  # fmt: skip
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    worker = None
    try:
        assert head.returncode == 0, head.stderr[-2000:]
        address = gcs_address(head.stdout + head.stderr)
        # --block keeps the node's processes under this one, so killing it kills the node.
        worker = subprocess.Popen(
            [RAY, "start", f"--address={address}", "--num-cpus=1", "--disable-usage-stats",
             "--block"],  # fmt: skip
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        space = long_trials_space(tmp_path, weights, samples=4, epochs=900)
        uri = f"sqlite:///{tmp_path / 'm.db'}"
        driver = start_search(tmp_path, space, digits_root, uri, "--address", address, env=env)
        folder = tmp_path / "runs" / "faults" / "f"
        wait_for(lambda: _runs_a_trial(worker.pid), 400, "a trial on the worker node", driver)
        time.sleep(3)  # well inside the trial
        for pid in reversed(_descendants(worker.pid)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out, err = driver.communicate(timeout=900)
        assert driver.returncode == 0, err[-3000:]
        frame = pd.read_parquet(folder / TRIALS_FILE)
        assert len(frame) == 4 and frame["trial_id"].is_unique
        assert set(frame["status"]) == {"ok"}, frame[["status", "error"]].to_dict("records")
        retried = frame[frame["attempts"] > 1]
        assert len(retried) == 1, frame[["trial_id", "attempts", "node"]].to_dict("records")
        runs = live_child_runs(uri, folder)
        assert set(runs) == set(frame["trial_id"])
        assert {r.info.status for r in runs.values()} == {"FINISHED"}
    finally:
        if worker is not None:
            stop(worker)
        subprocess.run([RAY, "stop", "--force"], capture_output=True, env=env)
