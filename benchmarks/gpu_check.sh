#!/usr/bin/env bash
# Issue 12's GPU check as a lent GPU machine runs it: installs the wheels carried in .whl/ from disk only (prepare them
# with `python benchmarks/gpu_check.py --wheels`), then runs benchmarks/gpu_check.py (<= 8 min) with any arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
source benchmarks/device_wheels.sh  # the carried wheels, where the image lacks them
export PYTHONUNBUFFERED=1
# on the device machine only $OUT comes back: write the JSON there (then copy it to benchmarks/results/)
exec "$PY" benchmarks/gpu_check.py ${OUT:+--out "$OUT/gpu_check.json"} "$@"
