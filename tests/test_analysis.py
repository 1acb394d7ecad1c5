"""analysis/: Pareto ranks against a brute-force reference, hypervolume and knee by hand,
the selection / ablation / importance tables, and the command line end to end (files,
MLflow input, artifacts on the parent run, one-line errors)."""

from __future__ import annotations

import base64
import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis import pareto, report
from analysis.importance import importance_table, infer_distribution
from analysis.objectives import Objective, metric_direction, parse_objectives
from analysis.plots import staircase
from analysis.result_tables import ORACLE, ORACLE_GAP, VAL_SELECTED, ablation_table, selection_table
from croft_search.errors import ConfigError
from croft_search.fronts import hypervolume, knee_point, pareto_ranks, pareto_ranks_bruteforce

REPOSITORY = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- fixtures


def synthetic_trials(
    methods: tuple[str, ...] = ("croft", "coop", "zsclip"),
    per_method: int = 10,
    seed: int = 0,
    failed: int = 1,
) -> pd.DataFrame:
    """Rows in the trials.parquet layout: accuracy rises and AUROC falls with lambda1 (a
    trade-off, so the front has several points), n_ctx and optimizer barely matter."""
    rng = np.random.default_rng(seed)
    rows = []
    for method_index, method in enumerate(methods):
        for index in range(per_method):
            lambda1 = float(10 ** rng.uniform(-4, 0))
            position = (np.log10(lambda1) + 4) / 4  # 0..1
            acc = 0.45 + 0.05 * method_index + 0.2 * position + rng.normal(0, 0.005)
            auroc = 0.95 - 0.2 * position + rng.normal(0, 0.005)
            rows.append(
                {
                    "trial_id": f"{method}-{index:03d}",
                    "search": "demo",
                    "space": "croft_digits",
                    "method": method,
                    "status": "ok",
                    "error": "",
                    "seed": index % 3,
                    "selection": "val",
                    "wall_seconds": float(rng.uniform(1, 5)),
                    "train_seconds": float(rng.uniform(1, 4)),
                    "node": "node-0",
                    "mlflow_run_id": "",
                    "finished_at": "2025-01-01T00:00:00+00:00",
                    "config/lambda1": lambda1,
                    "config/n_ctx": int(rng.choice([4, 8, 16])),
                    "config/optimizer": str(rng.choice(["sgd", "adamw"])),
                    "val_acc": acc + rng.normal(0, 0.01),
                    "val_auroc": auroc + rng.normal(0, 0.01),
                    "val_fpr95": 1.0 - auroc,
                    "test_acc": acc,
                    "test_auroc": auroc,
                    "test_fpr95": 1.0 - auroc + 0.05,
                    "test_aupr_in": auroc,
                    "test_aupr_out": auroc - 0.02,
                    "objective": 0.5 * acc + 0.5 * auroc,
                }
            )
    for index in range(failed):
        rows.append(
            {"trial_id": f"failed-{index}", "search": "demo", "space": "croft_digits",
             "method": methods[0], "status": "failed", "error": "out of memory", "seed": 0,
             "selection": "val"}
        )  # fmt: skip
    return pd.DataFrame(rows)


@pytest.fixture
def search_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "runs" / "croft_digits" / "demo"
    folder.mkdir(parents=True)
    trials = synthetic_trials()
    trials["config/variant"] = ["full", "no_edr"] * (len(trials) // 2) + ["full"] * (
        len(trials) % 2
    )
    trials.to_parquet(folder / "trials.parquet")
    return folder


def run_main(*argv: str) -> int:
    """The CLI in-process (imports once per session instead of once per call)."""
    return pareto.main([*argv, "--importance", "none"])


# ----------------------------------------------------------------------------- ranks


