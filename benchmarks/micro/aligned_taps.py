"""An experiment: what a 3x3 offset kernel loses to unaligned loads, and whether aligning them pays.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/micro/aligned_taps.py [--rounds 15]

A direct convolution's non-zero (channel c, kernel row i, column j) reads ``lanes`` floats from c * plane + i *
pitch + j + q: with a pitch of W + 2, almost every 16-float load straddles two cache lines. For ResNet-50's 3x3
shapes at 90% (k = 104 of 9 C), kernel alone, hot, with the rules' k-tile-outer nest:
- "as built": the offsets of the padded image the library uses (pitch W + 2);
- "rounded": the same offsets rounded down to whole vectors (wrong values, the same work): what alignment alone
  would give;
- "three copies": an input of three copies shifted by j = 0, 1, 2 with the pitch rounded up to whole vectors, so
  every load is aligned: its wider grid and 3x input are the price (the pad copy that would write the copies is
  not timed).
Random distinct columns per row; median of TVM's time_evaluator.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from offset_nests import nest, setup, timed_us  # noqa: E402

from srigl_compile.codegen.kernels import offset_kernel  # noqa: E402
from srigl_compile.runtime.conv_geometry import (  # noqa: E402
    VECTOR,
    aligned_plane,
    column_offsets,
    direct_plan,
    exact_tile,
)
from srigl_compile.runtime.spec import block_rows  # noqa: E402

SHAPES = [(64, 64, 56), (128, 128, 28), (256, 256, 14), (512, 512, 7)]  # (n_out, channels, image)
K = 104


def _tile(positions: int) -> int:
    """The tile width the AVX-512 backend gives a convolution's grid (``LlvmBackend.conv_tile``, share 1)."""
    widest = 13 * VECTOR
    if positions % VECTOR and positions <= widest:
        return aligned_plane(positions)
    return exact_tile(positions, vector=VECTOR, widest=widest)


def _time_us(n_out: int, lanes: int, tiles: int, x, offsets, values, bias, rounds: int, target) -> float:
    func = nest(offset_kernel(n_out, K, lanes, True, "taps", 32, 8, "relu"), False, 2)
    y = torch.zeros(1, n_out, tiles, lanes)
    return timed_us(func, (x, block_rows(values, 32, 8), block_rows(offsets.contiguous(), 32, 8), bias, y), rounds,
                    target)


def run(n_out: int, channels: int, image: int, rounds: int, target) -> None:
    gen = torch.Generator().manual_seed(0)
    columns = torch.rand(n_out, channels * 9, generator=gen).argsort(1)[:, :K].sort(1).values
    values, bias = torch.randn(n_out, K, generator=gen), torch.randn(n_out, generator=gen)
    lanes = _tile(image * (image + 2))
    plan = direct_plan(image, image, (3, 3), (1, 1), (1, 1), lanes)
    x = torch.randn(1, channels * plan.plane, generator=gen)
    offsets = column_offsets(columns, (3, 3), (1, 1), plan, channels * 9)
    built = _time_us(n_out, lanes, plan.tiles, x, offsets, values, bias, rounds, target)
    rounded = _time_us(n_out, lanes, plan.tiles, x, offsets // VECTOR * VECTOR, values, bias, rounds, target)
    pitch = -(-(image + 2) // VECTOR) * VECTOR
    wide = _tile(image * pitch)
    tiles = -(-image * pitch // wide)
    plane = -(-(tiles * wide + 2 * pitch) // pitch) * pitch
    channel, tap = columns // 9, columns % 9
    shifted = ((channel * 3 + tap % 3) * plane + tap // 3 * pitch).to(torch.int32)
    copies = _time_us(n_out, wide, tiles, torch.randn(1, 3 * channels * plane, generator=gen), shifted, values,
                      bias, rounds, target)
    print(f"{n_out}x{channels} 3x3 {image}x{image}: as built {built:6.1f} us (lanes {lanes}, pitch {plan.pitch}); "
          f"rounded {rounded:6.1f} us ({built / rounded:.2f}x); three copies {copies:6.1f} us (lanes {wide}, pitch "
          f"{pitch}; {built / copies:.2f}x)", flush=True)


def main() -> None:
    args, target = setup(__doc__.splitlines()[0])
    for shape in SHAPES:
        run(*shape, args.rounds, target)


if __name__ == "__main__":
    main()
