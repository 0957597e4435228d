"""An experiment: ResNet-50's stride-1 bottleneck blocks run depth-first over bands of rows, from the layers'
own compiled functions, inside a replayed forward. Not how the library runs them: it measures whether it would pay.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/micro/banded_block.py [--rows 8] [--blocks 1 2]

Per band of ``--rows`` output rows (stage 1: 56x56, conv1 1x1 256->64, conv2 3x3 64->64, conv3 1x1 64->256 with
the block's input added): conv1 on the band's input rows (one band ahead, so that conv2 has the row below it),
their pad into a whole padded image written band by band, conv2 on the band's padded rows, its crop, then conv3
with the band's residual rows and output rows copied by torch (the kernels take compact operands). The band's
temporaries stay in L2; the block's input is read twice within a band instead of a whole block apart.

Checks each banded block against the layers run one after the other (bit for bit), then prints the median
replayed forward with the blocks as they are, banded, and as they are again; then every call of the banded
forward in place and hot (``replay_calls.time_calls``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import types
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models as model_bench  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import set_threads  # noqa: E402
from profile_model import warm_up  # noqa: E402
from replay_calls import label, time_calls  # noqa: E402

from srigl_compile import cpu_graph  # noqa: E402
from srigl_compile.runtime.conv_geometry import aligned_plane, direct_plan, planar_stride  # noqa: E402
from srigl_compile.runtime.registry import get_handle  # noqa: E402
from srigl_compile.runtime.scratch import result, scratch  # noqa: E402


def _on(tensor: torch.Tensor, offset: int, shape: tuple, stride: tuple) -> torch.Tensor:
    return torch.empty(0).set_(tensor.untyped_storage(), tensor.storage_offset() + offset, shape, stride)


def banded(block, x: torch.Tensor, rows: int) -> torch.Tensor:
    """The block's output for x [1, C, H, W], band by band (module docstring)."""
    c1, c2, c3 = block.conv1, block.conv2, block.conv3
    h1, h2, h3 = (get_handle(c.kernel_key) for c in (c1, c2, c3))
    _, channels, height, width = x.shape
    if x.shape[0] != 1 or height % rows:
        raise ValueError(f"needs batch 1 and rows dividing {height}")
    plane_x = planar_stride(x)
    n1, n2, n3 = h1.n_out, h2.n_out, h3.n_out
    p1 = dataclasses.replace(direct_plan(rows, width, (1, 1), (0, 0), (1, 1), h1.lanes), rows=rows, extra=0,
                             plane=plane_x)
    p3 = dataclasses.replace(direct_plan(rows, width, (1, 1), (0, 0), (1, 1), h3.lanes), rows=rows, extra=0,
                             plane=rows * width)
    if p1.tiles * p1.lanes != rows * width or p3.tiles * p3.lanes != rows * width:
        raise ValueError(f"{rows} rows of {width} are not whole tiles of {h1.lanes} and {h3.lanes}")
    whole = direct_plan(height, width, (3, 3), (1, 1), (1, 1), h2.lanes)
    band = direct_plan(rows, width, (3, 3), (1, 1), (1, 1), h2.lanes)
    pitch = whole.pitch
    plane = aligned_plane(max(whole.plane, (height - rows + band.rows) * pitch))
    p2 = dataclasses.replace(band, plane=plane)
    off1 = h1.offsets(c1.indices, (1, 1), (1, 1), p1)
    off2 = h2.offsets(c2.indices, (3, 3), (1, 1), p2)
    off3 = h3.offsets(c3.indices, (1, 1), (1, 1), p3)
    padded = scratch("band_padded", (n1, plane))
    padded[:, (height + 1) * pitch:].zero_()  # the bottom padding row and the extra rows
    y1 = scratch("band_y1", (1, n1, rows * width))
    grid = scratch("band_grid", (1, n2, p2.tiles * p2.lanes))
    h2_rows = scratch("band_h2", (1, n2, rows * width))
    res = scratch("band_res", (1, n3, rows * width))
    y3 = scratch("band_y3", (1, n3, rows * width))
    out = result((1, n3, height, width))

    def conv1_band(j: int) -> None:
        first = j * rows
        length = channels * plane_x - first * width
        h1.conv_fn(_on(x, first * width, (1, length), (length, 1)), c1.values, off1, c1.bias,
                   y1.view(1, n1, p1.tiles, p1.lanes))
        top = 1 if j == 0 else 0  # (the first band also writes the zero row above the image)
        h1.pad_fn(y1.view(n1, rows, width), _on(padded, (first + 1 - top) * pitch, (n1, 1, 1, rows + top, pitch),
                                                 (plane, 1, 1, pitch, 1)), top, 1, 1, 1)

    bands = height // rows
    conv1_band(0)
    for j in range(bands):
        if j + 1 < bands:
            conv1_band(j + 1)
        first = j * rows
        length = n1 * plane - first * pitch
        h2.conv_fn(_on(padded, first * pitch, (1, length), (length, 1)), c2.values, off2, c2.bias,
                   grid.view(1, n2, p2.tiles, p2.lanes))
        h2.crop_fn(grid.view(n2, -1), h2_rows.view(n2, rows, width), pitch)
        res.view(n3, rows, width).copy_(x[0, :, first:first + rows])
        h3.conv_fn(h2_rows.view(1, -1), c3.values, off3, c3.bias, res.view(1, n3, p3.tiles, p3.lanes),
                   y3.view(1, n3, p3.tiles, p3.lanes))
        out[0, :, first:first + rows].copy_(y3.view(n3, rows, width))
    return out


def _median_ms(model, x, forwards: int = 60) -> float:
    with torch.no_grad():
        for _ in range(5):
            model(x)
        times = []
        for _ in range(forwards):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 2], help="stride-1 blocks of stage 1")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    lowered = model_bench.build(model_bench.MODELS["resnet50"], 224)["lowered"]
    x = torch.randn(1, 3, 224, 224)
    warm_up(lowered, x)
    seen = {}
    hooks = [lowered.layers[i].register_forward_hook(
        lambda module, inputs, output, i=i: seen.__setitem__(i, (inputs[0].clone(), output.clone())))
        for i in args.blocks]
    with torch.no_grad():
        lowered(x)
        for hook in hooks:
            hook.remove()
        for i in args.blocks:
            block_input, expected = seen[i]
            if not torch.equal(banded(lowered.layers[i], block_input, args.rows), expected):
                raise SystemExit(f"block {i}: the banded output differs from the layers'")
    as_they_are = _median_ms(cpu_graph(lowered), x)
    for i in args.blocks:
        lowered.layers[i].forward = types.MethodType(lambda self, x: banded(self, x, args.rows), lowered.layers[i])
    graphed = cpu_graph(lowered)
    band = _median_ms(graphed, x)
    (entry,) = graphed._entries.values()
    calls = entry.recording.calls
    for i in args.blocks:
        del lowered.layers[i].forward
    again = _median_ms(cpu_graph(lowered), x)
    print(f"resnet50 B=1, blocks {args.blocks} in bands of {args.rows} rows: replayed forward {as_they_are:.2f} ms "
          f"as they are, {band:.2f} banded, {again:.2f} as they are again")
    with torch.no_grad():
        where, hot = time_calls(calls[:40], 1)  # (the first 40: the stem and the two banded blocks)
    for i, call in enumerate(calls[:40]):
        print(f"  {i:3d} {where[i]:6.3f} ms in place {hot[i]:6.3f} hot  {label(call)}")

if __name__ == "__main__":
    main()
