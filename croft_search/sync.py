"""`python -m croft_search.sync FOLDER`: send a search's trials that MLflow missed (its
tracking server was down or failing while they finished) from the search's trials.parquet,
and finish its parent run once the search has ended. Sending twice sends nothing new: a
trial whose child run has ended is left as it is."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from croft_search.contract import SUMMARY_FILE
from croft_search.errors import ConfigError, OneLineArgumentParser, exit_on_user_error
from croft_search.search.recorder import MlflowMirror, SearchMeta
from croft_search.search.results import TrialTable


def sync_folder(folder: Path, tracking_uri: str | None = None) -> tuple[int, int]:
    """(trials sent, trials still without an MLflow run) for the search in ``folder``."""
    meta = SearchMeta.read(folder)
    if tracking_uri:
        meta = dataclasses.replace(meta, tracking_uri=tracking_uri)
    mirror = MlflowMirror(meta)
    if mirror.tracker is None:
        raise ConfigError(f"MLflow at {meta.tracking_uri} does not answer; try again later")
    table = TrialTable(folder, meta.name, meta.space)
    sent = mirror.sync(table)
    summary = Path(folder) / SUMMARY_FILE
    if summary.exists() and mirror.tracker is not None:
        mirror.call(lambda t: t.discard_unrecorded(table.trial_ids))
        mirror.call(lambda t: t.finish_parent(json.loads(summary.read_text())))
    return sent, mirror.missing(table)


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> None:
    parser = OneLineArgumentParser(prog="python -m croft_search.sync", description=__doc__)
    parser.add_argument("folder", type=Path, help="search folder (holding search.json)")
    parser.add_argument("--tracking-uri", default=None, help="another MLflow tracking URI")
    args = parser.parse_args(argv)
    sent, missing = sync_folder(args.folder, args.tracking_uri)
    print(f"sent {sent} trial(s) to MLflow; {missing} still missing")
    if missing:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
