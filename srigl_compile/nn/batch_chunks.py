"""Stacks of lowered convolutions that may run a batch in chunks of images, and the measured choice of the chunk.

Layer by layer, a convolution net at a large batch writes every layer's activations for the whole batch before the
next layer reads them: ResNet-50's first-stage layers at batch 64 write 205 MB each, which go out to memory and
come back. In chunks of a few images they stay in cache. ResNet-50 at 90% ERK, batch 64, 2-core Xeon, one process:
the whole batch at once 1454-1490 ms, chunks of 16 1417, 8 1364, 4 1340, 2 1333; ViT-B/16 gains nothing (its
linear kernels already tile the batch and run near their compute limit).

``ChunkedSequential`` is an ``nn.Sequential`` (``passes/batch_chunks.py`` makes one of each sequence of lowered
convolutions whose every step is per-sample: no step mixes images) with ``chunk_sizes``: input shape -> images
per chunk (None: the whole batch). Until a shape is measured it runs whole batches. ``choose_batch_chunks`` (called
by ``nn.settle.settle``, the warm-up) times alternating whole forwards of the model with each chunk size that
divides the batch (each size's dense-form trials settled first) and keeps the fastest only when it takes at most
``MIN_GAIN`` of the whole batch's time. Every image's values are computed by the same kernels either way, so
outputs are bit for bit the same, unless a layer's dense form (``nn.dense_fallback``, each input shape's own timed
choice) runs at one shape and not the other: then they agree to float32 rounding. Eager calls only: traced calls
(fx, torch.compile, export) run whole batches. The choices are this machine's: ``save_lowered`` keeps them, a
model loaded on another CPU, core or thread count forgets them.

Example:
    >>> settle(lowered, torch.randn(64, 3, 224, 224))                  # doctest: +SKIP
    >>> lowered.layers.chunk_sizes                                      # doctest: +SKIP
    {torch.Size([64, 64, 56, 56]): 4}
"""

from __future__ import annotations

import operator
import statistics
import time

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..runtime.scratch import result
from . import dense_fallback
from .conv_pool import LoweredConvMaxPool
from .lowered import LoweredConv, LoweredLinear
from .norms import LoweredLayerNorm
from .pooling import LoweredMaxPool2d

__all__ = ["ChunkedSequential", "per_sample", "choose_batch_chunks", "CHUNK_SIZES", "MIN_GAIN", "ROUNDS"]

CHUNK_SIZES = (8, 4, 2)  # images per chunk tried (those dividing the batch; 16 gained 3% on ResNet-50)
MIN_GAIN = 0.97  # chunks are kept only when a forward takes at most this share of the whole batch's
ROUNDS = 2  # timed forwards of each size (each warmed up by its dense-form trials first)

