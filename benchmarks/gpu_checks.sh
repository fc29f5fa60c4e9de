#!/usr/bin/env bash
# The GPU checks of the training step and the deployed segment job, in one run (about 10
# minutes on an H200): the CUDA tests, then every GPU figure the CPU machine cannot measure.
#
#   bash benchmarks/gpu_checks.sh [OUT_DIR]            # on a machine with a CUDA GPU
#   SMOKE=1 bash benchmarks/gpu_checks.sh /tmp/smoke    # the same commands, tiny, on the CPU
#
# Writes OUT_DIR (default benchmarks/results/gpu) with one markdown/JSON file per benchmark and
# log.txt; stops at the first failing step. What each figure checks:
#   train_step_cuda.md    SPML-specific part (k-means + pooling + loss fwd + bwd) at crop 320 and
#                         512 (targets <= 16 / 28 ms on an H200), relationship C, and the
#                         staged-step check (strict fp32) that must pass on CUDA
#   segment_speed_gpu.md  segment job images/s, softmax / kNN x refine off / on (batched
#                         matvec walk, uint8 upload), bf16 channels-last, eager and compiled
#   benchmark_*.json      spml-deploy benchmark: end-to-end (sequential and pipelined) vs
#                         network images/s (target: end-to-end >= 80 % of network)
#   export_half.json      export --half: margin-aware parity (raw agreement beside it) and the
#                         fp16 vs fp32 ONNX Runtime images/s of the fp32 export
#   refine_speed_gpu.md   the walk per method on CUDA, batch 16 at 64x64 cells
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu}
PY=${PY:-.venv/bin/python}
CLI=${CLI:-.venv/bin/spml-deploy}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1

if [[ -n "${SMOKE:-}" ]]; then     # CPU smoke run of the same commands, minimal sizes
  DEV=cpu; PRESET=tiny; CROPS="--crop 64"; TS="--batch 2 --repeats 1 --warmup 2"
  SIZE=64; SEG="--batch 2 --n-images 4 --rounds 1 --precision fp32 --threads 1 --memory-size 500"
  BENCH="--imgsz 64 --batch 2 --warmup 1 --iters 2"; RS="--sizes 8 --classes 3 --rounds 1 --batch 2"
  TESTS=""
else
  DEV=cuda; PRESET=resnet50; CROPS="--crop 320 --crop 512"; TS="--batch 8 --embed-dim 64"
  SIZE=512; SEG="--batch 16 --n-images 64 --rounds 3 --precision bf16 --channels-last --threads 8"
  BENCH="--imgsz 512 --batch 16"; RS="--sizes 64 --classes 21 --rounds 3 --batch 16"
  TESTS="tests/test_losses.py tests/test_backends.py tests/test_kmeans.py tests/test_refine.py"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
step() { echo; echo "== $(date -u +%H:%M:%S) $*"; }

if [[ -n "$TESTS" ]]; then
  step "CUDA tests"
  $PY -m pytest -q -x $TESTS -k "cuda or gpu"
fi

step "training step breakdown"
$PY benchmarks/train_step.py --device $DEV --preset $PRESET $CROPS $TS --out "$OUT/train_step_cuda.md"

step "segment job"
$PY benchmarks/segment_speed.py --device $DEV --preset $PRESET --size $SIZE $SEG \
  --backends torch --out "$OUT/segment_speed_gpu.md"
[[ -n "${SMOKE:-}" ]] || $PY benchmarks/segment_speed.py --device $DEV --preset $PRESET \
  --size $SIZE $SEG --backends torch --classifiers softmax --refine off --compile \
  --out "$OUT/segment_speed_gpu_compiled.md"

step "untrained $PRESET run, export (fp32 and --half) and spml-deploy benchmark"
RUN="$OUT/run_$PRESET"
$PY - "$RUN" "$PRESET" <<'EOF'
import sys
sys.path.insert(0, "tests")
from runs import make_run
make_run(sys.argv[1], num_classes=21, preset=sys.argv[2])
EOF
rm -rf "$OUT/bundle" "$OUT/bundle_half"
$CLI export "$RUN" --out "$OUT/bundle" --device $DEV --imgsz $SIZE --json "$OUT/export_fp32.json"
$CLI export "$RUN" --out "$OUT/bundle_half" --device $DEV --imgsz $SIZE --half \
  --json "$OUT/export_half.json"
$CLI benchmark "$OUT/bundle" --device $DEV $BENCH --json "$OUT/benchmark_auto.json"
$CLI benchmark "$OUT/bundle" --device $DEV $BENCH --backends torch --precision fp32 \
  --no-channels-last --json "$OUT/benchmark_torch_fp32.json"
[[ -n "${SMOKE:-}" ]] || $CLI benchmark "$OUT/bundle" --device $DEV $BENCH --backends torch \
  --compile --json "$OUT/benchmark_torch_compiled.json"

step "random walk"
$PY benchmarks/refine_speed.py --device $DEV $RS --out "$OUT/refine_speed_gpu.md"

step "done: $OUT"