def _point_sets(dimensions: int) -> st.SearchStrategy:
    """Small integer grids make ties and duplicates common; a float draw keeps real values."""
    coordinate = st.one_of(
        st.integers(-2, 2).map(float),
        st.sampled_from([0.0, -0.0, 0.5, 1e-9, 1.0]),
        st.floats(-10, 10, allow_nan=False, allow_subnormal=False),
    )
    row = st.lists(coordinate, min_size=dimensions, max_size=dimensions)
    return st.tuples(
        st.lists(row, min_size=0, max_size=40),
        st.lists(st.booleans(), min_size=dimensions, max_size=dimensions),
    )


@pytest.mark.parametrize("dimensions", [2, 3, 4])
def test_ranks_match_brute_force(dimensions: int) -> None:
    @settings(max_examples=120, deadline=None, derandomize=True)
    @given(_point_sets(dimensions))
    def check(case: tuple[list[list[float]], list[bool]]) -> None:
        rows, maximize = case
        values = np.asarray(rows, dtype=float).reshape(-1, dimensions)
        expected = pareto_ranks_bruteforce(values, maximize)
        np.testing.assert_array_equal(pareto_ranks(values, maximize), expected)

    check()


def test_ranks_on_random_larger_sets_with_duplicates() -> None:
    rng = np.random.default_rng(1)
    for dimensions in (1, 2, 3, 4, 5):
        values = rng.integers(0, 6, size=(300, dimensions)).astype(float)
        values = np.vstack([values, values[:50]])  # exact duplicates
        maximize = list(rng.random(dimensions) < 0.5)
        np.testing.assert_array_equal(
            pareto_ranks(values, maximize), pareto_ranks_bruteforce(values, maximize)
        )


def test_rank_definitions_by_hand() -> None:
    # Identical points share a rank; a point equal in one objective and worse in the other
    # is dominated (weak dominance); -0.0 equals 0.0.
    values = [[1, 1], [1, 1], [1, 0], [0, 0], [-0.0, 0.0], [2, -1]]
    np.testing.assert_array_equal(pareto_ranks(values), [0, 0, 1, 2, 2, 0])
    # Minimising the second objective flips which point wins.
    np.testing.assert_array_equal(pareto_ranks([[1, 0.2], [1, 0.1]], [True, False]), [1, 0])
    assert pareto_ranks(np.zeros((0, 2))).shape == (0,)
    np.testing.assert_array_equal(pareto_ranks([[3.0], [1.0], [3.0]]), [0, 1, 0])
    with pytest.raises(ConfigError, match="NaN"):
        pareto_ranks([[np.nan, 1.0]])


# ----------------------------------------------------------------------------- hypervolume


def test_hypervolume_by_hand_2d() -> None:
    assert hypervolume([[1, 3], [2, 2], [3, 1]], [0, 0]) == pytest.approx(6.0)
    # A dominated point and a duplicate add nothing; a point not beyond the reference
    # in every objective adds nothing.
    assert hypervolume([[1, 3], [2, 2], [3, 1], [1, 1], [2, 2], [-1, 9]], [0, 0]) == 6.0
    # accuracy up, FPR down, reference (0, 1): boxes 0.8 x 0.8 and 0.6 x 0.9 overlap in
    # 0.6 x 0.8, so 0.64 + 0.54 - 0.48 = 0.70.
    assert hypervolume([[0.8, 0.2], [0.6, 0.1]], [0, 1], [True, False]) == pytest.approx(0.70)
    assert hypervolume([[1, 1]], [2, 2]) == 0.0


def test_hypervolume_by_hand_3d_and_4d() -> None:
    # Three boxes of volume 2 pairwise overlapping in unit cubes with a common unit cube:
    # 3 * 2 - 3 * 1 + 1 = 4.
    assert hypervolume([[2, 1, 1], [1, 2, 1], [1, 1, 2]], [0, 0, 0]) == pytest.approx(4.0)
    # (1,2,3) and (3,2,1): 6 + 6 - 1 * 2 * 1 = 10.
    assert hypervolume([[1, 2, 3], [3, 2, 1]], [0, 0, 0]) == pytest.approx(10.0)
    # Shifted reference and a minimised objective: box (2, 3, 4) -> 24.
    assert hypervolume([[3, 4, -5]], [1, 1, -1], [True, True, False]) == pytest.approx(24.0)
    assert hypervolume([[2, 1, 1, 1], [1, 2, 1, 1]], [0, 0, 0, 0]) == pytest.approx(3.0)


