"""lower(): condense if needed, then replace condensed layers by TVM-compiled kernels.

Contract.
    requires: the model has sparse (masked) or condensed layers; the target is supported.
    ensures:  every CondensedLinear / CondensedConv is a LoweredLinear / LoweredConv whose kernel is compiled and
              registered in this process (CPU kernels for llvm, fatbins for cuda); full-width layers with at most
              a quarter of their neurons ablated compute those neurons as zero-weight rows instead of scattering;
              outputs equal the condensed (= masked) model's up to float rounding (up to the dtype's rounding for
              float16 / bfloat16).
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import torch
import torch.nn as nn

from ..errors import LayerError
from ..nn.condensed import CondensedConv, CondensedLinear
from ..nn.lowered import LoweredConv, LoweredLinear, kernel_spec, make_lowered_, pointwise_unpadded
from ..nn.masked import is_masked
from ..runtime.conv_geometry import exact_tile
from . import fold_batchnorm as batchnorm_folding
from .condense import condense

__all__ = ["lower"]

log = logging.getLogger(__name__)


def lower(model: nn.Module, target="llvm", *, example_inputs=None, tune: bool = False, cache_dir=None,
          col_threshold: int | None = None, progress: bool = True, dtype: torch.dtype = torch.float32,
          fold_batchnorm: bool = True) -> nn.Module:
    """Return ``model`` (in eval mode, parameters frozen: inference only) with its sparse layers running
    TVM-compiled condensed kernels.

    Args:
        model: a model from ``sparsify`` (+ training) or from ``condense``; it is not modified.
        target: "llvm" (host CPU, detected and named), "cuda" (NVIDIA GPUs: the kernels are compiled to fatbins
            with nvcc here, so no GPU is needed to lower; on a machine with CUDA the model is moved to the GPU,
            elsewhere save it with ``save_lowered`` and load it on the GPU machine), "cuda:sm_90" (one arch), a
            TVM target dict such as ``{"kind": "llvm", "mcpu": "znver3", "num-cores": 2}`` or ``{"kind": "cuda",
            "arch": "sm_90"}``, or a backend's frozen config (``codegen.backends.LlvmConfig(tune=True)``,
            ``CudaConfig(dtype=torch.float16)``), which then holds every option below but ``example_inputs`` and
            ``fold_batchnorm``.
        dtype: the lowered model's float dtype: float32, or for "cuda" also float16 / bfloat16 (the kernels sum
            in float32). The whole model is converted to it, whatever its dtype was (a float64 or float16 model
            lowered for "llvm" becomes float32).
        example_inputs: as for ``sparsify``, when the graph must be captured with torch.export.
        tune: (llvm only) search schedule variants per layer shape (records kept under ``cache_dir``, default
            ``~/.cache/srigl_compile/tuning``, so a shape is tuned once); False uses tuned records if present,
            else default schedules.
        col_threshold: force the large-batch kernel for batches (rows of the flattened input) from this size on;
            None leaves it to each kernel's dispatch (llvm: the measured crossover,
            ``runtime.llvm_linear.DEFAULT_COL_THRESHOLD``; cuda: the layer's decode / col / dense regimes,
            ``runtime.cuda_params.CudaDispatch``).
        progress: show a progress bar while tuning.
        fold_batchnorm: fold each BatchNorm that directly follows a condensed (or dense) Linear/Conv into that
            layer's weights and bias and replace it by nn.Identity (``passes/fold_batchnorm.py`` says which fold).
            The lowered model runs in eval mode, where a BatchNorm applies its running statistics, so the fold is
            exact up to float rounding; False keeps the BatchNorms. (Parametrized tensors, such as a weight-normed
            convolution's, are likewise stored as the plain tensors they evaluate to.)

    Raises:
        UnsupportedTargetError: an unknown target (the message lists the supported ones).
        LayerError: nothing to lower (no sparse layers, or the model is lowered already).
        LoweringError: TVM is not installed, or (cuda) nvcc is missing or the dtype is not supported. (Calling
            the lowered model on an input autograd tracks raises InferenceOnlyError, a LoweringError.)

    Example:
        >>> fast = lower(trained_sparse_model, target="llvm")       # doctest: +SKIP
        >>> fast(x)                                                 # doctest: +SKIP
    """
    from ..codegen.target import lowering_config

    if not isinstance(model, nn.Module):
        raise TypeError(f"lower expects an nn.Module (a model from sparsify, or condense), not {type(model).__name__}")
    backend, config = lowering_config(target, tune=tune, cache_dir=cache_dir, col_threshold=col_threshold,
                                      progress=progress, dtype=dtype)
    if any(is_masked(m) for m in model.modules()):
        model = condense(model, example_inputs=example_inputs)
    else:
        model = copy.deepcopy(model)
    _bake_parametrizations(model)
    if fold_batchnorm:  # eval semantics (the model is returned in eval mode): running statistics fold exactly
        batchnorm_folding.fold_batchnorm(model, example_inputs=example_inputs, inplace=True)
    layers = [(name, m) for name, m in model.named_modules() if type(m) in (CondensedLinear, CondensedConv)]
    if not layers:
        lowered = [name or type(m).__name__ for name, m in model.named_modules()
                   if isinstance(m, (LoweredLinear, LoweredConv))]
        if lowered:
            raise LayerError(f"the model is already lowered (layers {lowered[:5]} run compiled kernels): use it as "
                             "it is, or lower the sparse model it came from")
        raise LayerError("the model has no sparse or condensed layers to lower: sparsify (and train) it first")

    for _, layer in layers:
        layer.pad_ablated_rows_()  # full-width layers with few ablated neurons: no scatter after the kernel
    if any(t.is_floating_point() and t.dtype != config.dtype for t in (*model.parameters(), *model.buffers())):
        log.info("converting the model to %s (the kernels' dtype)", config.dtype)
        model = model.to(config.dtype)  # floating tensors only: the index buffers keep their integer types
    tiles = _exact_tiles(model, layers, example_inputs) if backend.conv_route == "direct" else {}
    for name, layer in layers:
        spec = kernel_spec(layer, backend.conv_route, backend.spec_dtype(config))
        if spec is not None and id(layer) in tiles:
            spec = dataclasses.replace(spec, lanes=tiles[id(layer)])
        handle = backend.build(spec, config) if spec is not None else None  # (no active neuron: no kernel)
        make_lowered_(layer, handle, backend.conv_route, config.col_threshold or 0, name)
        log.info("lowered %s -> %s", name, layer.kernel_key)
    # Inference only: the kernels have no backward, dropout must be off, and dense parameters need no gradients
    # (a lowered layer refuses an input autograd tracks, InferenceOnlyError).
    return backend.place(model).eval().requires_grad_(False)


def _bake_parametrizations(model: nn.Module) -> None:
    """Store each parametrized tensor (weight norm, ...) as the plain tensor it evaluates to: the lowered model is
    inference-only, so this is exact, saves recomputing it every forward, and lets ``save_lowered`` pickle the
    model (torch refuses to pickle parametrized modules)."""
    from torch.nn.utils import parametrize

    for module in [m for m in model.modules() if parametrize.is_parametrized(m)]:
        # A deep copy shares its original's generated Parametrized* class, and removal deletes the tensor's
        # property from that class, which would break the caller's model: give the copy a class of its own.
        cls = type(module)
        module.__class__ = type(cls.__name__, cls.__bases__,
                                {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")})
        for name in list(module.parametrizations):
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)
        # weight_norm's hook mapping old weight_g / weight_v checkpoints onto the parametrization: moot now, and
        # a local function, which pickling (save_lowered) rejects.
        hooks = module._load_state_dict_pre_hooks
        for key in [k for k, h in hooks.items()
                    if getattr(getattr(h, "hook", None), "__module__", "") == "torch.nn.utils.parametrizations"]:
            del hooks[key]


def _exact_tiles(model: nn.Module, layers, example_inputs) -> dict[int, int]:
    """id(layer) -> a tile width dividing the output grid, for unpadded 1x1 convolutions, from the output sizes on
    ``example_inputs`` (shapes only: the forward runs on fake tensors). Empty without example inputs, or when the
    fake forward fails (the layers then use their default tiles: correct, with a padded tail)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._pytree import tree_map

    from .graph_capture import example_args

    pointwise = [m for _, m in layers if isinstance(m, CondensedConv) and pointwise_unpadded(m)]
    if example_inputs is None or not pointwise:
        return {}
    positions: dict[int, int] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out: positions.__setitem__(id(mod), out.shape[2:].numel()))
             for m in pointwise]
    try:
        args, kwargs = example_args(example_inputs)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
            fake = lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t  # noqa: E731
            model.eval()(*tree_map(fake, args), **tree_map(fake, kwargs))
    except Exception as err:  # an op without a fake implementation: an optimisation is lost, nothing else
        log.info("no output sizes for the 1x1 convolutions' tiles (%s): default tiles", err)
        return {}
    finally:
        for hook in hooks:
            hook.remove()
    return {key: lanes for key, size in positions.items() if (lanes := exact_tile(size))}
