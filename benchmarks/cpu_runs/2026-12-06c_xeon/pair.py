"""One-off: does splitting 1x1 convs by positions (both layers alike) cut the next layer's in-place loss?
A: 1024x256 k64 (stage-3 conv3), B: 256x1024 k248 (next block's conv1), 14x14 maps, planes of 224 floats."""
from pathlib import Path
import os, sys, time
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "micro"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import numpy as np, torch
from offset_nests import nest, setup
from srigl_compile.codegen._tvm_compat import import_tvm
from srigl_compile.codegen.kernels import offset_kernel
from srigl_compile.runtime.spec import block_rows
args, target = setup("x")
tvm = import_tvm()
PLANE = 224
def build(n_out, n_in, k, lanes, seed):
    gen = torch.Generator().manual_seed(seed)
    columns = torch.rand(n_out, n_in, generator=gen).argsort(1)[:, :k].sort(1).values
    offsets = (columns * PLANE).int().contiguous()
    values, bias = torch.randn(n_out, k, generator=gen) * 0.1, torch.randn(n_out, generator=gen)
    func = nest(offset_kernel(n_out, k, lanes, True, f"k{n_out}_{lanes}", 32, 8, "relu"), False, 2)
    ex = tvm.compile(tvm.IRModule({str(func.attrs["global_symbol"]): func}), target=tvm.target.Target(dict(target)))
    f = ex.mod[str(func.attrs["global_symbol"])]
    return f, block_rows(values, 32, 8), block_rows(offsets, 32, 8), bias
def run(lanes, rounds=300):
    tiles = PLANE // lanes
    A = build(1024, 256, 64, lanes, 0)
    B = build(256, 1024, 248, lanes, 1)
    x0 = torch.randn(1, 256 * PLANE)
    y1 = torch.zeros(1, 1024, tiles, lanes)
    y2 = torch.zeros(1, 256, tiles, lanes)
    a = lambda: A[0](x0, A[1], A[2], A[3], y1)
    b = lambda: B[0](y1.view(1, -1), B[1], B[2], B[3], y2)
    for _ in range(20): a(); b()
    ta, tb = [], []
    for _ in range(rounds):
        s = time.perf_counter(); a(); m = time.perf_counter(); b(); e = time.perf_counter()
        ta.append(m - s); tb.append(e - m)
    alone_a, alone_b = [], []
    for _ in range(rounds):
        s = time.perf_counter(); a(); alone_a.append(time.perf_counter() - s)
    for _ in range(rounds):
        s = time.perf_counter(); b(); alone_b.append(time.perf_counter() - s)
    med = lambda t: np.median(t) * 1e6
    print(f"lanes {lanes} x{tiles}: in pair A {med(ta):6.1f} B {med(tb):6.1f} us; alone A {med(alone_a):6.1f} B {med(alone_b):6.1f} us; "
          f"pair total {med(ta)+med(tb):6.1f} vs alone {med(alone_a)+med(alone_b):6.1f}", flush=True)
for rep in range(3):
    for lanes in (224, 112):
        run(lanes)
