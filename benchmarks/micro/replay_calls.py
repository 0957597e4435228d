"""Every call of a replayed forward, timed where it runs (in the replay's order, after the calls before it) and hot
(called again and again): which calls lose most to the caches inside the model.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/micro/replay_calls.py [--model resnet50] [--batch 1] [--rounds 15]
        [--top 30]

Builds the model as the model benchmark does, settles it, records it with ``cpu_graph``, then runs the recording's
calls one by one ``--rounds`` times (each call timed; median per call), and times each call alone (3 warm-up calls,
median of 15). Prints the totals and the ``--top`` calls by time lost (in place minus hot), each with its function
and its first and last tensor's shape. Timing single calls adds ~1 us each; the totals are therefore a little
above a replay's own time. (``cold_calls.py`` looks at one call more closely: hot, after a forward, and writing
over its residual.)
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

from srigl_compile import cpu_graph  # noqa: E402


def label(call) -> str:
    """A recorded call's function and its first and last tensor's shape."""
    tensors = [t for t in call.args if isinstance(t, torch.Tensor)]
    name = getattr(call.fn, "__name__", None) or str(call.fn).split("(")[0]
    shapes = f"{tuple(tensors[0].shape)} -> {tuple(tensors[-1].shape)}" if tensors else ""
    return f"{name[:28]:28s} {shapes}"


def time_calls(calls, rounds: int) -> tuple[np.ndarray, np.ndarray]:
    """(median ms of each call in place, over ``rounds`` runs of the list in order; median ms of each alone, hot:
    3 warm-up calls, then 15 timed). Call under ``torch.no_grad()``."""
    in_place = np.zeros((rounds, len(calls)))
    for round_ in range(rounds):
        for i, call in enumerate(calls):
            start = time.perf_counter()
            call()
            in_place[round_, i] = time.perf_counter() - start
    hot = np.zeros(len(calls))
    for i, call in enumerate(calls):
        for _ in range(3):
            call()
        times = []
        for _ in range(15):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        hot[i] = np.median(times)
    return np.median(in_place, axis=0) * 1e3, hot * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", choices=sorted(model_bench.MODELS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    lowered = model_bench.build(model_bench.MODELS[args.model], 224)["lowered"]
    x = torch.randn(args.batch, 3, 224, 224)
    warm_up(lowered, x)
    graphed = cpu_graph(lowered)
    with torch.no_grad():
        graphed(x)
        graphed(x)
        (entry,) = graphed._entries.values()
        calls = entry.recording.calls
        where, hot = time_calls(calls, args.rounds)
    print(f"{args.model} B={args.batch}: {len(calls)} calls, {where.sum():.2f} ms in place, {hot.sum():.2f} ms hot")
    for i in np.argsort(hot - where)[: args.top]:
        print(f"  {i:4d} {where[i]:7.3f} ms in place {hot[i]:7.3f} hot ({where[i] / max(hot[i], 1e-9):4.2f}x)  "
              f"{label(calls[i])}")


if __name__ == "__main__":
    main()
