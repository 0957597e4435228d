"""One-off: per-stage chunk sizes for ResNet-50 at batch 64 (feasibility)."""
from pathlib import Path
import os, sys, time, statistics
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch
import models as model_bench
from common import set_threads
from srigl_compile.nn.settle import settle
set_threads(2)
lowered = model_bench.build(model_bench.MODELS["resnet50"], 224)["lowered"]
x = torch.randn(64, 3, 224, 224)
with torch.no_grad():
    settle(lowered, x)
    print("chosen", lowered.layers.chunk_sizes, flush=True)
    seq = lowered.layers
    blocks = list(seq.children())
    orig_forward = seq.forward
    def segmented(plan):
        def forward(h):
            for (lo, hi), c in plan:
                parts = []
                for i in range(0, h.shape[0], c):
                    y = h[i:i + c]
                    for b in blocks[lo:hi]:
                        y = b(y)
                    parts.append(y)
                h = torch.cat(parts)
            return h
        return forward
    S = [(0, 3), (3, 7), (7, 13), (13, 16)]
    configs = {
        "chosen": None,
        "all4": [((0, 16), 4)],
        "1,4,4,4": list(zip(S, (1, 4, 4, 4))),
        "2,4,8,8": list(zip(S, (2, 4, 8, 8))),
        "1,2,4,8": list(zip(S, (1, 2, 4, 8))),
        "1,4,16,16": list(zip(S, (1, 4, 16, 16))),
    }
    times = {k: [] for k in configs}
    for name, plan in configs.items():  # warm up each (dense-form trials at new shapes)
        seq.forward = orig_forward if plan is None else segmented(plan)
        for _ in range(6):
            lowered(x)
    for r in range(4):
        for name, plan in configs.items():
            seq.forward = orig_forward if plan is None else segmented(plan)
            s = time.perf_counter(); lowered(x); times[name].append(time.perf_counter() - s)
    for name, t in times.items():
        print(f"{name:10s} median {statistics.median(t)*1e3:8.1f} ms  min {min(t)*1e3:8.1f}", flush=True)