# Modules and graph operations that compute each image from that image alone.
_PER_SAMPLE_MODULES = (LoweredConv, LoweredLinear, LoweredMaxPool2d, LoweredConvMaxPool, LoweredLayerNorm,
                       nn.Identity, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Dropout,
                       nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
_PER_SAMPLE_FUNCTIONS = {operator.add, operator.iadd, operator.mul, operator.imul, torch.add, torch.mul, torch.relu,
                         F.relu, F.relu6, F.gelu, F.silu, torch.sigmoid, torch.tanh, F.hardswish}
_PER_SAMPLE_METHODS = {"add", "add_", "mul", "mul_", "relu", "relu_", "sigmoid", "tanh"}


def per_sample(module: nn.Module) -> bool:
    """Whether ``module`` provably computes each image of its input from that image alone: a per-sample leaf
    (lowered layers, activations, pools, dropout in eval), an nn.Sequential of such, or an fx.GraphModule whose
    nodes call only such modules and element-wise additions, products and activations. Anything else (any other
    module type, a view or reshape, a reduction) is not known to be, and is False."""
    if type(module) in (nn.Sequential, ChunkedSequential):
        return all(per_sample(child) for child in module)
    if isinstance(module, fx.GraphModule):
        modules = dict(module.named_modules())
        return all(_per_sample_node(node, modules) for node in module.graph.nodes)
    return isinstance(module, _PER_SAMPLE_MODULES) and not (
        isinstance(module, nn.Dropout) and module.training)


def _per_sample_node(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op in ("placeholder", "output", "get_attr"):
        return True
    if node.op == "call_module":
        return per_sample(modules[node.target])
    if node.op == "call_function":
        return node.target in _PER_SAMPLE_FUNCTIONS
    return node.op == "call_method" and node.target in _PER_SAMPLE_METHODS


class ChunkedSequential(nn.Sequential):
    """An nn.Sequential that runs an input shape's batch in chunks of ``chunk_sizes[shape]`` images, once
    ``choose_batch_chunks`` measured that faster (module docstring). ``_seen``: the last eager input's shape."""

    chunk_sizes: dict
    _seen: torch.Size | None = None

    @classmethod
    def convert(cls, sequence: nn.Sequential) -> ChunkedSequential:
        """Make ``sequence`` (an nn.Sequential) a ChunkedSequential in place, with nothing measured yet."""
        sequence.__class__ = cls
        sequence.chunk_sizes, sequence._seen = {}, None
        return sequence

    def forward(self, x):
        if type(x) is not torch.Tensor or torch.compiler.is_compiling() or x.dim() != self._batched_rank(x):
            return super().forward(x)  # (an unbatched image has no batch to split)
        self._seen = x.shape
        size = self.chunk_sizes.get(x.shape)
        if size is None or size >= x.shape[0]:
            return super().forward(x)
        parts = [super(ChunkedSequential, self).forward(part) for part in x.split(size)]
        out = result((sum(part.shape[0] for part in parts), *parts[0].shape[1:]), parts[0].dtype)
        return torch.cat(parts, out=out)

    def _batched_rank(self, x: torch.Tensor) -> int:
        """The rank of a batch of images for the stack's first convolution (x's own without one)."""
        if "_rank" not in self.__dict__:
            conv = next((m for m in self.modules() if isinstance(m, LoweredConv)), None)
            self.__dict__["_rank"] = None if conv is None else conv.dims + 2
        return self.__dict__["_rank"] or x.dim()

    def __getstate__(self):
        return {**super().__getstate__(), "machine": dense_fallback.machine()}

    def __setstate__(self, state) -> None:
        if state.pop("machine", None) != dense_fallback.machine():  # timings are this machine's
            state["chunk_sizes"] = {}
        super().__setstate__(state)


def choose_batch_chunks(model: nn.Module, settle_trials, *args, **kwargs) -> int:
    """Measure and set the chunk size of the model's ChunkedSequentials for the shapes this input gives them, as
    their last eager call recorded (module docstring); ``settle_trials(model, *args, **kwargs)`` ends the dense-form
    trials a new chunk shape opens and returns its calls. Returns the forwards made."""
    stacks = [m for m in model.modules() if isinstance(m, ChunkedSequential)]
    if not stacks:
        return 0
    calls = 0
    with torch.no_grad():
        if any(stack._seen is None for stack in stacks):
            model(*args, **kwargs)  # (records each stack's input shape)
            calls = 1
        pending = [(stack, stack._seen) for stack in stacks
                   if stack._seen is not None and stack._seen not in stack.chunk_sizes]
        if not pending:
            return calls
        batch = min(shape[0] for _, shape in pending)
        options = [None] + [size for size in CHUNK_SIZES if size < batch and batch % size == 0]
        if len(options) == 1:  # (too few images to chunk)
            _set(pending, None)
            return calls
        times: dict = {size: [] for size in options}
        for size in options:  # each size's shapes decided first: a trial running both paths would skew it
            _set(pending, size)
            calls += settle_trials(model, *args, **kwargs)
        for _ in range(ROUNDS):
            for size in options:
                _set(pending, size)
                times[size].append(_forward_seconds(model, *args, **kwargs))
                calls += 1
        medians = {size: statistics.median(seconds) for size, seconds in times.items()}
        best = min(options, key=medians.__getitem__)
        _set(pending, best if medians[best] <= MIN_GAIN * medians[None] else None)
    return calls


def _set(pending: list, size: int | None) -> None:
    for stack, shape in pending:
        stack.chunk_sizes[shape] = size


def _forward_seconds(model: nn.Module, *args, **kwargs) -> float:
    start = time.perf_counter()
    model(*args, **kwargs)
    return time.perf_counter() - start
