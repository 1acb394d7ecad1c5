"""Write what an analysis found: front.md, a self-contained report.html (tables and the plot
inlined, no external CSS or JS, so it opens offline), and the files as artifacts of the
search's MLflow parent run."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from analysis.model import Analysis, FrontSummary
from analysis.result_tables import ORACLE, format_cell, objectives_note, to_html, to_markdown

__all__ = ["front_markdown", "report_html", "log_to_parent_run"]

TEST_SELECTION_WARNING = (
    "Fronts over test metrics show what the search space can reach. Picking a trial from "
    "them is selection on the test set (an oracle): quote the validation-selected rows of "
    "the selection table as results."
)
VALIDATION_NOTE = (
    "Fronts over validation metrics: every trial on them was chosen without test data, so "
    "the test metrics beside them are results a paper can quote."
)
ARTIFACT_FOLDER = "analysis"
ORACLE_ARTIFACT_FOLDER = "analysis-oracle"


def _front_note(analysis: Analysis) -> str:
    return TEST_SELECTION_WARNING if analysis.oracle else VALIDATION_NOTE


def _reference_text(analysis: Analysis) -> str:
    values = ", ".join(
        f"{objective.name}={format_cell(value)}"
        for objective, value in zip(analysis.objectives, analysis.reference_point, strict=True)
    )
    return f"({values}), {analysis.reference_origin}"


def protocol_text(protocols: Sequence[str]) -> str:
    """The protocols the trials ran under, the reference's labelled as such."""
    if not protocols:
        return "not recorded (trials from before protocols were recorded: ours)"
    labelled = [
        f"{p} (the CRoFT reference's evaluation, not comparable with eval=ours)"
        if "eval=reference" in p
        else p
        for p in protocols
    ]
    return "; ".join(labelled)


def _summary_rows(analysis: Analysis) -> pd.DataFrame:
    rows = []
    for summary in [analysis.combined, *analysis.groups]:
        rows.append(
            {
                analysis.group_column: summary.group,
                "trials ranked": summary.n_ranked,
                "front size": len(summary.front),
                "hypervolume": summary.hypervolume,
                "knee trial": summary.knee_trial,
            }
        )
    return pd.DataFrame(rows)


def front_markdown(analysis: Analysis) -> str:
    """The combined front and every group's front as Markdown tables."""
    parts = [
        f"# {analysis.front_title}\n",
        f"Sources: {', '.join(source.name for source in analysis.sources)}  ",
        f"Objectives: {objectives_note(analysis.objectives)}  ",
        f"Hypervolume reference point: {_reference_text(analysis)}  ",
        f"Protocol: {protocol_text(analysis.protocols)}  ",
        "Knee: the front point with the largest sum of objectives rescaled to [0, 1] over "
        "the front (with two objectives: farthest beyond the line joining the extremes).\n",
        f"> {_front_note(analysis)}\n",
        "## Summary\n",
        to_markdown(_summary_rows(analysis)),
        _front_section_markdown(analysis.combined, "## Combined front"),
    ]
    for summary in analysis.groups:
        parts.append(
            _front_section_markdown(summary, f"## Front of {analysis.group_column} {summary.group}")
        )
    if not analysis.ablation.empty:
        parts += ["## Ablation (mean ± sample std over seeds)\n", to_markdown(analysis.ablation)]
    return "\n".join(parts)


def _front_section_markdown(summary: FrontSummary, heading: str) -> str:
    return (
        f"{heading}\n\n{len(summary.front)} trial(s) on the front; hypervolume "
        f"{format_cell(summary.hypervolume, 6)}; knee: {summary.knee_trial}\n\n"
        + to_markdown(summary.front)
    )


STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; color: #222; line-height: 1.4; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f2f2f2; }
td:first-child, th:first-child { text-align: left; }
tr.oracle td { background: #fde8e8; color: #8a1c1c; font-style: italic; }
.warning { border-left: 4px solid #c0392b; background: #fdf2f2; padding: 0.5em 1em; }
.note { color: #555; font-size: 13px; }
h2.oracle { color: #c0392b; }
img { max-width: 100%; border: 1px solid #ddd; }
details { margin: 0.3em 0; }
"""


# The report's figures besides the Pareto plot, by file stem: heading and caption.
FIGURE_CAPTIONS = {
    "history": ("Optimisation history", "Each trial's validation objective in the order "
                "trials finished, and the best so far."),
    "parallel_coordinates": ("Parallel coordinates", "Every searched hyper-parameter and the "
                             "objective, one line per trial."),
    "importance": ("Hyper-parameter importance", "Importance per front metric."),
    "validation_curves": ("Validation curves", "Per-epoch validation curves of the combined "
                          "front's trials."),
}  # fmt: skip


def _image(name: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f"<img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>"


def report_html(analysis: Analysis, images: dict[str, bytes]) -> str:
    """One offline page: the Pareto plot and every other figure (base64 PNGs), fronts,
    selection, ablation and importance. ``images``: PNG bytes by figure name ("plot" the
    Pareto plot, the others as `FIGURE_CAPTIONS` names them)."""
    escape = html.escape
    counts = analysis.counts
    parts = [
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>",
        f"<title>Search analysis: {escape(', '.join(s.name for s in analysis.sources))}</title>",
        f"<style>{STYLE}</style>\n</head>\n<body>",
        f"<h1>Search analysis: {escape(', '.join(s.name for s in analysis.sources))}</h1>",
        f"<h2 class='{'oracle' if analysis.oracle else 'validation'}'>"
        f"{escape(analysis.front_title)}</h2>",
        f"<p>Objectives: {escape(objectives_note(analysis.objectives))}.<br>"
        f"Trials: {counts['total']} ({escape(analysis.statuses)}); {counts['ranked']} "
        "ranked (status ok and every metric present).<br>"
        f"Hypervolume reference point: {escape(_reference_text(analysis))}.<br>"
        f"Protocol: {escape(protocol_text(analysis.protocols))}.<br>"
        "Knee: the front point with the largest sum of objectives rescaled to [0, 1] over the "
        "front (with two objectives: the point farthest beyond the line joining the extremes)."
        "</p>",
        f"<p class='{'warning' if analysis.oracle else 'note'}'>"
        f"{escape(_front_note(analysis))}</p>",
        _image("Pareto plot", images["plot"]),
        "<h2>Fronts</h2>",
        to_html(_summary_rows(analysis)),
        f"<h3>Combined front ({len(analysis.combined.front)} trials)</h3>",
        to_html(analysis.combined.front),
    ]
    for summary in analysis.groups:
        parts.append(
            f"<details><summary>Front of {escape(analysis.group_column)} "
            f"<b>{escape(str(summary.group))}</b> ({len(summary.front)} trials)</summary>"
            f"{to_html(summary.front)}</details>"
        )
    parts += [
        "<h2>Validation-selected versus oracle</h2>",
        "<p>The validation-selected trial has the highest validation objective (selection "
        "'val'): that is the result to quote. The <b>ORACLE</b> row is the trial with the "
        "best test score, i.e. what choosing on the test set would claim; it is not a "
        "result. The gap row is oracle minus validation-selected.</p>",
        to_html(analysis.selection, highlight=ORACLE),
    ]
    if not analysis.ablation.empty:
        parts += [
            "<h2>Ablation (mean ± sample std over seeds)</h2>",
            to_html(analysis.ablation),
        ]
    parts += ["<h2>Hyper-parameter importance</h2>", _importance_html(analysis)]
    parts.append("<h2>Figures</h2>")
    for name, (heading, caption) in FIGURE_CAPTIONS.items():
        # The curves are the one figure a finished search may lack for a reason worth
        # reading (populations report only their end): say it where the figure would be.
        if name not in images and name != "validation_curves":
            continue
        parts += [f"<h3>{escape(heading)}</h3>",
                  f"<p class='note'>{escape(caption)}</p>",
                  _image(name, images[name]) if name in images
                  else f"<p class='note'>{escape(analysis.curves_note)}</p>"]  # fmt: skip
    if analysis.notes:
        items = "".join(f"<li>{escape(note)}</li>" for note in analysis.notes)
        parts.append(f"<h2>Notes</h2>\n<ul class='note'>{items}</ul>")
    parts.append("</body>\n</html>\n")
    return "\n".join(parts)


def _importance_html(analysis: Analysis) -> str:
    table = analysis.importance
    if table.empty:
        return (
            "<p class='note'>No importances: "
            + ("not requested." if analysis.importance_evaluator is None else "see the notes.")
            + "</p>"
        )
    wide = table.pivot_table(
        index=[analysis.group_column, "parameter"], columns="metric", values="importance"
    )
    wide = wide[[o.name for o in analysis.objectives if o.name in wide.columns]].reset_index()
    wide.columns.name = None
    return (
        f"<p class='note'>Evaluator: {html.escape(str(analysis.importance_evaluator))} "
        "(Optuna), normalised to sum to 1 per metric; studies rebuilt from the trials.</p>"
        + to_html(wide, digits=3)
    )


def log_to_parent_run(
    files: Sequence[Path], run_id: str, tracking_uri: str | None, oracle: bool = False
) -> str:
    """Log `files` under `analysis/` (an oracle's under `analysis-oracle/`) in the MLflow run
    `run_id`; returns a line saying what happened (a missing run is reported, not raised:
    the report on disk stands alone)."""
    folder = ORACLE_ARTIFACT_FOLDER if oracle else ARTIFACT_FOLDER
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        client.get_run(run_id)
    except MlflowException:
        return f"MLflow parent run {run_id} not found at {tracking_uri or 'the default URI'}"
    for file in files:
        client.log_artifact(run_id, str(file), artifact_path=folder)
    return f"logged {len(files)} files to MLflow run {run_id} (artifacts/{folder}/) at " + str(
        client.tracking_uri
    )
