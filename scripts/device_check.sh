#!/usr/bin/env bash
# The GPU check (BENCHMARKS.md, "GPU check"): on a machine with torch and a GPU but no network,
# install what is missing from the wheels `make device-wheels` downloaded, then run every step of
# scripts/device_check.py, each into $OUT/STEP.csv and $OUT/STEP.md ($OUT/summary.md: all of them).
#
#   bash scripts/device_check.sh                  # CUDA: the paper's sizes, under 8 minutes on an H200
#   bash scripts/device_check.sh --device cpu     # tiny sizes, for the test and a dry run
#
# PYTHON (default python3), OUT (default ./device-check-out), SIMS_LENS_WHEELS (default ./.device-wheels),
# SIMS_LENS_DEVICE_SITE (default ./.device-site) and BUDGET (seconds for everything, default 470) override.
# A failing step is recorded and the next one runs; the exit status is 1 if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/device-check-out}
WHEELS=${SIMS_LENS_WHEELS:-$ROOT/.device-wheels}
SITE=${SIMS_LENS_DEVICE_SITE:-$ROOT/.device-site}
BUDGET=${BUDGET:-470}
mkdir -p "$OUT"
SECONDS=0

"$PY" scripts/device_check.py env --wheels "$WHEELS" --site "$SITE" --out "$OUT" || echo "env step failed: $?"

export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${SIMS_LENS_TOKENIZER:-}" ] && [ -f "$WHEELS/tokenizer/tokenizer.json" ]; then
    export SIMS_LENS_TOKENIZER="$WHEELS/tokenizer"
fi
export SIMS_LENS_ANSWER_CACHE=off
LEFT=$((BUDGET - SECONDS))
[ "$LEFT" -ge 60 ] || LEFT=60  # a slow install still leaves the steps a minute (timeout 0 would mean none)
# SIGINT at the budget's end: the step that runs then is recorded as stopped and summary.md is written
timeout -s INT -k 30 "$((LEFT + 10))" "$PY" scripts/device_check.py check --out "$OUT" --budget "$LEFT" "$@"
status=$?
echo "device check finished in ${SECONDS} s (exit status $status); tables in $OUT"
exit $status
