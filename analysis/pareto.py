"""Pareto analysis of one or several searches: ranks, fronts, hypervolume, knee, the
validation-versus-oracle table, ablations, hyper-parameter importance, plot and report.

    python analysis/pareto.py RESULTS... [--metrics test_acc,test_auroc] [--by method]
                              [--out DIR] [--reference-point 0,0]
    python analysis/pareto.py --mlflow-experiment NAME [--tracking-uri URI] ...

RESULTS is a search folder (STORAGE/<space>/<name>, holding trials.parquet) or a
trials.parquet file; several are compared on one plot. Also runs as
`python -m analysis.pareto`, and every step is importable (`analyse`, `write_outputs`,
`pareto_ranks`, `hypervolume`, `knee_point`, ...).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.figures import (
    curves_figure,
    history_figure,
    importance_figure,
    parallel_coordinates_figure,
)
from analysis.importance import EVALUATORS, importance_table
from analysis.load import (
    SearchSource,
    load_epoch_curves,
    load_mlflow_trials,
    load_trials,
    ok_trials,
    status_counts,
)
from analysis.model import VALIDATION_METRICS, Analysis, FrontSummary, test_companions
from analysis.objectives import (
    Objective,
    default_reference_point,
    metric_columns,
    parse_objectives,
    parse_reference_point,
)
from analysis.paper_table import paper_markdown, paper_table, to_latex
from analysis.plots import plot_fronts
from analysis.report import front_markdown, log_to_parent_run, report_html
from analysis.result_tables import ablation_table, selection_table
from croft_search.contract import config_key
from croft_search.errors import ConfigError, OneLineArgumentParser, exit_on_user_error
from croft_search.fronts import hypervolume, knee_point, pareto_ranks

__all__ = [
    "Analysis",
    "FrontSummary",
    "analyse",
    "write_outputs",
    "main",
    "pareto_ranks",
    "hypervolume",
    "knee_point",
]

DEFAULT_METRICS = ",".join(VALIDATION_METRICS)
COMBINED = "(all trials)"  # the group name of the combined front
FRONT_CONFIG_COLUMNS = 8  # at most this many varying config values shown next to a front


def analyse(
    trials: pd.DataFrame,
    objectives: Sequence[Objective] | str = DEFAULT_METRICS,
    by: Sequence[str] | str = ("method",),
    reference_point: Sequence[float] | str | None = None,
    weight: float | None = None,
    importance: str | None = "fanova",
    sources: Sequence[SearchSource] = (),
) -> Analysis:
    """Rank the finished trials and build every table; no files are touched.

    `objectives`: Objective objects or a "metric[:max|min],..." string. `by`: the column(s)
    whose values make the groups (fronts per method by default). `reference_point`: the
    hypervolume corner in the metrics' units (default: see default_reference_point).
    `weight`: accuracy weight of the oracle's test scalarisation (default: the search's).
    `importance`: "fanova", "ped-anova" or None to skip."""
    where = ", ".join(source.name for source in sources) or "the trials"
    trials = trials.reset_index(drop=True)
    ok = ok_trials(trials, where)
    if isinstance(objectives, str):
        objectives = parse_objectives(objectives, metric_columns(trials))
    objectives = list(objectives)
    names = [objective.name for objective in objectives]
    maximize = [objective.maximize for objective in objectives]
    by = [part.strip() for part in by.split(",")] if isinstance(by, str) else list(by)
    missing = [column for column in by if column not in trials.columns]
    if missing or not by:
        raise ConfigError(
            f"cannot group by {missing or by}; columns: {', '.join(map(str, trials.columns))}"
        )
    notes: list[str] = []

    group_column = " / ".join(by)
    if len(by) > 1:
        trials[group_column] = trials[by].astype(str).agg(" / ".join, axis=1)
    else:
        trials[group_column] = trials[group_column].astype(str)

    values = ok[names].apply(pd.to_numeric, errors="coerce")
    rankable = values.notna().all(axis=1) & ~np.isinf(values).any(axis=1)
    if not rankable.all():
        notes.append(
            f"{int((~rankable).sum())} finished trial(s) lack a finite value of "
            f"{', '.join(names)} and are not ranked"
        )
    if not rankable.any():
        raise ConfigError(f"{where}: no finished trial has finite values of {', '.join(names)}")
    ranked_index = values.index[rankable]
    ranked_values = values.loc[ranked_index].to_numpy(dtype=np.float64)

    trials["rank"] = pd.Series(pd.NA, index=trials.index, dtype="Int64")
    trials.loc[ranked_index, "rank"] = pareto_ranks(ranked_values, maximize)
    trials["group_rank"] = pd.Series(pd.NA, index=trials.index, dtype="Int64")
    for _, members in trials.loc[ranked_index].groupby(group_column, sort=True):
        trials.loc[members.index, "group_rank"] = pareto_ranks(
            members[names].to_numpy(dtype=np.float64), maximize
        )
    trials["on_front"] = (trials["rank"] == 0).fillna(False).astype(bool)
    trials["on_group_front"] = (trials["group_rank"] == 0).fillna(False).astype(bool)

    if reference_point is None:
        reference = default_reference_point(ranked_values, objectives)
        origin = (
            "default: the worst possible value of each fraction metric, else the worst "
            "observed value pushed out by 10% of its range"
        )
    else:
        if isinstance(reference_point, str):
            reference = parse_reference_point(reference_point, objectives)
        else:
            reference = parse_reference_point(",".join(map(str, reference_point)), objectives)
        origin = "as given"
    _check_reference(reference, trials.loc[trials["on_front"], names].to_numpy(), objectives)

    ranked = trials.loc[ranked_index]
    shown = _front_columns(ranked, group_column, names)
    combined = _summarise(COMBINED, ranked, "rank", shown, objectives, reference)
    groups = [
        _summarise(str(group), members, "group_rank", shown, objectives, reference)
        for group, members in ranked.groupby(group_column, sort=True)
    ]

    ok_rows = trials.loc[ok.index]
    selection, selection_notes = selection_table(ok_rows, group_column, weight, names)
    ablation, ablation_notes = ablation_table(ok_rows, names)
    if importance is None:
        importances, importance_notes = pd.DataFrame(), []
    else:
        if importance not in EVALUATORS:
            raise ConfigError(
                f"unknown importance evaluator {importance!r}; use {', '.join(EVALUATORS)}"
            )
        importances, importance_notes = importance_table(
            ok_rows, objectives, group_column, importance
        )
    notes += selection_notes + ablation_notes + importance_notes
    try:
        paper = paper_table(ok_rows)
    except ConfigError as err:  # e.g. one target domain per trial: the other outputs stand
        paper = pd.DataFrame()
        notes.append(f"paper.md and paper.tex not written ({err})")
    protocols = []
    if "protocol" in ok_rows.columns:
        protocols = sorted({str(p) for p in ok_rows["protocol"].dropna()})
    if len(protocols) > 1:
        notes.append(f"the trials ran under {len(protocols)} protocols; fronts and tables mix them")
    counts = {
        "total": len(trials),
        "ok": len(ok),
        "not ok": len(trials) - len(ok),
        "ranked": len(ranked_index),
    }
    return Analysis(
        trials=trials,
        objectives=objectives,
        group_column=group_column,
        reference_point=reference,
        reference_origin=origin,
        combined=combined,
        groups=groups,
        selection=selection,
        ablation=ablation,
        paper=paper,
        importance=importances,
        importance_evaluator=importance,
        counts=counts,
        statuses=status_counts(trials),
        sources=list(sources),
        notes=notes,
        protocols=protocols,
    )


def _check_reference(
    reference: np.ndarray, front: np.ndarray, objectives: Sequence[Objective]
) -> None:
    """A reference point no front trial beats in every metric would give hypervolume 0 for
    every front: almost always a direction mix-up (e.g. FPR's corner at 0 instead of 1)."""
    signs = np.where([objective.maximize for objective in objectives], 1.0, -1.0)
    beyond = ((front * signs) > (reference * signs)).all(axis=1)
    if not beyond.any():
        corner = ", ".join(
            f"{o.name} {'below' if o.maximize else 'above'} every trial" for o in objectives
        )
        raise ConfigError(
            f"bad reference point {reference.tolist()}: no trial on the front is better than it "
            f"in every metric; it must be worse than the trials ({corner})"
        )


def _front_columns(ranked: pd.DataFrame, group_column: str, names: Sequence[str]) -> list[str]:
    """Columns of the front tables: identity, metrics (a validation front's test metrics
    beside them), then config values that vary."""
    identity = ["trial_id", group_column, "selection"]
    names = [*names, *(m for m in test_companions(list(names)) if m in ranked.columns)]
    if "source" in ranked.columns and ranked["source"].nunique() > 1 and group_column != "source":
        identity.insert(1, "source")
    varying = [
        column
        for column in ranked.columns
        if config_key(column) and ranked[column].nunique(dropna=True) > 1
    ]
    return [*dict.fromkeys([*identity, *names])] + varying[:FRONT_CONFIG_COLUMNS]


def _summarise(
    group: str,
    members: pd.DataFrame,
    rank_column: str,
    shown: Sequence[str],
    objectives: Sequence[Objective],
    reference: np.ndarray,
) -> FrontSummary:
    names = [objective.name for objective in objectives]
    maximize = [objective.maximize for objective in objectives]
    front = members[members[rank_column] == 0]
    front = front.sort_values(names[0], ascending=not maximize[0], kind="stable")
    values = front[names].to_numpy(dtype=np.float64)
    knee = front["trial_id"].iloc[knee_point(values, maximize)] if len(front) else None
    table = front[list(shown)].copy()
    for column in table.columns:
        if config_key(column):
            table[column] = _integers_as_int(table[column])
    table = table.rename(columns=lambda c: config_key(c) or c)
    return FrontSummary(
        group=group,
        front=table.reset_index(drop=True),
        hypervolume=hypervolume(values, reference, maximize),
        knee_trial=None if knee is None else str(knee),
        n_ranked=len(members),
    )


def _integers_as_int(values: pd.Series) -> pd.Series:
    """An int config value read back as float (a failed trial's NaN made the column float)
    shown as an int again."""
    if pd.api.types.is_float_dtype(values):
        present = values.dropna()
        if len(present) and (present % 1 == 0).all():
            return values.astype("Int64")
    return values


def extra_figures(analysis: Analysis) -> dict[str, Figure]:
    """The figures beside the Pareto plot that the trials can make, by file stem."""
    front_ids = list(analysis.combined.front["trial_id"].astype(str))
    made = {
        "history": history_figure(analysis.trials),
        "parallel_coordinates": parallel_coordinates_figure(analysis.trials, front_ids),
        "importance": importance_figure(analysis.importance, analysis.group_column),
        "validation_curves": curves_figure(analysis.curves),
    }
    return {name: figure for name, figure in made.items() if figure is not None}


def write_outputs(analysis: Analysis, out_dir: str | Path) -> dict[str, Path]:
    """Write pareto.csv, front.md, pareto.png, report.html and a PNG of every other figure
    the trials make (history, parallel_coordinates, importance, validation_curves) into
    `out_dir`, and paper.md / paper.tex when the trials make a paper table."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create the output folder {out}: {err}") from None
    names = [objective.name for objective in analysis.objectives]
    trials = analysis.trials.sort_values(
        ["rank", analysis.group_column, names[0]],
        ascending=[True, True, not analysis.objectives[0].maximize],
        na_position="last",
        kind="stable",
    )
    leading = ["source", "trial_id", analysis.group_column, "status", "selection", "rank",
               "on_front", "group_rank", "on_group_front", *names]  # fmt: skip
    leading = [c for c in dict.fromkeys(leading) if c in trials.columns]
    trials = trials[leading + [c for c in trials.columns if c not in leading]]
    paths = {
        "csv": out / "pareto.csv",
        "markdown": out / "front.md",
        "plot": out / "pareto.png",
        "html": out / "report.html",
    }
    trials.to_csv(paths["csv"], index=False)
    paths["markdown"].write_text(front_markdown(analysis), encoding="utf-8")
    title = ", ".join(source.name for source in analysis.sources)
    plot_fronts(
        analysis.trials[analysis.trials["rank"].notna()],
        analysis.objectives,
        paths["plot"],
        analysis.group_column,
        analysis.combined.knee_trial,
        title,
    )
    images = {"plot": paths["plot"].read_bytes()}
    for name, figure in extra_figures(analysis).items():
        paths[name] = out / f"{name}.png"
        figure.savefig(paths[name])
        images[name] = paths[name].read_bytes()
    paths["html"].write_text(report_html(analysis, images), encoding="utf-8")
    if not analysis.paper.empty:
        paths["paper markdown"] = out / "paper.md"
        paths["paper latex"] = out / "paper.tex"
        paths["paper markdown"].write_text(paper_markdown(analysis.paper), encoding="utf-8")
        paths["paper latex"].write_text(to_latex(analysis.paper), encoding="utf-8")
    return paths


# ----------------------------------------------------------------------------- command line


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(
        prog="python analysis/pareto.py",
        description="Pareto fronts, hypervolume, knee, validation-vs-oracle, ablation and "
        "importance tables, plot and HTML report of one or several searches.",
    )
    parser.add_argument(
        "results", nargs="*", metavar="RESULTS",
        help="search folder (holding trials.parquet) or trials.parquet file; several compare",
    )  # fmt: skip
    parser.add_argument(
        "--metrics", default=DEFAULT_METRICS,
        help="objectives, comma separated; NAME:max / NAME:min overrides the known direction "
        f"(default {DEFAULT_METRICS}: the validation front; test_ metrics draw the oracle's)",
    )  # fmt: skip
    parser.add_argument(
        "--by", default=None,
        help="column(s) that make the groups, comma separated (default: method; "
        "source,method with several RESULTS)",
    )  # fmt: skip
    parser.add_argument(
        "--out", default=None,
        help="output folder (default: RESULTS/analysis, ./analysis-<experiment> for MLflow, "
        "./analysis-compare for several RESULTS; with -oracle appended for test fronts)",
    )  # fmt: skip
    parser.add_argument("--mlflow-experiment", default=None, help="read the trials from MLflow")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI")
    parser.add_argument(
        "--reference-point", default=None,
        help="hypervolume reference point, one value per metric, e.g. 0,0 (acc, auroc) "
        "or 0,1 (acc, fpr95)",
    )  # fmt: skip
    parser.add_argument(
        "--objective-weight", type=float, default=None,
        help="accuracy weight of the oracle's test scalarisation (default: the search's, "
        "else 0.5)",
    )  # fmt: skip
    parser.add_argument(
        "--importance", default="fanova", choices=[*EVALUATORS, "none"],
        help="Optuna importance evaluator (default fanova)",
    )  # fmt: skip
    parser.add_argument(
        "--no-mlflow-log", action="store_true",
        help="do not log the report to the search's MLflow parent run",
    )  # fmt: skip
    return parser


def _default_out(args: argparse.Namespace, sources: Sequence[SearchSource], oracle: bool) -> Path:
    """Oracle fronts go to their own folder, so they never replace the validation ones."""
    if args.out:
        return Path(args.out)
    suffix = "-oracle" if oracle else ""
    if args.mlflow_experiment:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in args.mlflow_experiment)
        return Path(f"analysis-{safe}{suffix}")
    if len(sources) == 1 and sources[0].folder is not None:
        return sources[0].folder / f"analysis{suffix}"
    return Path(f"analysis-compare{suffix}")


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.mlflow_experiment and args.results:
        raise ConfigError("give RESULTS or --mlflow-experiment, not both")
    if args.mlflow_experiment:
        trials, sources = load_mlflow_trials(args.mlflow_experiment, args.tracking_uri)
    else:
        trials, sources = load_trials(args.results)
    if args.objective_weight is not None and not 0.0 <= args.objective_weight <= 1.0:
        raise ConfigError(f"--objective-weight must be in [0, 1], got {args.objective_weight}")
    by = args.by or ("source,method" if len(sources) > 1 else "method")
    where = ", ".join(source.name for source in sources)
    ok_trials(trials, where)  # an empty search fails here, before metric names are checked
    analysis = analyse(
        trials,
        parse_objectives(args.metrics, metric_columns(trials)),
        by=by,
        reference_point=args.reference_point,
        weight=args.objective_weight,
        importance=None if args.importance == "none" else args.importance,
        sources=sources,
    )
    front_ids = list(analysis.combined.front["trial_id"].astype(str))
    analysis.curves, curves_note = load_epoch_curves(analysis.trials, sources, front_ids)
    if curves_note:
        analysis.notes.append(curves_note)
        if not analysis.curves:  # the report's sentence where the figure would be
            analysis.curves_note = f"{curves_note[0].upper()}{curves_note[1:]}."
    out = _default_out(args, sources, analysis.oracle)
    paths = write_outputs(analysis, out)

    reference = ", ".join(
        f"{o.name}={v:g}"
        for o, v in zip(analysis.objectives, analysis.reference_point, strict=True)
    )
    print(analysis.front_title)
    print(f"reference point: ({reference}) [{analysis.reference_origin}]")
    for summary in [analysis.combined, *analysis.groups]:
        label = (
            "combined front"
            if summary is analysis.combined
            else f"{analysis.group_column} {summary.group}"
        )
        print(
            f"{label}: {len(summary.front)} of {summary.n_ranked} trials on the front, "
            f"hypervolume {summary.hypervolume:.6g}, knee {summary.knee_trial}"
        )
    for note in analysis.notes:
        print(f"note: {note}")
    if len(sources) == 1 and sources[0].parent_run_id and not args.no_mlflow_log:
        uri = args.tracking_uri or sources[0].tracking_uri
        print(log_to_parent_run(list(paths.values()), sources[0].parent_run_id, uri,
                                analysis.oracle))  # fmt: skip
    print(f"wrote {', '.join(str(path) for path in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
