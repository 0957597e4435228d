"""One-off: ResNet-50 lowered, single thread, batch B, cpu_graph replay; prints median forward ms."""
from pathlib import Path
import os, sys, time, statistics
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
threads = int(sys.argv[2]); batch = int(sys.argv[1]); tag = sys.argv[3]
os.environ["TVM_NUM_THREADS"] = str(threads)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch
import models as model_bench
from common import set_threads
from srigl_compile import cpu_graph
from srigl_compile.nn.settle import settle
set_threads(threads)
lowered = model_bench.build(model_bench.MODELS["resnet50"], 224)["lowered"]
x = torch.randn(batch, 3, 224, 224)
with torch.no_grad():
    settle(lowered, x)
    g = cpu_graph(lowered)
    g(x); g(x)
    open(f"/tmp/srigl_ready_{tag}", "w").close()
    while not all(os.path.exists(f"/tmp/srigl_ready_{t}") for t in sys.argv[4:]):
        time.sleep(0.1)
    ts = []
    t0 = time.perf_counter()
    for _ in range(int(os.environ.get("ROUNDS", "5"))):
        s = time.perf_counter(); g(x); ts.append(time.perf_counter() - s)
    print(tag, batch, threads, f"median {statistics.median(ts)*1e3:.1f} ms, min {min(ts)*1e3:.1f}, wall {(time.perf_counter()-t0)*1e3:.0f}", flush=True)