@pytest.mark.parametrize("dimensions", [2, 3, 4])
def test_hypervolume_matches_counting_unit_cells(dimensions: int) -> None:
    """On integer points the dominated volume is the number of unit cells under some point."""
    rng = np.random.default_rng(dimensions)
    for _ in range(15):
        points = rng.integers(1, 5, size=(int(rng.integers(1, 7)), dimensions))
        cells = np.array(list(itertools.product(range(4), repeat=dimensions)))  # lower corners
        covered = ((cells[:, None, :] + 1) <= points[None, :, :]).all(axis=2).any(axis=1)
        assert hypervolume(points, np.zeros(dimensions)) == pytest.approx(covered.sum())


# ----------------------------------------------------------------------------- knee


def test_knee_point_by_hand() -> None:
    # Rescaled sums: 1.0, 1.5, 1.4, 1.0 -> the second point.
    front = [[0.0, 1.0], [0.6, 0.9], [0.9, 0.5], [1.0, 0.0]]
    assert knee_point(front) == 1
    # The same front with the second objective negated and minimised: same knee.
    assert knee_point([[a, -b] for a, b in front], [True, False]) == 1
    assert knee_point([[0.3, 0.4]]) == 0


def test_staircase_runs_through_the_front() -> None:
    line = staircase(np.array([[3.0, 1.0], [1.0, 3.0], [2.0, 2.0]]), [True, True])
    np.testing.assert_array_equal(line, [[1, 3], [1, 2], [2, 2], [2, 1], [3, 1]])


# ----------------------------------------------------------------------------- objectives


def test_directions_and_metric_parsing() -> None:
    assert metric_direction("test_acc") is True
    assert metric_direction("photo/test_fpr95") is False
    assert metric_direction("wall_seconds") is False
    assert metric_direction("test_aupr_out") is True
    assert metric_direction("epochs_run") is None
    parsed = parse_objectives(
        "test_acc, test_fpr95, epochs_run:max", ["test_acc", "test_fpr95", "epochs_run"]
    )
    assert parsed == [
        Objective("test_acc", True), Objective("test_fpr95", False), Objective("epochs_run", True)
    ]  # fmt: skip
    assert (
        parse_objectives("test_acc:min,test_auroc", ["test_acc", "test_auroc"])[0].maximize is False
    )
    with pytest.raises(ConfigError, match="no known direction"):
        parse_objectives("test_acc,epochs_run", ["test_acc", "epochs_run"])


# ----------------------------------------------------------------------------- tables


def test_selection_table_validation_versus_oracle() -> None:
    frame = pd.DataFrame(
        {
            "trial_id": ["a", "b", "c", "d", "e"],
            "method": ["m", "m", "m", "n", "n"],
            "selection": ["val", "val", "oracle", "val", "val"],
            "objective": [0.70, 0.80, 0.99, 0.5, 0.6],
            "test_acc": [0.60, 0.50, 0.90, 0.4, 0.3],
            "test_auroc": [0.80, 0.70, 0.90, 0.4, 0.7],
            "test_fpr95": [0.30, 0.40, 0.10, 0.5, 0.5],
        }
    )
    table, notes = selection_table(frame, "method", weight=0.5)
    assert notes == []
    m = table[table["method"] == "m"].set_index("row")
    assert m.loc[VAL_SELECTED, "trial_id"] == "b"  # highest validation objective
    assert m.loc[ORACLE, "trial_id"] == "c"  # best 0.5 acc + 0.5 auroc on test (0.9)
    assert m.loc[ORACLE_GAP, "test_acc"] == pytest.approx(0.40)
    assert m.loc[ORACLE_GAP, "test_fpr95"] == pytest.approx(-0.30)
    n = table[table["method"] == "n"].set_index("row")
    assert n.loc[VAL_SELECTED, "trial_id"] == "e"
    assert n.loc[ORACLE, "trial_id"] == "e"  # test scores 0.40 vs 0.50
    assert n.loc[ORACLE_GAP, "test_auroc"] == 0.0
    # The weight decides the oracle: accuracy only picks d for method n.
    table, _ = selection_table(frame, "method", weight=1.0)
    assert table.set_index(["method", "row"]).loc[("n", ORACLE), "trial_id"] == "d"
    # Only oracle-mode trials: no validation-selected row, and a note says so.
    table, notes = selection_table(frame[frame["trial_id"] == "c"], "method", weight=0.5)
    assert list(table["row"]) == [ORACLE] and "no trial with selection 'val'" in notes[0]


