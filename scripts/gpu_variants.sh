#!/usr/bin/env bash
# Every CUDA kernel variant timed against cuBLAS, weights streamed from HBM, in about 4 minutes (the device tool,
# carry: [".gpu_bundle"], after scripts/gpu_check.sh); then, here: python benchmarks/cuda_variants.py --records
# OUT/cuda_variants.json writes the tuning records lower() dispatches by.
set -uo pipefail
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
RUN=.gpu_bundle/run.sh
echo "== kernel variants, weights from HBM (benchmarks/cuda_variants.py)"
timeout 230 bash "$RUN" python3 benchmarks/cuda_variants.py --run .gpu_bundle/variants --out "$OUT" \
    --repeats 5 --budget-s 200 2>&1 | tee "$OUT/variants.txt" | grep -E "^==|batch (1|8|16|256|2048):|WRONG|budget"
