"""The report's figures beside the Pareto plot: optimisation history, parallel coordinates,
importance bars and the front's validation curves, each a PNG and embedded in report.html;
curves read from the search's MLflow runs."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from analysis import pareto
from analysis.figures import history_figure, parallel_coordinates_figure, running_best

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def trials_frame(n: int = 12) -> pd.DataFrame:
    """Finished trials with known values, listed out of completion order."""
    rng = np.random.default_rng(3)
    lambda1 = np.linspace(0.1, 10.0, n)
    acc = 0.6 + 0.03 * np.sqrt(lambda1) + rng.normal(0, 0.005, n)
    auroc = 0.9 - 0.01 * lambda1 + rng.normal(0, 0.005, n)
    frame = pd.DataFrame({
        "trial_id": [f"t{i:02d}" for i in range(n)],
        "method": "croft",
        "status": ["ok"] * (n - 2) + ["stopped", "failed"],
        "selection": "val",
        "config/lambda1": lambda1,
        "config/lr": np.geomspace(1e-4, 1e-1, n),
        "config/optimizer": ["sgd", "adamw"] * (n // 2),
        "config/epochs": 5,
        "val_acc": acc, "val_auroc": auroc, "test_acc": acc - 0.01, "test_auroc": auroc - 0.02,
        "finished_at": [f"2026-12-03T10:{59 - i:02d}:00" for i in range(n)],
    })  # fmt: skip
    frame["objective"] = 0.5 * frame["val_acc"] + 0.5 * frame["val_auroc"]
    frame.loc[n - 1, ["objective", "val_acc", "val_auroc", "test_acc", "test_auroc"]] = np.nan
    return frame


def test_running_best_is_the_best_so_far() -> None:
    values = [0.3, 0.1, 0.5, 0.4, 0.7]
    assert running_best(values).tolist() == [0.3, 0.3, 0.5, 0.5, 0.7]
    assert running_best(values, maximize=False).tolist() == [0.3, 0.1, 0.1, 0.1, 0.1]


def test_history_follows_completion_order_with_the_running_best() -> None:
    frame = trials_frame()
    figure = history_figure(frame)
    axes = figure.axes[0]
    scored = frame[frame["status"] != "failed"].sort_values("finished_at")
    expected_best = scored["objective"].cummax().to_numpy()
    (best_line,) = [line for line in axes.get_lines() if line.get_label() == "best so far"]
    np.testing.assert_allclose(best_line.get_ydata(), expected_best)
    points = np.concatenate([c.get_offsets()[:, 1] for c in axes.collections])
    assert sorted(points) == pytest.approx(sorted(scored["objective"]))
    assert history_figure(frame.drop(columns="objective")) is None


def test_parallel_coordinates_have_every_searched_parameter() -> None:
    frame = trials_frame()
    figure = parallel_coordinates_figure(frame, front_ids=["t03"])
    labels = [tick.get_text().split("\n")[0] for tick in figure.axes[0].get_xticklabels()]
    assert labels == ["lambda1", "lr", "optimizer", "objective"]  # epochs is fixed: no axis
    # Trials' lines are coloured by objective (RGBA), the front's black, the axes grey.
    named = [line for line in figure.axes[0].get_lines() if isinstance(line.get_color(), str)]
    front = [line for line in named if line.get_color() == "black"]
    lines = [line for line in figure.axes[0].get_lines() if line not in named]
    assert len(front) == 1 and len(lines) == 10  # 11 scored trials, one on the front
    # lr spans three decades: its axis is logarithmic, so the trials sit evenly on it.
    lr_axis = np.array([line.get_ydata()[1] for line in [*lines, *front]])
    assert np.diff(np.sort(lr_axis)) == pytest.approx(np.full(len(lr_axis) - 1, 1 / 10), abs=1e-9)


def write_search(folder: Path, frame: pd.DataFrame, uri: str | None) -> None:
    folder.mkdir(parents=True)
    meta = {}
    if uri is not None:
        client = MlflowClient(uri)
        experiment = client.create_experiment("figures")
        parent = client.create_run(experiment).info.run_id
        run_ids = []
        for _ in range(len(frame)):
            run = client.create_run(experiment, tags={"mlflow.parentRunId": parent})
            curve = [Metric("epoch_val_acc", 0.5 + 0.05 * step, 0, step) for step in range(4)]
            curve += [Metric("epoch_objective", 0.4 + 0.1 * step, 0, step) for step in range(4)]
            client.log_batch(run.info.run_id, metrics=curve)
            run_ids.append(run.info.run_id)
        frame = frame.assign(mlflow_run_id=run_ids)
        meta = {"mlflow_parent_run_id": parent, "tracking_uri": uri}
    frame.to_parquet(folder / "trials.parquet")
    (folder / "search.json").write_text(json.dumps(meta))


FIGURES = ["pareto", "history", "parallel_coordinates", "importance", "validation_curves"]


def test_the_report_embeds_every_figure_and_writes_each_as_png(tmp_path, capsys) -> None:
    folder = tmp_path / "runs" / "figures" / "s"
    write_search(folder, trials_frame(), f"sqlite:///{tmp_path / 'm.db'}")
    assert pareto.main([str(folder), "--no-mlflow-log"]) == 0
    out = folder / "analysis"
    for name in FIGURES:
        data = (out / f"{name}.png").read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000, name
    page = (out / "report.html").read_text(encoding="utf-8")
    embedded = re.findall(r"<img [^>]*src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(embedded) == len(FIGURES)
    # Each embedded image is one of the PNG files, byte for byte.
    files = {(out / f"{name}.png").read_bytes() for name in FIGURES}
    assert {base64.b64decode(data) for data in embedded} == files
    assert "<h3>Validation curves</h3>" in page and "src='http" not in page
    assert "validation curves:" not in capsys.readouterr().out


def test_write_outputs_returns_every_figure(tmp_path) -> None:
    frame = trials_frame()
    analysis = pareto.analyse(frame, importance="fanova")
    analysis.curves = {"t03": pd.DataFrame({"step": [0, 1, 2], "epoch_val_acc": [0.5, 0.6, 0.7]})}
    paths = pareto.write_outputs(analysis, tmp_path / "out")
    pngs = {name: path for name, path in paths.items() if path.suffix == ".png"}
    assert set(pngs) == {"plot", *FIGURES[1:]}
    for path in pngs.values():
        assert path.is_file() and path.read_bytes().startswith(PNG_MAGIC)
    page = paths["html"].read_text(encoding="utf-8")
    assert page.count("src='data:image/png;base64,") == len(pngs)


def test_without_curves_the_report_says_so(tmp_path, capsys) -> None:
    folder = tmp_path / "runs" / "figures" / "s"
    write_search(folder, trials_frame(), None)
    assert pareto.main([str(folder), "--importance", "none"]) == 0
    out = folder / "analysis"
    assert not (out / "validation_curves.png").exists()
    assert "note: validation curves: no per-epoch metrics" in capsys.readouterr().out
    page = (out / "report.html").read_text(encoding="utf-8")
    # One sentence where the figure would be, not an image.
    section = page.split("<h3>Validation curves</h3>")[1].split("<h", 1)[0]
    assert "<img" not in section
    assert "Validation curves: no per-epoch metrics recorded" in section
    assert section.count(".</p>") == 2  # the caption and the one sentence


def _one_error_line(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        pareto.main([*argv, "--importance", "none"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_input_is_still_one_line(tmp_path, capsys) -> None:
    folder = tmp_path / "runs" / "figures" / "s"
    write_search(folder, trials_frame(), None)
    err = _one_error_line(capsys, str(folder), "--metrics", "val_nothing,val_acc")
    assert "unknown metric 'val_nothing'" in err
    failed = tmp_path / "runs" / "figures" / "failed"
    write_search(failed, trials_frame().assign(status="failed", error="out of memory"), None)
    err = _one_error_line(capsys, str(failed))
    assert "none of its 12 trials finished with status ok" in err
