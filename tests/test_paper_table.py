"""analysis/paper_table.py: the paper-shaped table of validation-selected trials, its cells
worked out by hand, its Markdown and LaTeX, searches combined, bad inputs, and the command
line writing paper.md / paper.tex."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from analysis import pareto
from analysis.load import load_trials
from analysis.paper_table import paper_markdown, paper_table, to_latex
from croft_search.errors import ConfigError

# The metrics of the trial validation selects for each (method, seed), as fractions:
# (art_painting acc, sketch acc, ssb_hard auroc, ssb_hard fpr95, ninco auroc, ninco fpr95).
SELECTED = {
    "croft": [
        (0.90, 0.80, 0.70, 0.50, 0.90, 0.30),
        (0.92, 0.80, 0.72, 0.40, 0.90, 0.33),
        (0.94, 0.83, 0.74, 0.45, 0.90, 0.36),
    ],
    "coop": [
        (0.80, 0.70, 0.60, 0.60, 0.80, 0.40),
        (0.84, 0.70, 0.62, 0.60, 0.82, 0.50),
    ],
}
# Better on test than the selected trial in every metric; a wrong selection shows them.
BEST_ON_TEST = (0.99, 0.99, 0.99, 0.01, 0.99, 0.01)
ORACLE_PICK = (0.98, 0.98, 0.98, 0.02, 0.98, 0.02)

# Worked out by hand from SELECTED (values in %, sample std with n - 1):
# croft art_painting 90, 92, 94: mean 92, std sqrt((4 + 0 + 4) / 2) = 2.
# croft sketch 80, 80, 83: mean 81, std sqrt((1 + 1 + 4) / 2) = 1.73.
# croft average per seed 85, 86, 88.5: mean 86.5, std sqrt((2.25 + 0.25 + 4) / 2) = 1.80.
# croft ssb_hard AUROC 70, 72, 74: 72 ± 2; FPR95 50, 40, 45: 45 ± sqrt((25 + 25) / 2) = 5.
# croft ninco AUROC 90 three times: 90 ± 0; FPR95 30, 33, 36: 33 ± 3.
# croft mean AUROC per seed 80, 81, 82: 81 ± 1; mean FPR95 40, 36.5, 40.5: 39 ±
#   sqrt((1 + 6.25 + 2.25) / 2) = 2.18.
# coop (two seeds, std = |a - b| / sqrt(2)): art_painting 80, 84: 82 ± 2.83; sketch 70, 70;
# average 75, 77: 76 ± 1.41; ssb_hard AUROC 60, 62: 61 ± 1.41, FPR95 60, 60; ninco AUROC
# 80, 82: 81 ± 1.41, FPR95 40, 50: 45 ± 7.07; mean AUROC 70, 72: 71 ± 1.41, mean FPR95
# 50, 55: 52.5 ± 3.54.
CROFT_ROW = ["croft", 3, "92.0 ± 2.0", "81.0 ± 1.7", "86.5 ± 1.8", "72.0 ± 2.0",
             "45.0 ± 5.0", "90.0 ± 0.0", "33.0 ± 3.0", "81.0 ± 1.0", "39.0 ± 2.2"]  # fmt: skip
COOP_ROW = ["coop", 2, "82.0 ± 2.8", "70.0 ± 0.0", "76.0 ± 1.4", "61.0 ± 1.4",
            "60.0 ± 0.0", "81.0 ± 1.4", "45.0 ± 7.1", "71.0 ± 1.4", "52.5 ± 3.5"]  # fmt: skip
AUROC, FPR95 = "AUROC ↑", "FPR95 ↓"
COLUMNS = [
    ("", "method"), ("", "seeds"),
    ("accuracy", "art_painting"), ("accuracy", "sketch"), ("accuracy", "avg"),
    ("ssb_hard", AUROC), ("ssb_hard", FPR95), ("ninco", AUROC), ("ninco", FPR95),
    ("open-set mean", AUROC), ("open-set mean", FPR95),
]  # fmt: skip


def trial(
    method: str,
    seed: int | None,
    values: tuple[float, ...],
    objective: float,
    selection: str = "val",
    status: str = "ok",
    **extra: object,
) -> dict[str, object]:
    """One row as a trial over both target domains and both test open sets records it:
    per-domain accuracies and per-set metrics, the plain keys their means."""
    art, sketch, ssb_auroc, ssb_fpr, ninco_auroc, ninco_fpr = values
    row = {
        "trial_id": f"{method}-{seed}-{objective}-{selection}-{status}",
        "method": method,
        "status": status,
        "error": "" if status == "ok" else "out of memory",
        "seed": seed,
        "selection": selection,
        "target_domains": "art_painting,sketch",
        "objective": objective,
        "val_acc": objective,
        "val_auroc": objective,
        "art_painting/test_acc": art,
        "sketch/test_acc": sketch,
        "test_acc": (art + sketch) / 2,
        "test_auroc_ssb_hard": ssb_auroc,
        "test_fpr95_ssb_hard": ssb_fpr,
        "test_auroc_ninco": ninco_auroc,
        "test_fpr95_ninco": ninco_fpr,
        "test_auroc": (ssb_auroc + ninco_auroc) / 2,
        "test_fpr95": (ssb_fpr + ninco_fpr) / 2,
    }
    return row | extra


def search_trials(method: str) -> pd.DataFrame:
    """One search of `method`: per seed, a trial better on test but worse on validation
    (first, so a first-row pick would take it), the validation-selected trial, an
    oracle-selected trial with the highest objective, and a failed trial."""
    rows = []
    for seed, values in enumerate(SELECTED[method]):
        rows += [
            trial(method, seed, BEST_ON_TEST, objective=0.6),
            trial(method, seed, values, objective=0.8),
            trial(method, seed, ORACLE_PICK, objective=0.99, selection="oracle"),
            trial(method, seed, BEST_ON_TEST, objective=1.0, status="failed"),
        ]
    return pd.DataFrame(rows)


def rows_of(table: pd.DataFrame) -> list[list[object]]:
    return [list(row) for row in table.itertuples(index=False)]


# ----------------------------------------------------------------------------- cells


def test_cells_are_mean_and_std_over_seeds_of_the_validation_selected_trials() -> None:
    table = paper_table(pd.concat([search_trials("croft"), search_trials("coop")]))
    assert list(table.columns) == COLUMNS
    assert rows_of(table) == [CROFT_ROW, COOP_ROW]


def test_one_seed_shows_the_mean_and_no_seed_column_makes_one_seed() -> None:
    frame = search_trials("croft")
    one_seed = paper_table(frame[frame["seed"] == 2])
    assert rows_of(one_seed)[0][:5] == ["croft", 1, "94.0", "83.0", "88.5"]
    # Without seeds every finished val trial competes: seed 0's, 1's and 2's selected
    # trials tie at objective 0.8, and the first (seed 0's) wins.
    unseeded = paper_table(frame.drop(columns="seed"))
    assert rows_of(unseeded)[0][:5] == ["croft", 1, "90.0", "80.0", "85.0"]


def test_ablation_rows_per_variant_with_one_open_set() -> None:
    """An ablation search with a single test open set: one row per variant, one AUROC /
    FPR95 pair; combined with a baseline search, the method joins the labels."""
    rows = []
    for variant, seeds in (("full", (0, 1)), ("no_edr", (0,))):
        for seed in seeds:
            selected = (0.90 + 0.02 * seed, 0.80, 0.70 + 0.04 * seed, 0.40, 0.0, 0.0)
            if variant == "no_edr":
                selected = (0.60, 0.50, 0.55, 0.65, 0.0, 0.0)
            for values, objective in ((BEST_ON_TEST, 0.5), (selected, 0.7)):
                rows.append(trial("croft", seed, values, objective, **{"config/variant": variant}))
    single_set = ["test_auroc_ssb_hard", "test_fpr95_ssb_hard", "test_auroc_ninco",
                  "test_fpr95_ninco"]  # fmt: skip
    frame = pd.DataFrame(rows).drop(columns=single_set)
    # With one set the trial's test_auroc / test_fpr95 are that set's.
    frame["test_auroc"] = [0.99, 0.70, 0.99, 0.74, 0.99, 0.55]
    frame["test_fpr95"] = [0.01, 0.40, 0.01, 0.40, 0.01, 0.65]
    table = paper_table(frame)
    assert list(table.columns) == [
        ("", "variant"), ("", "seeds"),
        ("accuracy", "art_painting"), ("accuracy", "sketch"), ("accuracy", "avg"),
        ("OOD detection", AUROC), ("OOD detection", FPR95),
    ]  # fmt: skip
    # full: art_painting 90, 92 (91 ± 1.41); sketch 80, 80; average 85, 86 (85.5 ± 0.71);
    # AUROC 70, 74 (72 ± 2.83); FPR95 40, 40. no_edr: one seed, the mean alone.
    assert rows_of(table) == [
        ["full", 2, "91.0 ± 1.4", "80.0 ± 0.0", "85.5 ± 0.7", "72.0 ± 2.8", "40.0 ± 0.0"],
        ["no_edr", 1, "60.0", "50.0", "55.0", "55.0", "65.0"],
    ]
    assert rows_of(paper_table(frame, rows="config/variant")) == rows_of(table)

    baseline = search_trials("coop").drop(columns=single_set)
    combined = paper_table([frame, baseline])
    assert list(combined.columns[:3]) == [("", "method"), ("", "variant"), ("", "seeds")]
    assert [row[:4] for row in rows_of(combined)] == [
        ["croft", "full", 2, "91.0 ± 1.4"],
        ["croft", "no_edr", 1, "60.0"],
        ["coop", "–", 2, "82.0 ± 2.8"],
    ]


# ----------------------------------------------------------------------------- rendering


def test_latex_is_a_booktabs_tabular_with_escaped_names() -> None:
    table = paper_table(pd.concat([search_trials("croft"), search_trials("coop")]))
    uparrow, downarrow = r"AUROC $\uparrow$", r"FPR95 $\downarrow$"
    pairs = " & ".join([uparrow, downarrow] * 3)
    assert to_latex(table) == "\n".join(
        [
            r"% Mean $\pm$ sample standard deviation over seeds, in \%. Each seed's trial is "
            r"the one with the highest validation objective (selection 'val'), as the search "
            r"chose; never the best on test.",
            r"\begin{tabular}{lrccccccccc}",
            r"\toprule",
            r" &  & \multicolumn{3}{c}{accuracy} & \multicolumn{2}{c}{ssb\_hard} & "
            r"\multicolumn{2}{c}{ninco} & \multicolumn{2}{c}{open-set mean} \\",
            r"\cmidrule(lr){3-5} \cmidrule(lr){6-7} \cmidrule(lr){8-9} \cmidrule(lr){10-11}",
            rf"method & seeds & art\_painting & sketch & avg & {pairs} \\",
            r"\midrule",
            r"croft & 3 & 92.0 $\pm$ 2.0 & 81.0 $\pm$ 1.7 & 86.5 $\pm$ 1.8 & 72.0 $\pm$ 2.0 & "
            r"45.0 $\pm$ 5.0 & 90.0 $\pm$ 0.0 & 33.0 $\pm$ 3.0 & 81.0 $\pm$ 1.0 & "
            r"39.0 $\pm$ 2.2 \\",
            r"coop & 2 & 82.0 $\pm$ 2.8 & 70.0 $\pm$ 0.0 & 76.0 $\pm$ 1.4 & 61.0 $\pm$ 1.4 & "
            r"60.0 $\pm$ 0.0 & 81.0 $\pm$ 1.4 & 45.0 $\pm$ 7.1 & 71.0 $\pm$ 1.4 & "
            r"52.5 $\pm$ 3.5 \\",
            r"\bottomrule",
            r"\end{tabular}",
            "",
        ]
    )


def test_latex_escapes_special_characters_and_missing_cells() -> None:
    frame = search_trials("croft")
    frame["method"] = "a_b & 50% #1"
    frame["sketch/test_acc"] = None  # no seed has it: the cell is missing
    text = to_latex(paper_table(frame))
    assert r"a\_b \& 50\% \#1 & 3 & 92.0 $\pm$ 2.0 & -- & " in text


def test_markdown_has_one_header_row_of_group_and_name() -> None:
    table = paper_table(pd.concat([search_trials("croft"), search_trials("coop")]))
    lines = paper_markdown(table).splitlines()
    assert lines[0] == (
        "| method | seeds | accuracy: art_painting | accuracy: sketch | accuracy: avg | "
        "ssb_hard: AUROC ↑ | ssb_hard: FPR95 ↓ | ninco: AUROC ↑ | ninco: FPR95 ↓ | "
        "open-set mean: AUROC ↑ | open-set mean: FPR95 ↓ |"
    )
    assert lines[2] == "| " + " | ".join(map(str, CROFT_ROW)) + " |"
    assert lines[3] == "| " + " | ".join(map(str, COOP_ROW)) + " |"
    assert lines[-1].startswith("Mean ± sample standard deviation over seeds, in %.")


# ----------------------------------------------------------------------------- inputs


def test_two_searches_one_per_method_combine_into_one_table(tmp_path: Path) -> None:
    files = []
    for method in ("croft", "coop"):
        folder = tmp_path / "runs" / f"{method}_pacs" / "s"
        folder.mkdir(parents=True)
        search_trials(method).to_parquet(folder / "trials.parquet")
        files.append(folder)
    trials, _ = load_trials(files)
    assert rows_of(paper_table(trials)) == [CROFT_ROW, COOP_ROW]
    # The rows follow the order the searches are given in.
    reversed_trials, _ = load_trials(files[::-1])
    assert rows_of(paper_table(reversed_trials)) == [COOP_ROW, CROFT_ROW]
    assert rows_of(paper_table([search_trials("coop"), search_trials("croft")])) == [
        COOP_ROW,
        CROFT_ROW,
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: f.iloc[:0], "the paper table's input holds no trials"),
        (lambda f: f.assign(status="failed"), "none of its 12 trials finished with status ok"),
        (lambda f: f[f["selection"] == "oracle"], "no finished trial has selection 'val'"),
        (lambda f: f.drop(columns=["art_painting/test_acc", "sketch/test_acc"]),
         "no per-target-domain accuracy (<target>/test_acc columns)"),
        (lambda f: f.drop(columns=["test_fpr95", "objective"]),
         "lack the column(s) objective, test_fpr95"),
        (lambda f: f.drop(columns="method"), "no column method to make the rows of"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_naming_what_is_missing(change, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        paper_table(change(search_trials("croft")))
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_unknown_row_column_and_no_frames_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match=r"no column config/nope to make the rows of"):
        paper_table(search_trials("croft"), rows="method,config/nope")
    with pytest.raises(ConfigError, match="no trials given"):
        paper_table([])


# ----------------------------------------------------------------------------- command line


def test_the_command_line_writes_paper_md_and_tex(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "runs" / "croft_pacs" / "s"
    folder.mkdir(parents=True)
    pd.concat([search_trials("croft"), search_trials("coop")]).to_parquet(folder / "trials.parquet")
    assert pareto.main([str(folder), "--importance", "none"]) == 0
    out = folder / "analysis"
    markdown = (out / "paper.md").read_text(encoding="utf-8")
    assert "| " + " | ".join(map(str, CROFT_ROW)) + " |" in markdown
    latex = (out / "paper.tex").read_text(encoding="utf-8")
    assert latex.startswith("% Mean") and r"croft & 3 & 92.0 $\pm$ 2.0" in latex
    assert "paper.md" in capsys.readouterr().out  # among the files it says it wrote

    # Trials of one target domain each have no per-domain columns: the other outputs are
    # written, the paper table is not, and a note says why.
    single = tmp_path / "runs" / "croft_digits" / "one"
    single.mkdir(parents=True)
    search_trials("croft").drop(columns=["art_painting/test_acc", "sketch/test_acc"]).to_parquet(
        single / "trials.parquet"
    )
    assert pareto.main([str(single), "--importance", "none"]) == 0
    assert not (single / "analysis" / "paper.md").exists()
    assert (single / "analysis" / "report.html").exists()
    note = "note: paper.md and paper.tex not written (paper table: the trials have no "
    assert note in capsys.readouterr().out
