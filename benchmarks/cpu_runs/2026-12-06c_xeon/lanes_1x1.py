"""One-off: 1x1 offset kernel, k-tile outer, lanes options (kernel alone, hot)."""
from pathlib import Path
import os, sys
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "micro"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch
from offset_nests import nest, timed_us, setup
from srigl_compile.codegen.kernels import offset_kernel
from srigl_compile.runtime.spec import block_rows
args, target = setup("x")
def run(n_out, n_in, k, positions, lanes, rows=32, kin=8, rin=2):
    tiles = -(-positions // lanes)
    plane = tiles * lanes
    gen = torch.Generator().manual_seed(0)
    columns = torch.rand(n_out, n_in, generator=gen).argsort(1)[:, :k].sort(1).values
    offsets = (columns * plane).int().contiguous()
    values, bias = torch.randn(n_out, k, generator=gen), torch.randn(n_out, generator=gen)
    x = torch.randn(1, n_in * plane, generator=gen)
    func = nest(offset_kernel(n_out, k, lanes, True, "nest", rows, kin, "relu"), False, rin)
    y = torch.zeros(1, n_out, tiles, lanes)
    us = timed_us(func, (x, block_rows(values, rows, kin), block_rows(offsets, rows, kin), bias, y), args.rounds, target)
    ref = torch.relu((values[:, :, None] * x[0][offsets.long()[:, :, None] + torch.arange(plane)]).sum(1) + bias[:, None])
    torch.testing.assert_close(y[0].reshape(n_out, -1), ref, rtol=1e-4, atol=1e-4)
    flops = 2 * n_out * k * positions
    print(f"{n_out}x{n_in} k{k} pos {positions} lanes {lanes} x{tiles} rows {rows}: {us:7.1f} us {flops/us/1e3:5.0f} GFLOP/s", flush=True)
for shape in [(256, 1024, 248, 196), (1024, 256, 64, 196), (512, 2048, 248, 49), (2048, 512, 64, 49), (128, 512, 248, 784)]:
    for lanes in ([208, 112, 64, 48, 32] if shape[3] == 196 else [64, 32, 16] if shape[3] == 49 else [112, 64, 32]):
        run(*shape, lanes)
