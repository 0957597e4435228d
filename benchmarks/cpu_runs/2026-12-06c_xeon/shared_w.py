"""One-off: in-place penalty when same-shaped layers share one set of weights (weights then stay in cache)."""
from pathlib import Path
import os, sys
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[2])); sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "micro"))
import numpy as np, torch
import models as model_bench
from common import set_threads
from profile_model import warm_up
from replay_calls import time_calls
from srigl_compile import cpu_graph
set_threads(2)
lowered = model_bench.build(model_bench.MODELS["resnet50"], 224)["lowered"]
x = torch.randn(1, 3, 224, 224)
warm_up(lowered, x)
graphed = cpu_graph(lowered)
with torch.no_grad():
    graphed(x); graphed(x)
    (entry,) = graphed._entries.values()
    calls = entry.recording.calls
    where, hot = time_calls(calls, 15)
    print(f"own weights: {where.sum():.2f} ms in place, {hot.sum():.2f} hot", flush=True)
    first = {}
    shared = 0
    for c in calls:
        ts = [t for t in c.args if isinstance(t, torch.Tensor)]
        if len(ts) < 4:
            continue
        key = (c.fn, tuple(tuple(t.shape) for t in ts))
        if key not in first:
            first[key] = c
            continue
        src = first[key].args
        c.args = tuple(src[i] if i in (1, 2) else a for i, a in enumerate(c.args))
        shared += 1
    print("calls sharing weights:", shared)
    where2, hot2 = time_calls(calls, 15)
    print(f"shared weights: {where2.sum():.2f} ms in place, {hot2.sum():.2f} hot", flush=True)
    for i in np.argsort(where2 - where)[:20]:
        print(i, f"{where[i]:.3f} -> {where2[i]:.3f} (hot {hot[i]:.3f})")
