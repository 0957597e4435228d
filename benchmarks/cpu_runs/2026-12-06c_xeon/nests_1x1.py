"""One-off: own-offset 1x1 shapes of ResNet-50 stages 2-4: k-tile outer vs row-stationary (rin 1, 2), kernel alone."""
from pathlib import Path
import os, sys
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "micro"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch
from offset_nests import nest, timed_us, setup
from srigl_compile.codegen.kernels import offset_kernel
from srigl_compile.runtime.spec import block_rows
args, target = setup("x")
def run(n_out, n_in, k, positions, lanes, rows=32, kin=8):
    tiles = -(-positions // lanes)
    plane = tiles * lanes
    gen = torch.Generator().manual_seed(0)
    columns = torch.rand(n_out, n_in, generator=gen).argsort(1)[:, :k].sort(1).values
    offsets = (columns * plane).int().contiguous()
    values, bias = torch.randn(n_out, k, generator=gen), torch.randn(n_out, generator=gen)
    x = torch.randn(1, n_in * plane, generator=gen)
    ref = torch.relu((values[:, :, None] * x[0][offsets.long()[:, :, None] + torch.arange(plane)]).sum(1) + bias[:, None])
    out = []
    for stationary, rin in ((False, 2), (True, 2), (True, 1)):
        func = nest(offset_kernel(n_out, k, lanes, True, "nest", rows, kin, "relu"), stationary, rin)
        y = torch.zeros(1, n_out, tiles, lanes)
        us = timed_us(func, (x, block_rows(values, rows, kin), block_rows(offsets, rows, kin), bias, y), args.rounds, target)
        torch.testing.assert_close(y[0].reshape(n_out, -1), ref, rtol=1e-4, atol=1e-4)
        out.append(us)
    flops = 2 * n_out * k * positions
    print(f"{n_out}x{n_in} k{k} pos {positions} lanes {lanes}: k-tile outer {out[0]:6.1f} us, stationary rin2 {out[1]:6.1f} "
          f"({out[0]/out[1]:.2f}x), rin1 {out[2]:6.1f} ({out[0]/out[2]:.2f}x)   [{flops/out[0]/1e3:.0f} GFLOP/s]", flush=True)
for shape in [(256, 1024, 248, 196, 208), (1024, 256, 64, 196, 208), (512, 2048, 248, 49, 64), (2048, 512, 64, 49, 64),
              (128, 512, 248, 784, 112), (512, 128, 64, 784, 112), (1024, 512, 72, 196, 208)]:
    run(*shape)
