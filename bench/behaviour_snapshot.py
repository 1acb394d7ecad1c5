"""A snapshot of what the command lines compute, to check that a refactor changes no result:
the default search (one trial at a time, so its Optuna proposals are reproducible), `train`
for several methods, `prepare` into a fresh cache, `zeroshot` and `analysis/pareto.py`.

    python bench/behaviour_snapshot.py --out before.json     # on the old code
    python bench/behaviour_snapshot.py --out after.json      # on the new code
    python bench/behaviour_snapshot.py --compare before.json after.json

Every number is rounded to four decimals; `--compare` lists each value that differs. It runs
the command lines in subprocesses, so it needs nothing of the code's inner layout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

DECIMALS = 4
TRAIN_RUNS = {
    "croft": ["--set", "lambda2=10", "--set", "n_ctx=4"],
    "coop": [],
    "tip_adapter_f": [],
    "dplclip": [],
    "linear_probe": [],
}
SEARCH_SAMPLES = 10
# Columns that hold wall times, ids or timestamps: they differ from run to run by nature.
VOLATILE = ("seconds", "trial_id", "mlflow_run_id", "finished_at", "search", "node")
# Columns a change adds on purpose (named in its commit): absent before, not a difference.
ADDED_COLUMNS = ("attempts", "population")


def _round(value: Any) -> Any:
    if isinstance(value, float):
        return None if value != value else round(value, DECIMALS)
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


def _run(args: list[str], env: dict[str, str], cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def _frame_digest(frame: pd.DataFrame) -> list[dict[str, Any]]:
    keep = [c for c in frame.columns if not any(v in c for v in VOLATILE)]
    rows = frame[keep].to_dict("records")
    return [_round({k: (None if v is None else v) for k, v in row.items()}) for row in rows]


def snapshot(repo: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        env = {**os.environ, "CROFT_CACHE": str(tmp_path / "cache"), "PYTHONHASHSEED": "0"}
        _run(["-m", "croft_search.prepare"], env, repo)
        digests = {}
        for path in sorted((tmp_path / "cache").rglob("*.parquet")):
            frame = pd.read_parquet(path)
            numeric = frame.select_dtypes("number")
            digests[str(path.relative_to(tmp_path / "cache"))] = _round(
                [float(numeric.to_numpy().sum()), len(frame)]
            )
        for path in sorted((tmp_path / "cache").rglob("*.npy")):
            digests[str(path.name)] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        out["prepare"] = digests
        zero = tmp_path / "zeroshot.json"
        _run(["-m", "croft_search.zeroshot", "--json", str(zero)], env, repo)
        out["zeroshot"] = _round(json.loads(zero.read_text()))
        out["train"] = {}
        for method, extra in TRAIN_RUNS.items():
            path = tmp_path / f"{method}.json"
            _run(["-m", "croft_search.train", "--method", method, "--dataset", "digits",
                  "--target-domain", "sketch", *extra, "--json", str(path)], env, repo)  # fmt: skip
            result = json.loads(path.read_text())
            out["train"][method] = _round(
                {k: v for k, v in result.items() if not any(s in k for s in VOLATILE)}
            )
        storage = tmp_path / "runs"
        _run(["-m", "croft_search.run", "--storage", str(storage), "--name", "snap",
              "--num-samples", str(SEARCH_SAMPLES), "--max-concurrent", "1", "--population", "1",
              "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"], env, repo)  # fmt: skip
        folder = next(storage.glob("*/snap"))
        trials = pd.read_parquet(folder / "trials.parquet")
        out["search"] = _frame_digest(trials)
        _run(["analysis/pareto.py", str(folder), "--no-mlflow-log", "--importance", "none"],
             env, repo)  # fmt: skip
        for name in ("pareto.csv", "front.md"):
            path = folder / "analysis" / name
            if path.exists() and name.endswith(".csv"):
                out[f"pareto/{name}"] = _frame_digest(pd.read_csv(path))
            elif path.exists():
                # Ray's trial ids are random: compare the text with them masked.
                out[f"pareto/{name}"] = re.sub(r"\b[0-9a-f]{8}\b", "<trial>", path.read_text())
        out["pareto/files"] = sorted(p.name for p in (folder / "analysis").iterdir())
    return out


def _differences(a: Any, b: Any, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        found = []
        for key in sorted(a.keys() | b.keys()):
            if key not in a and key in ADDED_COLUMNS:
                continue
            if key not in a or key not in b:
                found.append(f"{where}/{key}: only in {'after' if key in b else 'before'}")
            else:
                found += _differences(a[key], b[key], f"{where}/{key}")
        return found
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        pairs = enumerate(zip(a, b, strict=True))
        return [d for i, (x, y) in pairs for d in _differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(p.read_text()) for p in args.compare)
        found = _differences(before, after)
        print("\n".join(found) if found else f"identical to {DECIMALS} decimals")
        raise SystemExit(1 if found else 0)
    if not args.out:
        parser.error("pass --out FILE or --compare BEFORE AFTER")
    result = snapshot(Path(__file__).resolve().parents[1])
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
