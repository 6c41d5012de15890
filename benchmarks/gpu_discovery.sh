#!/usr/bin/env bash
# The device check of issues 13 and 10 (one prepared run, about 8 minutes on one H200; nothing downloaded):
#   seg   the CPU recipe (`factorized-seg train --preset cpu`: K=3, balance + equivariance, pooled masks) widened to
#         C=64 at 64x64 (the issue's question: does it hold at larger width), seeds 0-2, next to the plain DDPM +
#         k-means baseline of the same width trained for the same wall clock in the same run; the classical rows on
#         the same (bundled 64x64) Flowers-17.
#   lift  gen-lifting-refine (the CPU preset, untouched) on lego at 128x128 (`tools/bundle_data.py --lego-size 128
#         --out data/lego128`, carried), seeds 0 and 1, to set against COLMAP at 128 px (docs/lifting.md).
# All GPU jobs run at once (two CPU threads each) and share the GPU: each row's steps are what it got in that share.
# Usage (device): carry [".whl", "data"], command "BENCH_COMMIT=<sha> bash benchmarks/gpu_discovery.sh".
# Local smoke (CPU, tiny budgets and width): SEG_SET="model.base_channels=8 resolution=64" SEG_S=5 LIFT_S=10 LIFT_STEPS=4 DEVICE=cpu bash benchmarks/gpu_discovery.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
source benchmarks/device_wheels.sh  # the carried wheels, where the image lacks them
export PYTHONUNBUFFERED=1 BENCH_COMMIT="${BENCH_COMMIT:-}"
SEG_S="${SEG_S:-300}"; LIFT_S="${LIFT_S:-330}"; LIFT_STEPS="${LIFT_STEPS:-4000}"; DEVICE="${DEVICE:-cuda}"
# every job is stopped after JOB_S seconds, so the results of the others always come back (540-s device call)
JOB_S="${JOB_S:-470}"; T="timeout -k 10 $JOB_S"
RES="${OUT:-/tmp/gd_out}/res"; W=/tmp/gd_work
mkdir -p "$RES" "$W"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$RES/gpu.txt" 2>&1 || true
SEG_SET="${SEG_SET:-model.base_channels=64 resolution=64}"
for s in 0 1 2; do
  OMP_NUM_THREADS=2 $T "$PY" benchmarks/seg.py --preset cpu --device "$DEVICE" --datasets flowers17 \
    --models factorized-k3 --budget-s "$SEG_S" --threads 2 --work-dir "$W/seg_s$s" --set $SEG_SET seed=$s \
    --out "$RES/seg_c64_k3_seed$s.json" --figure "$RES/seg_c64_k3_seed$s.png" > "$RES/seg_s$s.log" 2>&1 &
done
OMP_NUM_THREADS=2 $T "$PY" benchmarks/seg.py --preset cpu --device "$DEVICE" --datasets flowers17 \
  --models plain-kmeans plain-kmeans-k3 --budget-s "$SEG_S" --threads 2 --work-dir "$W/seg_plain" --set $SEG_SET \
  --out "$RES/seg_c64_plain.json" > "$RES/seg_plain.log" 2>&1 &
for s in 0 1; do
  OMP_NUM_THREADS=2 $T "$PY" benchmarks/lifting.py --scenes data/lego128/lego --methods gen-lifting-refine \
    --device "$DEVICE" --budget-s "$LIFT_S" --max-steps "$LIFT_STEPS" --threads 2 --seed $s --eval-images 50 \
    --out "$RES/lifting_refine_lego128_gpu_seed$s.json" > "$RES/lift_s$s.log" 2>&1 &
done
# the classical rows are CPU-only and deterministic: same images, same scoring
OMP_NUM_THREADS=1 $T "$PY" benchmarks/seg.py --datasets flowers17 --models grabcut kmeans-colour kmeans-colour-k3 \
  centre-disc --threads 1 --work-dir "$W/seg_classical" --out "$RES/seg_c64_classical.json" \
  > "$RES/seg_classical.log" 2>&1 &
while [ -n "$(jobs -r)" ]; do sleep 20; echo "[$(date +%T)] running: $(jobs -r | wc -l)"; \
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2> /dev/null; done
wait
tail -n 4 "$RES"/*.log
if [ -n "${OUT:-}" ]; then tar -czf "$OUT/gpu_discovery.tar.gz" -C "$RES" . && rm -rf "$RES"; fi
