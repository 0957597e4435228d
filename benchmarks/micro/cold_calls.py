"""What a kernel call loses inside a model's forward: one captured call of a compiled function timed hot (called
again and again) and right after a whole forward (what it meets inside the model: its operands written or read
long before), and for a convolution with a residual add, also writing its output over the residual (how much of
the loss is its stores fetching the output's lines first).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/micro/cold_calls.py --kernel conv_o256_i64_k61 [--call 1]
        [--model resnet50] [--batch 1] [--rounds 25]

Builds the model as the model benchmark does, settles it, captures the ``--call``-th call (0-based, in a forward)
of the first registered handle whose key starts with ``--kernel`` (the ``*_fn`` that ``--function`` names), then
prints median milliseconds: hot; after a forward; after a forward with y = res (a call with a residual only; the
forward rewrites both buffers each round, so the garbage an in-place call leaves is never read).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models as model_bench  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import set_threads  # noqa: E402
from profile_model import warm_up  # noqa: E402

from srigl_compile.runtime.registry import registered_handles  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", required=True, help="start of the handle's key, e.g. conv_o256_i64_k61")
    parser.add_argument("--function", default="conv_fn")
    parser.add_argument("--call", type=int, default=0)
    parser.add_argument("--model", default="resnet50", choices=sorted(model_bench.MODELS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    lowered = model_bench.build(model_bench.MODELS[args.model], 224)["lowered"]
    x = torch.randn(args.batch, 3, 224, 224)
    warm_up(lowered, x)
    handle = next(h for h in registered_handles() if h.key.startswith(args.kernel))
    function, calls = getattr(handle, args.function), []
    object.__setattr__(handle, args.function, lambda *operands: calls.append(operands) or function(*operands))
    with torch.no_grad():
        lowered(x)
    object.__setattr__(handle, args.function, function)
    operands = calls[args.call]
    print(f"{handle.key.split('@')[0]} {args.function}, call {args.call} of {len(calls)} a forward: operands "
          f"{[tuple(t.shape) for t in operands if isinstance(t, torch.Tensor)]}")

    def after_forward(call) -> float:
        times = []
        for _ in range(args.rounds):
            with torch.no_grad():
                lowered(x)
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return float(np.median(times)) * 1e3

    hot = []
    for _ in range(args.rounds + 5):
        start = time.perf_counter()
        function(*operands)
        hot.append(time.perf_counter() - start)
    print(f"  hot {np.median(hot[5:]) * 1e3:.3f} ms, after a forward {after_forward(lambda: function(*operands)):.3f}"
          " ms", end="")
    res, y = operands[-2], operands[-1]
    if isinstance(res, torch.Tensor) and res.shape == y.shape and res.stride() == y.stride() and "add" in handle.key:
        in_place = (*operands[:-1], res)
        print(f", after a forward writing y over res {after_forward(lambda: function(*in_place)):.3f} ms", end="")
    print()


if __name__ == "__main__":
    main()
