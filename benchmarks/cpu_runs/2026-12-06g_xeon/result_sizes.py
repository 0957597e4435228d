"""Distinct recycled-result sizes a forward asks for (``scratch.result`` wrapped), eager and while cpu_graph records.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/cpu_runs/2026-12-06g_xeon/result_sizes.py resnet50 vit_b16
"""

import collections
import importlib
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import models as model_bench  # noqa: E402

from srigl_compile import cpu_graph  # noqa: E402
from srigl_compile.runtime import scratch  # noqa: E402

seen = collections.Counter()
pooled_result = scratch.result


def counted_result(shape, dtype=torch.float32):
    recording = getattr(scratch._LOCAL, "recording_holds", None) is not None
    if math.prod(shape) * dtype.itemsize >= (scratch.RECORDING_RECYCLE_FROM_BYTES if recording
                                             else scratch.RECYCLE_FROM_BYTES):
        seen[(math.prod(shape), dtype)] += 1
    return pooled_result(shape, dtype)


for name in ("attention_op", "conv_op", "conv_pool_op", "llvm_linear", "norm_op", "pool_op"):
    importlib.import_module(f"srigl_compile.runtime.{name}").result = counted_result

for model in sys.argv[1:]:
    lowered = model_bench.build(model_bench.MODELS[model], 224)["lowered"]
    for batch in (1, 8):
        x = torch.randn(batch, 3, 224, 224)
        for how, forward in (("eager", lowered), ("recording", cpu_graph(lowered))):
            seen.clear()
            with torch.no_grad():
                forward(x)
            print(model, how, "batch", batch, "distinct sizes", len(seen), "requests", sum(seen.values()))
