"""Each lowered layer's time inside a model's forward and its achieved GFLOP/s against the machine's measured
fp32 peak (torch's sgemm at the same threads): what the model benchmark reports per model and batch, and what
``profile_model.py --layers`` prints.

A layer's time is its calls (padding and crop copies included; a convolution run band by band with its max-pool,
``nn.conv_pool``, with the pool, under the pool's name) timed by forward hooks over ``forwards`` forwards:
the median call times the calls a forward makes (a stack run in batch chunks, ``nn.batch_chunks``, calls each
layer once per chunk); its useful work is 2 x active neurons x k x output positions (rows of x for a Linear) summed
over a forward's calls, the multiply-adds its non-zeros do, not the dense layer's.

Example:
    >>> table = layer_efficiency(lowered, x, forwards=5)                 # doctest: +SKIP
    >>> table["gflops"], table["layers"][0]["of_peak"]                   # doctest: +SKIP
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from srigl_compile.nn.conv_pool import LoweredConvMaxPool
from srigl_compile.nn.lowered import LoweredConv, LoweredLinear
from srigl_compile.runtime.conv_geometry import output_size

_PEAK: dict[int, float] = {}  # threads -> GFLOP/s, measured once per process


def sgemm_peak_gflops(size: int = 2048, repeats: int = 10) -> float:
    """The best of ``repeats`` fp32 matrix products of ``size``^3 by torch at its current threads, in GFLOP/s
    (measured once per thread count and process)."""
    threads = torch.get_num_threads()
    if threads not in _PEAK:
        a, b = torch.randn(size, size), torch.randn(size, size)
        torch.mm(a, b)
        best = min(_seconds(lambda: torch.mm(a, b)) for _ in range(repeats))
        _PEAK[threads] = 2 * size**3 / best / 1e9
    return _PEAK[threads]


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def useful_flops(layer, out: torch.Tensor, x: torch.Tensor) -> float:
    """2 x active neurons x k x output positions (rows of x for a Linear; for a convolution run with its max-pool,
    the convolution's positions on the input ``x``)."""
    if isinstance(layer, LoweredConvMaxPool):
        _, kernel, stride, dilation, padding = layer.conv._as_2d(x)
        layer, positions = layer.conv, x.shape[0] * math.prod(output_size(x.shape[2:], kernel, stride, padding,
                                                                          dilation))
    else:
        positions = out.numel() // out.shape[1] if isinstance(layer, LoweredConv) else out.numel() // out.shape[-1]
    return 2.0 * layer.n_active * layer.k * positions


def layer_efficiency(lowered: torch.nn.Module, x: torch.Tensor, forwards: int = 5) -> dict:
    """{"forward_ms", "layers_ms", "useful_gflop", "gflops", "sgemm_peak_gflops", "layers": [per lowered layer:
    layer, kind, n_active, k, kernel, calls (a forward's), ms (a forward's), gflops, of_peak]} (module docstring);
    the model is warmed up (its dense-form trials settled) by the caller."""
    fused = {f"{name}.conv" for name, m in lowered.named_modules() if isinstance(m, LoweredConvMaxPool)}
    layers = {name: m for name, m in lowered.named_modules()  # (a fused pair's time and work: its conv's row)
              if isinstance(m, (LoweredConv, LoweredLinear, LoweredConvMaxPool)) and name not in fused}
    seconds: dict[str, list[float]] = {name: [] for name in layers}
    flops: dict[str, float] = dict.fromkeys(layers, 0.0)  # summed over every call of the timed forwards
    started: dict[str, float] = {}

    def before(name):
        return lambda module, inputs: started.__setitem__(name, time.perf_counter())

    def after(name):
        def hook(module, inputs, out):
            seconds[name].append(time.perf_counter() - started[name])
            flops[name] += useful_flops(module, out, inputs[0])
        return hook

    hooks = [h for name, m in layers.items()  # (nn.Module's own method: a fused layer's warns about what it sees)
             for h in (m.register_forward_pre_hook(before(name)),
                       torch.nn.Module.register_forward_hook(m, after(name)))]
    try:
        with torch.no_grad():
            total = [_seconds(lambda: lowered(x)) for _ in range(forwards)]
    finally:
        for hook in hooks:
            hook.remove()
    peak = sgemm_peak_gflops()
    rows = []
    for name, layer in layers.items():
        if not seconds[name]:  # (a layer the forward never called)
            continue
        calls = len(seconds[name]) / forwards
        per_forward = statistics.median(seconds[name]) * calls
        work = flops[name] / forwards
        conv = layer.conv if isinstance(layer, LoweredConvMaxPool) else layer
        rows.append({"layer": name, "kind": type(layer).__name__, "n_active": conv.n_active, "k": conv.k,
                     "kernel": conv.kernel_key.split("@")[0], "calls": calls, "ms": per_forward * 1e3,
                     "gflops": work / per_forward / 1e9, "of_peak": work / per_forward / 1e9 / peak})
    in_layers = sum(r["ms"] for r in rows)
    useful = sum(flops[r["layer"]] for r in rows) / forwards / 1e9
    return {"forward_ms": statistics.median(total) * 1e3, "layers_ms": in_layers, "useful_gflop": useful,
            "gflops": useful / in_layers * 1e3 if in_layers else 0.0, "sgemm_peak_gflops": peak, "layers": rows}
