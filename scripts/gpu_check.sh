#!/usr/bin/env bash
# The GPU tests and benchmarks in one call, for the device tool (carry: [".gpu_bundle"]), in under 9 minutes:
#   python scripts/build_gpu_bundle.py                 # here, no GPU needed
#   run: bash scripts/gpu_check.sh                     # on the GPU machine; results land in $OUT
#   run: bash scripts/gpu_variants.sh                  # a second call, if device time is left (~4 minutes):
#                                                      # every kernel variant timed, for the dispatch records
# Each step has its own time limit so that one slow step cannot take the others' time.
set -uo pipefail
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
RUN=.gpu_bundle/run.sh
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv | tee "$OUT/gpu.txt"
echo "== tests/gpu"
timeout 150 bash "$RUN" python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -40 | tee "$OUT/tests_gpu.txt"
echo "== the lowered layer against cuBLAS (benchmarks/bench_layer_cuda.py)"
timeout 80 bash "$RUN" python3 benchmarks/bench_layer_cuda.py --out "$OUT" --sparsities 0.9 0.95 \
    --batches 1 8 16 64 256 2048 --iters 20 --repeats 7 2>&1 | tail -25 | tee "$OUT/layer.txt"
echo "== whole models: ViT-B/16 and a Llama-shaped decoder, dense fp16 against lowered (benchmarks/bench_models_cuda.py)"
timeout 180 bash "$RUN" python3 benchmarks/bench_models_cuda.py --out "$OUT" --models vit_b16 decoder \
    --decoder-layers 4 2>&1 | tail -20 | tee "$OUT/models.txt"
echo "== compute-sanitizer memcheck: every regime on 10 rows (the expand kernel's last block reaches past n_out)"
SANITIZER="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1 || true)"
if [ -n "$SANITIZER" ]; then
    timeout 90 bash "$RUN" "$SANITIZER" --tool memcheck --error-exitcode 7 python3 -m pytest -q -p no:cacheprovider \
        tests/gpu -k "regime and linear_3072_10" 2>&1 | tail -30 | tee "$OUT/memcheck.txt"
    echo "memcheck exit status ${PIPESTATUS[0]} (7: errors found; 124: out of time)" | tee -a "$OUT/memcheck.txt"
else
    echo "compute-sanitizer not found on this machine: memcheck not run" | tee "$OUT/memcheck.txt"
fi
