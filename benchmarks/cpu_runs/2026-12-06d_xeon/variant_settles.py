"""How steady a 1x1 layer's dense-variant choice is: N settles of ResNet-50's layer4 1x1 shape (2048 -> 512 on
7x7, batch 64, uniform masks), each lowering afresh, printing each trial's rounds and medians (kernel, sgemm,
oneDNN; ms) and the path kept; then every kept path's time in turn, rounds alternating (medians of 10 calls).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/cpu_runs/2026-12-06d_xeon/variant_settles.py --sparsity 0.5 --settles 6
        [--close 0]
"""
import argparse
import json
import statistics
import subprocess
import time

import torch
import torch.nn as nn

import srigl_compile.nn.dense_fallback as dfb
from srigl_compile import SRigLConfig, lower, sparsify
from srigl_compile.nn.settle import settle

parser = argparse.ArgumentParser()
parser.add_argument("--sparsity", type=float, default=0.5)
parser.add_argument("--settles", type=int, default=6)
parser.add_argument("--close", type=float, default=0.0,
                    help="the close-call margin of 508a392 (0: the rule before it); the rule was reverted after this "
                         "measurement, so values > 0 need a checkout from 508a392 to c77375c")
parser.add_argument("--out")
args = parser.parse_args()
if args.close and not hasattr(dfb, "CLOSE"):
    parser.error("--close > 0 needs the library of 508a392..c77375c (the close-call rule was reverted)")
dfb.CLOSE = args.close
torch.manual_seed(0)
dense = nn.Sequential(nn.Conv2d(2048, 512, 1, bias=False), nn.ReLU()).eval()
x = torch.randn(64, 2048, 7, 7)
sparse = sparsify(dense, SRigLConfig(sparsity=args.sparsity, distribution="uniform"), example_inputs=(x[:1],))
trials = []
record = dfb._Trial.record


def logged(self, *seconds):
    over = record(self, *seconds)
    if over:
        medians = [round(statistics.median(t) * 1e3, 2) for t in self.times]
        trials.append({"rounds": self.calls - 1, "medians_ms": medians})
    return over


dfb._Trial.record = logged
settles, models = [], []
with torch.no_grad():
    for i in range(args.settles):
        lowered = lower(sparse, progress=False)
        settle(lowered, x)
        form = lowered[0]._dense_form
        key = (x.shape, None)
        path = (form.variants.get(key, "matmul") if form.choices.get(key) else "kernel")
        settles.append({**trials[-1], "kept": path})
        print(i, settles[-1], flush=True)
        models.append(lowered)
    times = [[] for _ in models]
    for _ in range(5):
        for m, t in zip(models, times):
            m(x)
            start = time.perf_counter()
            for _ in range(10):
                m(x)
            t.append((time.perf_counter() - start) / 10 * 1e3)
for s, t in zip(settles, times):
    s["forward_ms"] = round(statistics.median(t), 2)
print(json.dumps(settles))
if args.out:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    with open(args.out, "w") as f:
        command = "variant_settles.py --sparsity %g --settles %d --close %g" % (args.sparsity, args.settles, args.close)
        json.dump({"command": command,
                   "commit": commit, "torch": torch.__version__, "settles": settles}, f, indent=1)
