#!/usr/bin/env bash
# Every GPU test and benchmark in one call, for the device tool (carry: [".gpu_bundle"]), in under 9 minutes:
#   python scripts/build_gpu_bundle.py                 # here, no GPU needed
#   run: bash scripts/gpu_check.sh                     # on the GPU machine; results land in $OUT
# Each step has its own time limit so that one slow step cannot take the others' time.
set -uo pipefail
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
RUN=.gpu_bundle/run.sh
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv | tee "$OUT/gpu.txt"
echo "== tests/gpu"
timeout 150 bash "$RUN" python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -40 | tee "$OUT/tests_gpu.txt"
echo "== kernel variants, weights from HBM (benchmarks/cuda_variants.py)"
timeout 200 bash "$RUN" python3 benchmarks/cuda_variants.py --run .gpu_bundle/variants --out "$OUT" \
    --repeats 5 --budget-s 170 2>&1 | tee "$OUT/variants.txt" | grep -E "^==|batch (1|8|16|256|2048):|WRONG|budget"
echo "== the lowered layer against cuBLAS (benchmarks/bench_layer_cuda.py)"
timeout 80 bash "$RUN" python3 benchmarks/bench_layer_cuda.py --out "$OUT" --sparsities 0.9 0.95 \
    --batches 1 8 16 64 256 2048 --iters 20 --repeats 7 2>&1 | tail -25 | tee "$OUT/layer.txt"
echo "== compute-sanitizer memcheck: every regime on 10 rows (the expand kernel's last block reaches past n_out)"
SANITIZER="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1 || true)"
if [ -n "$SANITIZER" ]; then
    timeout 100 bash "$RUN" "$SANITIZER" --tool memcheck --error-exitcode 7 python3 -m pytest -q -p no:cacheprovider \
        tests/gpu -k "regime and linear_3072_10" 2>&1 | tail -30 | tee "$OUT/memcheck.txt"
    echo "memcheck exit status ${PIPESTATUS[0]} (7: errors found; 124: out of time)" | tee -a "$OUT/memcheck.txt"
else
    echo "compute-sanitizer not found on this machine: memcheck not run" | tee "$OUT/memcheck.txt"
fi
