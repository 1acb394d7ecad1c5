#!/usr/bin/env bash
# Every check that needs a GPU, in one short run, each part time-boxed so one slow part
# cannot take the others' time; logs stream into $OUT so a run cut short still reports:
#   1. bench/population_gpu.py: CRoFT trials per hour and memory per member, K up to 1,024;
#   2. the test suite's CUDA-only tests;
#   3. a short population search on fractional GPUs (--gpus-per-trial 0.25).
#
#   OUT=runs/gpu-checks bash bench/gpu_checks.sh
#
# On an H200 it takes about 4 minutes; it exits non-zero when any part failed or ran out of
# time (`failed:` names them).
set -u -o pipefail
failed=()
OUT=${OUT:-runs/gpu-checks}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CROFT_CACHE=${CROFT_CACHE:-/tmp/croft-gpu-cache}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

echo "== population_gpu" | tee -a "$OUT/gpu.txt"
timeout 150 "$PYTHON" bench/population_gpu.py --json "$OUT/population_gpu.json" 2>&1 \
    | tee "$OUT/population_gpu.log" || failed+=(population_gpu)

echo "== CUDA tests" | tee -a "$OUT/gpu.txt"
timeout 130 "$PYTHON" -m pytest -q -p no:cacheprovider -k "cuda or gpu" \
    tests/test_population.py tests/test_scores.py 2>&1 | tee "$OUT/cuda_tests.log" \
    || failed+=(cuda_tests)

echo "== search, --gpus-per-trial 0.25" | tee -a "$OUT/gpu.txt"
storage=$(mktemp -d)
(while sleep 5; do nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader; done) \
    >"$OUT/search_gpu_use.txt" &
sampler=$!
timeout 160 "$PYTHON" -m croft_search.run --gpus-per-trial 0.25 --population 16 \
    --num-samples 64 --storage "$storage" --name gpu-check \
    --tracking-uri "sqlite:///$storage/mlflow.db" 2>&1 | tee "$OUT/search.log" \
    || failed+=(search)
kill "$sampler"
"$PYTHON" - "$storage/croft_digits/gpu-check" <<'EOF' 2>&1 | tee "$OUT/search_trials.txt"
import sys
from pathlib import Path

import pandas as pd

folder = Path(sys.argv[1])
trials = pd.read_parquet(folder / "trials.parquet")
print(f"{len(trials)} members recorded in {folder}")
for column in trials.columns:
    if column in ("population", "status"):
        print(column, trials[column].astype(str).value_counts().head(8).to_dict())
print(trials.filter(like="val_").describe().T.to_string())
EOF
if ((${#failed[@]})); then
    echo "failed: ${failed[*]}" | tee -a "$OUT/gpu.txt"
    exit 1
fi
