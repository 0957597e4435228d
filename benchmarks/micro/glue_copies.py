"""The convolution library's glue copies alone, hot, on ResNet-50's shapes at batch 1: pad (stride 1), phase split
(stride 2), 1x1 subsample (stride 2), crop and max-pool (``codegen.glue_kernels``).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/micro/glue_copies.py [--rounds 15]

Each copy is checked against torch on the same input, then timed with TVM's time_evaluator (median of rounds).
Run it at two commits to compare a change of the glue.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import set_threads  # noqa: E402

from srigl_compile.codegen._tvm_compat import import_tvm  # noqa: E402
from srigl_compile.codegen.cpu_target import check_llvm_target  # noqa: E402
from srigl_compile.codegen.glue_kernels import glue_funcs  # noqa: E402
from srigl_compile.runtime.conv_geometry import direct_plan, strided_plan  # noqa: E402

# (what, channels, image size): the stem, then a 3x3 layer of each stage and a strided one (ResNet-50, batch 1)
PADS = [("stem 7x7/2 phase split", 3, 224, 7, 2), ("3x3 pad", 64, 56, 3, 1), ("3x3 pad", 256, 14, 3, 1),
        ("3x3/2 phase split", 128, 56, 3, 2), ("3x3/2 phase split", 512, 14, 3, 2), ("1x1/2 subsample", 256, 56, 1, 2)]
CROPS = [("stem crop", 64, 112, 118), ("3x3 crop", 64, 56, 58)]  # (what, channels, out size, pitch)
POOLS = [("stem max-pool 3x3/2", 64, 112)]


def timed(executable, name: str, args, rounds: int) -> float:
    evaluator = executable.time_evaluator(name, import_tvm().cpu(), number=20, repeat=rounds, min_repeat_ms=20)
    return float(np.median(evaluator(*args).results)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    tvm = import_tvm()
    funcs = glue_funcs(lambda name: f"glue_{name}", ("pad", "crop", "max_pool"))
    executable = tvm.compile(tvm.IRModule(funcs), target=tvm.target.Target(check_llvm_target(None))).mod
    wrap = tvm.runtime.from_dlpack
    for what, channels, size, kernel, stride in PADS:
        x = torch.randn(channels, size, size)
        pad = kernel // 2
        if kernel == 1:  # the pixels a strided 1x1 convolution reads
            rows = pitch = -(-size // stride)
            expected = x[:, ::stride, ::stride].reshape(channels, 1, 1, rows, pitch)
            top = left = 0
        else:
            if stride == 1:
                plan, pads = direct_plan(size, size, (kernel,) * 2, (pad, pad), (1, 1), 64), None
                pads = (pad, pad, pad, pad + plan.extra)
            else:
                plan, pads = strided_plan(size, size, (kernel,) * 2, (stride,) * 2, (pad, pad), (1, 1), 64)
            rows, pitch, left, top = plan.rows, plan.pitch, pads[0], pads[2]
            padded = F.pad(x, pads)
            expected = padded.view(channels, rows, stride, pitch, stride).permute(0, 2, 4, 1, 3)
        y = torch.full((channels, stride, stride, rows, pitch), float("nan")) if kernel > 1 else torch.full(
            (channels, 1, 1, rows, pitch), float("nan"))
        call = (wrap(x), wrap(y), top, left, stride, stride)
        executable["glue_pad"](*call)
        assert torch.equal(y, expected), what
        print(f"{what:24s} {channels:4d}x{size}x{size}: {timed(executable, 'glue_pad', call, args.rounds):7.1f} us",
              flush=True)
    for what, channels, size, pitch in CROPS:
        grid = torch.randn(channels, size * pitch)
        y = torch.empty(channels, size, size)
        call = (wrap(grid), wrap(y), pitch)
        executable["glue_crop"](*call)
        assert torch.equal(y, grid.view(channels, size, pitch)[..., :size]), what
        print(f"{what:24s} {channels:4d}x{size}x{size}: {timed(executable, 'glue_crop', call, args.rounds):7.1f} us",
              flush=True)
    for what, channels, size in POOLS:
        x = torch.randn(channels, size, size)
        y = torch.empty(channels, size // 2, size // 2)
        call = (wrap(x), wrap(y), 3, 3, 2, 2, 1, 1, 1, 1)
        executable["glue_max_pool"](*call)
        assert torch.equal(y, F.max_pool2d(x[None], 3, 2, 1)[0]), what
        print(f"{what:24s} {channels:4d}x{size}x{size}: "
              f"{timed(executable, 'glue_max_pool', call, args.rounds):7.1f} us", flush=True)


if __name__ == "__main__":
    main()
