"""A near-dense layer under torch.compile: the dense form eager calls chose, against the kernel that compiled calls
ran before ``nn.traced_dense``, and torch's dense convolution (all compiled with inductor, one process, rounds
alternating, medians).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/cpu_runs/2026-12-07_xeon/compiled_dense_forms.py --sparsity 0.5
"""

import argparse
import json
import platform
import statistics
import subprocess
import time

import torch
import torch.nn as nn

from srigl_compile import SRigLConfig, lower, sparsify
from srigl_compile.codegen.backends import LlvmConfig
from srigl_compile.nn.settle import settle

parser = argparse.ArgumentParser()
parser.add_argument("--sparsity", type=float, default=0.5)
parser.add_argument("--batch", type=int, default=64)
parser.add_argument("--rounds", type=int, default=7)
parser.add_argument("--calls", type=int, default=10)
args = parser.parse_args()

torch.manual_seed(0)
dense = nn.Sequential(nn.Conv2d(2048, 512, 1, bias=False), nn.ReLU()).eval()  # ResNet-50 layer4's conv1 shape
x = torch.randn(args.batch, 2048, 7, 7)
sparse = sparsify(dense, SRigLConfig(sparsity=args.sparsity, distribution="uniform"), example_inputs=(x[:1],))
with torch.no_grad():
    lowered = lower(sparse, progress=False)
    settle(lowered, x)
    kernels = lower(sparse, LlvmConfig(dense_fallback=False, progress=False))
    masked_dense = nn.Sequential(nn.Conv2d(2048, 512, 1, bias=False), nn.ReLU()).eval()
    masked_dense[0].weight.copy_(sparse[0].weight * sparse[0].mask if hasattr(sparse[0], "mask") else sparse[0].weight)
    choices = {str(k): v for k, v in lowered[0]._dense_form.choices.items()}
    variants = {str(k): v for k, v in getattr(lowered[0]._dense_form, "variants", {}).items()}  # (from 564bb68)
    paths = {"lowered eager, settled": lowered, "lowered compiled (dense choice followed)": torch.compile(lowered),
             "lowered compiled, kernel (as before)": torch.compile(kernels),
             "torch dense compiled": torch.compile(masked_dense)}
    want = lowered(x)
    for name, run in paths.items():
        for _ in range(3):
            got = run(x)
        if "torch" not in name:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    times = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, run in paths.items():
            calls = []
            for _ in range(args.calls):
                start = time.perf_counter()
                run(x)
                calls.append(time.perf_counter() - start)
            times[name].append(statistics.median(calls) * 1e3)
result = {
    "command": "python benchmarks/cpu_runs/2026-12-07_xeon/compiled_dense_forms.py "
               f"--sparsity {args.sparsity} --batch {args.batch} --rounds {args.rounds} --calls {args.calls}",
    "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
    "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
    "torch": torch.__version__, "choices": choices, "variants": variants,
    "median_ms": {name: statistics.median(t) for name, t in times.items()},
    "rounds_ms": times,
}
print(json.dumps(result["median_ms"], indent=1), choices)
print(json.dumps(result))
