"""lower(): condense if needed, then replace condensed layers by TVM-compiled kernels.

Contract.
    requires: the model has sparse (masked) or condensed layers; the target is supported.
    ensures:  every CondensedLinear / CondensedConv is a LoweredLinear / LoweredConv whose kernel is compiled and
              registered in this process; outputs equal the condensed (= masked) model's up to float rounding.
"""

from __future__ import annotations

import copy
import logging

import torch.nn as nn

from ..errors import LayerError
from ..nn.condensed import CondensedConv, CondensedLinear
from ..nn.masked import is_masked
from .condense import condense

__all__ = ["lower"]

log = logging.getLogger(__name__)


def lower(model: nn.Module, target="llvm", *, example_inputs=None, tune: bool = False, cache_dir=None,
          col_threshold: int | None = None, progress: bool = True) -> nn.Module:
    """Return ``model`` (in eval mode) with its sparse layers running TVM-compiled condensed kernels.

    Args:
        model: a model from ``sparsify`` (+ training) or from ``condense``; it is not modified.
        target: "llvm" (host CPU, detected and named) or a TVM target dict such as
            ``{"kind": "llvm", "mcpu": "znver3", "num-cores": 2}``.
        example_inputs: as for ``sparsify``, when the graph must be captured with torch.export.
        tune: search schedule variants per layer shape (records kept under ``cache_dir``, default
            ``~/.cache/srigl_compile/tuning``, so a shape is tuned once); False uses tuned records if present,
            else default schedules.
        col_threshold: batches (rows of the flattened input) from this size on use the large-batch kernel
            (default: the measured crossover, ``kernel_op.DEFAULT_COL_THRESHOLD``).
        progress: show a progress bar while tuning.

    Raises:
        UnsupportedTargetError: an unknown target (the message lists the supported ones).
        LayerError: nothing to lower.
        LoweringError: TVM is not installed.

    Example:
        >>> fast = lower(trained_sparse_model, target="llvm")       # doctest: +SKIP
        >>> fast(x)                                                 # doctest: +SKIP
    """
    from ..codegen.target import resolve_target

    target_dict = resolve_target(target)
    if any(is_masked(m) for m in model.modules()):
        model = condense(model, example_inputs=example_inputs)
    else:
        model = copy.deepcopy(model)
    layers = [(name, m) for name, m in model.named_modules() if type(m) in (CondensedLinear, CondensedConv)]
    if not layers:
        raise LayerError("the model has no sparse or condensed layers to lower: sparsify (and train) it first")
    _compile_layers(layers, target_dict, tune, cache_dir, col_threshold, progress)
    return model.eval()  # inference only: the kernels have no backward, dropout must be off


def _compile_layers(layers, target_dict, tune, cache_dir, col_threshold, progress) -> None:
    from ..codegen.kernel_op import DEFAULT_COL_THRESHOLD, build_condensed_linear
    from ..nn.lowered import kernel_operands, make_lowered_

    threshold = DEFAULT_COL_THRESHOLD if col_threshold is None else col_threshold
    for name, layer in layers:
        handle = None
        if layer.n_active:
            width, values, indices = kernel_operands(layer)
            handle = build_condensed_linear(
                layer.n_active, width, values.shape[1], str(indices.dtype).removeprefix("torch."),
                layer.bias is not None, target_dict, tune=tune, cache_dir=cache_dir, progress=tune and progress)
        make_lowered_(layer, handle, threshold)
        log.info("lowered %s -> %s", name, layer.kernel_key)