def test_ablation_table_mean_std_and_difference_to_full() -> None:
    frame = pd.DataFrame(
        {
            "method": ["croft"] * 6,
            "config/variant": ["full", "full", "full", "no_edr", "no_edr", "text_only"],
            "seed": [0, 1, 2, 0, 1, 0],
            "selection": ["val"] * 6,
            "objective": [0.5] * 6,
            "test_acc": [0.80, 0.82, 0.84, 0.70, 0.74, 0.60],
        }
    )
    table, notes = ablation_table(frame, ["test_acc"])
    table = table.set_index("variant")
    assert list(table.index) == ["full", "no_edr", "text_only"]
    assert table.loc["full", "n seeds"] == 3
    assert table.loc["full", "test_acc mean"] == pytest.approx(0.82)
    assert table.loc["full", "test_acc std"] == pytest.approx(0.02)  # sample std (ddof=1)
    assert table.loc["no_edr", "test_acc std"] == pytest.approx(np.sqrt(0.0008))
    assert table.loc["no_edr", "test_acc Δ vs full"] == pytest.approx(-0.10)
    assert np.isnan(table.loc["text_only", "test_acc std"])  # one seed: no spread
    assert table.loc["text_only", "test_acc Δ vs full"] == pytest.approx(-0.22)
    # |Δ| against the larger seed std of the two: 0.10 > 0.0283 (no_edr); full itself 0.
    assert table.loc["no_edr", "test_acc beyond spread"] is True
    assert table.loc["full", "test_acc beyond spread"] is False
    assert table.loc["text_only", "test_acc beyond spread"] is None  # one seed: unknown
    assert notes == []
    assert ablation_table(frame.drop(columns="config/variant"), ["test_acc"])[0].empty


def test_ablation_takes_the_validation_selected_trial_per_seed() -> None:
    frame = pd.DataFrame(
        {
            "method": ["croft"] * 4,
            "config/variant": ["full", "full", "full", "no_edr"],
            "seed": [0, 0, 1, 0],
            "selection": ["val"] * 4,
            "objective": [0.1, 0.9, 0.5, 0.5],
            "test_acc": [0.2, 0.8, 0.6, 0.5],
        }
    )
    table, notes = ablation_table(frame, ["test_acc"])
    assert table.set_index("variant").loc["full", "test_acc mean"] == pytest.approx(0.7)
    assert "validation-selected" in notes[0]


def test_importance_ranks_the_parameter_that_decides_the_objective() -> None:
    rng = np.random.default_rng(0)
    n = 40
    decisive = rng.uniform(1e-4, 1.0, n)
    frame = pd.DataFrame(
        {
            "method": ["croft"] * n,
            "config/lambda1": decisive,
            "config/noise": rng.uniform(0, 1, n),
            "config/n_ctx": rng.choice([4, 8, 16], n),
            "config/optimizer": rng.choice(["sgd", "adamw"], n),
            "config/fixed": [1.0] * n,
            "test_acc": np.log10(decisive),
            "test_fpr95": -np.log10(decisive),
        }
    )
    objectives = [Objective("test_acc", True), Objective("test_fpr95", False)]
    table, notes = importance_table(frame, objectives, "method")
    assert notes == []
    for metric in ("test_acc", "test_fpr95"):
        ranked = table[table["metric"] == metric].sort_values("rank")
        assert ranked["parameter"].iloc[0] == "lambda1"
        assert ranked["importance"].iloc[0] > 0.5
        assert "fixed" not in set(ranked["parameter"])  # constant: not a searched parameter
    assert infer_distribution(frame["config/lambda1"]).log  # spans 4 decades
    # Too few trials: skipped with a note, not an error.
    table, notes = importance_table(frame.head(3), objectives, "method")
    assert table.empty and "needs at least 4" in notes[0]


# ----------------------------------------------------------------------------- command line


def test_cli_writes_its_files(search_folder: Path, capsys: pytest.CaptureFixture) -> None:
    assert pareto.main([str(search_folder), "--metrics", "test_acc,test_fpr95"]) == 0
    out = search_folder / "analysis-oracle"  # a test front never replaces the validation one
    assert sorted(p.name for p in out.iterdir()) == [
        "front.md", "history.png", "importance.png", "parallel_coordinates.png", "pareto.csv",
        "pareto.png", "report.html",
    ]  # fmt: skip
    printed = capsys.readouterr().out
    assert "reference point: (test_acc=0, test_fpr95=1)" in printed

    csv = pd.read_csv(out / "pareto.csv")
    ok = csv[csv["status"] == "ok"]
    expected = pareto_ranks(ok[["test_acc", "test_fpr95"]].to_numpy(), [True, False])
    np.testing.assert_array_equal(ok["rank"].to_numpy(), expected)
    assert (ok["on_front"] == (ok["rank"] == 0)).all()
    for _, members in ok.groupby("method"):
        np.testing.assert_array_equal(
            members["group_rank"],
            pareto_ranks(members[["test_acc", "test_fpr95"]].to_numpy(), [True, False]),
        )
    failed = csv[csv["status"] == "failed"]
    assert len(failed) == 1 and failed["rank"].isna().all() and not failed["on_front"].any()

    markdown = (out / "front.md").read_text()
    assert "## Ablation (mean ± sample std over seeds)" in markdown
    assert "test_acc Δ vs full" in markdown and "test_acc beyond spread" in markdown
    combined = markdown.split("## Combined front")[1].split("## Front of")[0]
    for trial_id in ok.loc[ok["on_front"], "trial_id"]:
        assert f"| {trial_id} |" in combined
    for trial_id in ok.loc[ok["rank"] > 0, "trial_id"]:
        assert f"| {trial_id} |" not in combined

    page = (out / "report.html").read_text()
    png = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert png and base64.b64decode(png.group(1))[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<table>" in page and ORACLE in page and "<script" not in page
    assert (
        "Ablation" in page and "test_acc Δ vs full" in page and "Hyper-parameter importance" in page
    )
    assert "http://" not in page and "https://" not in page  # opens offline
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_the_report_labels_the_protocol(tmp_path: Path) -> None:
    trials = synthetic_trials(methods=("croft",), per_method=8)
    ours = "eval=ours;checkpoint=last;shots_per=class_and_domain;val_shots=0"
    reference = "eval=reference;checkpoint=best_val;shots_per=dassl_balance;val_shots=16"
    analysis = pareto.analyse(trials.assign(protocol=reference), "test_acc,test_auroc")
    assert analysis.protocols == [reference]
    text = report.front_markdown(analysis)
    assert f"Protocol: {reference} (the CRoFT reference's evaluation" in text
    assert not any("protocols" in note for note in analysis.notes)
    mixed = trials.assign(protocol=[[ours, reference][i % 2] for i in range(len(trials))])
    analysis = pareto.analyse(mixed, "test_acc,test_auroc")
    assert analysis.protocols == sorted([ours, reference])
    assert "the trials ran under 2 protocols; fronts and tables mix them" in analysis.notes
    page = report.report_html(analysis, {"plot": b"png"})
    assert "Protocol: eval=ours" in page and "not comparable with eval=ours" in page
    old = pareto.analyse(trials, "test_acc,test_auroc")
    assert "Protocol: not recorded" in report.front_markdown(old)


def test_cli_compares_several_searches(tmp_path: Path) -> None:
    folders = []
    for name, seed in (("first", 1), ("second", 2)):
        folder = tmp_path / "croft_digits" / name
        folder.mkdir(parents=True)
        trials = synthetic_trials(("croft", "coop"), per_method=6, seed=seed, failed=0)
        trials.to_parquet(folder / "trials.parquet")
        folders.append(folder)
    out = tmp_path / "compare"
    assert run_main(str(folders[0]), str(folders[1] / "trials.parquet"), "--out", str(out)) == 0
    csv = pd.read_csv(out / "pareto.csv")
    assert set(csv["source"]) == {"croft_digits/first", "croft_digits/second"}
    assert set(csv["source / method"]) == {
        f"croft_digits/{s} / {m}" for s in ("first", "second") for m in ("croft", "coop")
    }
    np.testing.assert_array_equal(
        csv["rank"], pareto_ranks(csv[["val_acc", "val_auroc"]].to_numpy())
    )


def test_cli_runs_as_a_script() -> None:
    """`python analysis/pareto.py` from another folder (its own folder must not shadow
    packages); a user error is one line on stderr and exit code 2."""
    completed = subprocess.run(
        [sys.executable, str(REPOSITORY / "analysis" / "pareto.py"), "no/such/folder"],
        capture_output=True, text=True, cwd="/", timeout=120,
    )  # fmt: skip
    assert completed.returncode == 2, completed.stderr
    assert completed.stderr.strip() == "error: no such file or folder: no/such/folder"


def _error_line(capsys: pytest.CaptureFixture, *argv: str) -> str:
    with pytest.raises(SystemExit) as exited:
        run_main(*argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # One line of ours (MLflow may log its own INFO lines first when it creates a store).
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and not any(
        line.startswith("error") for line in lines[:-1]
    )
    return lines[-1]


def test_cli_bad_inputs(tmp_path: Path, search_folder: Path, capsys: pytest.CaptureFixture) -> None:
    assert "no such file or folder" in _error_line(capsys, str(tmp_path / "missing"))
    empty_folder = tmp_path / "empty"
    empty_folder.mkdir()
    assert "holds no trials.parquet" in _error_line(capsys, str(empty_folder))

    no_rows = tmp_path / "no_rows.parquet"
    synthetic_trials().iloc[:0].to_parquet(no_rows)
    assert "holds no trials" in _error_line(capsys, str(no_rows))
    all_failed = tmp_path / "all_failed.parquet"
    synthetic_trials(per_method=0, failed=2).to_parquet(all_failed)
    err = _error_line(capsys, str(all_failed))
    assert "none of its 2 trials finished with status ok" in err and "out of memory" in err
    not_parquet = tmp_path / "trials.parquet.txt"
    not_parquet.write_text("hello")
    assert "cannot read" in _error_line(capsys, str(not_parquet))

    err = _error_line(capsys, str(search_folder), "--metrics", "test_acc,test_accuracy")
    assert "unknown metric 'test_accuracy'" in err and "test_auroc" in err and "val_fpr95" in err
    assert "config/" not in err
    assert "at least two metrics" in _error_line(
        capsys, str(search_folder), "--metrics", "test_acc"
    )

    folder = str(search_folder)
    assert "needs 2 values" in _error_line(capsys, folder, "--reference-point", "0")
    assert "must be numbers" in _error_line(capsys, folder, "--reference-point", "0,x")
    assert "must be finite" in _error_line(capsys, folder, "--reference-point", "0,nan")
    # FPR95's corner at 0 instead of 1: no trial beats it, every hypervolume would be 0.
    err = _error_line(
        capsys, folder, "--metrics", "test_acc,test_fpr95", "--reference-point", "0,0"
    )
    assert "bad reference point" in err
    assert "cannot group by" in _error_line(capsys, folder, "--by", "nonexistent")
    assert "not both" in _error_line(capsys, folder, "--mlflow-experiment", "x")


# ----------------------------------------------------------------------------- MLflow


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact folder lands in the tmp dir
    return f"sqlite:///{tmp_path}/mlflow.db"


def _log_search(uri: str, experiment: str, trials: pd.DataFrame) -> str:
    """Log like croft_search.tracking: a parent run and one child run per trial."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment(experiment)
    parent = client.create_run(experiment_id, run_name="demo").info.run_id
    metrics = ["val_acc", "val_auroc", "test_acc", "test_auroc", "test_fpr95", "objective"]
    for row in trials.to_dict("records"):
        run = client.create_run(
            experiment_id,
            tags={"mlflow.parentRunId": parent, "croft.trial_id": row["trial_id"],
                  "method": row["method"], "status": row["status"]},
        )  # fmt: skip
        run_id = run.info.run_id
        params = {key: row[f"config/{key}"] for key in ("lambda1", "n_ctx", "optimizer")}
        params |= {"method": row["method"], "selection": row["selection"]}
        client.log_batch(
            run_id,
            metrics=[Metric(name, row[name], 0, 0) for name in metrics],
            params=[Param(key, str(value)) for key, value in params.items()],
        )
        client.set_terminated(run_id, "FINISHED")
    client.set_terminated(parent, "FINISHED")
    return parent


def _artifacts(uri: str, run_id: str, folder: str = "analysis") -> set[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return {Path(item.path).name for item in client.list_artifacts(run_id, folder)}


@pytest.mark.slow
def test_cli_reads_mlflow_and_logs_to_the_parent_run(
    mlflow_store: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    trials = synthetic_trials(("croft", "coop"), per_method=4, failed=0)
    parent = _log_search(mlflow_store, "croft_digits", trials)
    out = tmp_path / "from-mlflow"
    assert (
        run_main(
            "--mlflow-experiment", "croft_digits", "--tracking-uri", mlflow_store, "--out", str(out)
        )  # fmt: skip
        == 0
    )
    csv = pd.read_csv(out / "pareto.csv")
    assert sorted(csv["trial_id"]) == sorted(trials["trial_id"])  # the parent is not a trial
    assert csv["config/n_ctx"].dtype.kind == "i"  # params parsed back from strings
    merged = csv.merge(trials, on="trial_id", suffixes=("", "_logged"))
    np.testing.assert_allclose(merged["test_acc"], merged["test_acc_logged"])
    np.testing.assert_array_equal(  # the default: the validation front
        csv["rank"], pareto_ranks(csv[["val_acc", "val_auroc"]].to_numpy())
    )
    assert _artifacts(mlflow_store, parent) == {
        "front.md", "pareto.csv", "pareto.png", "report.html", "parallel_coordinates.png",
        "history.png",
    }  # fmt: skip

    # A search folder whose search.json names the parent run: the report lands there too.
    folder = tmp_path / "runs" / "croft_digits" / "demo"
    folder.mkdir(parents=True)
    trials.to_parquet(folder / "trials.parquet")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_store)
    experiment_id = client.create_experiment("other_search")
    second_parent = client.create_run(experiment_id).info.run_id
    (folder / "search.json").write_text(
        json.dumps({"mlflow_parent_run_id": second_parent, "tracking_uri": mlflow_store})
    )
    assert run_main(str(folder)) == 0
    assert _artifacts(mlflow_store, second_parent) == {
        "front.md", "pareto.csv", "pareto.png", "report.html", "parallel_coordinates.png",
        "history.png",
    }  # fmt: skip
    # An oracle's report goes beside it, under its own name.
    assert run_main(str(folder), "--metrics", "test_acc,test_auroc") == 0
    assert "report.html" in _artifacts(mlflow_store, second_parent, "analysis-oracle")

    err = _error_line(capsys, "--mlflow-experiment", "nope", "--tracking-uri", mlflow_store)
    assert "no MLflow experiment named 'nope'" in err


def test_the_default_front_is_chosen_on_validation_with_test_metrics_beside(
    search_folder: Path, capsys: pytest.CaptureFixture
) -> None:
    assert run_main(str(search_folder)) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("Validation front")
    out = search_folder / "analysis"
    csv = pd.read_csv(out / "pareto.csv")
    ok = csv[csv["status"] == "ok"]
    expected = pareto_ranks(ok[["val_acc", "val_auroc"]].to_numpy(), [True, True])
    np.testing.assert_array_equal(ok["rank"].to_numpy(), expected)
    markdown = (out / "front.md").read_text(encoding="utf-8")
    assert markdown.startswith("# Validation front")
    header = next(line for line in markdown.splitlines() if line.startswith("| trial_id"))
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    assert columns[columns.index("val_auroc") + 1 :][:2] == ["test_acc", "test_auroc"]
    # The front's rows carry their trials' own test metrics.
    on_front = ok[ok["rank"] == 0].set_index("trial_id")
    first = next(line for line in markdown.splitlines() if line.startswith("| ") and
                 line.split("|")[1].strip() in on_front.index)  # fmt: skip
    cells = [cell.strip() for cell in first.strip("|").split("|")]
    trial = on_front.loc[cells[0]]
    assert float(cells[columns.index("test_acc")]) == pytest.approx(trial["test_acc"], abs=1e-4)
    report = (out / "report.html").read_text(encoding="utf-8")
    assert "<h2 class='validation'>Validation front" in report and "ORACLE front" not in report


def test_a_test_front_is_labelled_oracle_everywhere(search_folder: Path) -> None:
    from analysis.model import ORACLE_TITLE
    from analysis.plots import ORACLE_COLOUR, pareto_figure

    assert run_main(str(search_folder), "--metrics", "test_acc,test_auroc") == 0
    out = search_folder / "analysis-oracle"
    assert (out / "front.md").read_text(encoding="utf-8").startswith(f"# {ORACLE_TITLE}")
    report = (out / "report.html").read_text(encoding="utf-8")
    assert f"<h2 class='oracle'>{ORACLE_TITLE}</h2>" in report and "class='warning'" in report
    assert not (search_folder / "analysis").exists()
    # The plot's title says it in red, and an oracle has no "on test" points to add.
    trials = pd.read_parquet(search_folder / "trials.parquet")
    analysis = pareto.analyse(trials, "test_acc,test_auroc", importance=None)
    ranked = analysis.trials[analysis.trials["rank"].notna()]
    axes = pareto_figure(ranked, analysis.objectives, analysis.group_column).axes[0]
    assert axes.title.get_text().startswith(ORACLE_TITLE)
    assert axes.title.get_color() == ORACLE_COLOUR
    assert not [c for c in axes.collections if "on test" in c.get_label()]


def test_the_validation_plot_shows_the_fronts_test_metrics(search_folder: Path) -> None:
    from analysis.plots import TEST_LABEL, pareto_figure

    analysis = pareto.analyse(pd.read_parquet(search_folder / "trials.parquet"), importance=None)
    ranked = analysis.trials[analysis.trials["rank"].notna()]
    axes = pareto_figure(ranked, analysis.objectives, analysis.group_column).axes[0]
    assert axes.title.get_text().startswith("Validation front")
    assert axes.title.get_color() == "black"
    (on_test,) = [c for c in axes.collections
                  if c.get_label() == TEST_LABEL.format("test_acc", "test_auroc")]  # fmt: skip
    front = ranked[ranked["rank"] == 0]
    expected = front[["test_acc", "test_auroc"]].to_numpy(dtype=float)
    np.testing.assert_allclose(np.asarray(on_test.get_offsets()), expected)
    assert "test_acc" in axes.get_xlabel() and "test_auroc" in axes.get_ylabel()
