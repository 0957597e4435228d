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
import logging

import torch
import torch.nn as nn

from ..errors import LayerError, LoweringError
from ..nn.condensed import CondensedConv, CondensedLinear
from ..nn.masked import is_masked
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
            elsewhere save it with ``save_lowered`` and load it on the GPU machine), or a TVM target dict such as
            ``{"kind": "llvm", "mcpu": "znver3", "num-cores": 2}`` or ``{"kind": "cuda", "arch": "sm_90"}``.
        dtype: the lowered model's float dtype: float32, or for "cuda" also float16 / bfloat16 (the kernels sum
            in float32). The whole model is converted to it, whatever its dtype was (a float64 or float16 model
            lowered for "llvm" becomes float32).
        example_inputs: as for ``sparsify``, when the graph must be captured with torch.export.
        tune: (llvm only) search schedule variants per layer shape (records kept under ``cache_dir``, default
            ``~/.cache/srigl_compile/tuning``, so a shape is tuned once); False uses tuned records if present,
            else default schedules.
        col_threshold: batches (rows of the flattened input) from this size on use the large-batch kernel
            (default, llvm: the measured crossover, ``kernel_op.DEFAULT_COL_THRESHOLD``; cuda: each layer's own
            dispatch between its decode, col and dense regimes, ``codegen.cuda_records.CudaDispatch``).
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
    from ..codegen.target import resolve_target

    if not isinstance(model, nn.Module):
        raise TypeError(f"lower expects an nn.Module (a model from sparsify, or condense), not {type(model).__name__}")
    target_dict = resolve_target(target)
    dtype_name = str(dtype).removeprefix("torch.")
    if dtype_name not in SUPPORTED_DTYPES[target_dict["kind"]]:
        raise LoweringError(f"target {target_dict['kind']!r} lowers to dtypes {SUPPORTED_DTYPES[target_dict['kind']]}, "
                            f"not {dtype_name}")
    if tune and target_dict["kind"] == "cuda":
        raise LoweringError("tune=True is not available for target 'cuda': CUDA variants must be timed on a GPU, "
                            "so lower with tune=False (the default schedules)")
    if any(is_masked(m) for m in model.modules()):
        model = condense(model, example_inputs=example_inputs)
    else:
        model = copy.deepcopy(model)
    _bake_parametrizations(model)
    if fold_batchnorm:  # eval semantics (the model is returned in eval mode): running statistics fold exactly
        batchnorm_folding.fold_batchnorm(model, example_inputs=example_inputs, inplace=True)
    layers = [(name, m) for name, m in model.named_modules() if type(m) in (CondensedLinear, CondensedConv)]
    from ..nn.lowered import LoweredConv, LoweredLinear, fill_ablated_rows_

    if not layers:
        lowered = [name or type(m).__name__ for name, m in model.named_modules()
                   if isinstance(m, (LoweredLinear, LoweredConv))]
        if lowered:
            raise LayerError(f"the model is already lowered (layers {lowered[:5]} run compiled kernels): use it as "
                             "it is, or lower the sparse model it came from")
        raise LayerError("the model has no sparse or condensed layers to lower: sparsify (and train) it first")

    for _, layer in layers:
        fill_ablated_rows_(layer)  # full-width layers with few ablated neurons: no scatter after the kernel
    if any(t.is_floating_point() and t.dtype != dtype for t in (*model.parameters(), *model.buffers())):
        log.info("converting the model to %s (the kernels' dtype)", dtype)
        model = model.to(dtype)  # floating tensors only: the index buffers keep their integer types
    if target_dict["kind"] == "cuda":
        _compile_layers(layers, *_cuda_builder(target_dict, dtype_name, cache_dir, col_threshold), direct=False)
        model = model.cuda() if torch.cuda.is_available() else model
    else:
        tiles = _exact_tiles(model, layers, example_inputs)
        _compile_layers(layers, *_llvm_builder(target_dict, tune, cache_dir, col_threshold, progress, tiles),
                        direct=True)
    # Inference only: the kernels have no backward, dropout must be off, and dense parameters need no gradients
    # (a lowered layer refuses an input autograd tracks, InferenceOnlyError).
    return model.eval().requires_grad_(False)


SUPPORTED_DTYPES = {"llvm": ("float32",), "cuda": ("float32", "float16", "bfloat16")}


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


def _kernel_shapes(layers, direct: bool):
    """(name, layer, kernel shape or None) per layer; a layer with no active neuron needs no kernel. ``direct``:
    convolutions run the direct kernel (their width and columns are those of ``kernel_operands(layer, True)``)."""
    from ..nn.lowered import kernel_operands

    for name, layer in layers:
        if not layer.n_active:
            yield name, layer, None
            continue
        width, values, indices = kernel_operands(layer, direct)
        yield name, layer, (layer.n_active, width, values.shape[1], str(indices.dtype).removeprefix("torch."),
                            layer.bias is not None)


def _compile_layers(layers, build, threshold: int, direct: bool) -> None:
    """Compile each layer's kernel with ``build(*shape)`` and turn the layer into its lowered class."""
    from ..nn.lowered import make_lowered_

    for name, layer, shape in list(_kernel_shapes(layers, direct)):
        make_lowered_(layer, shape and build(layer, *shape), threshold, name)
        log.info("lowered %s -> %s", name, layer.kernel_key)


def _exact_tiles(model: nn.Module, layers, example_inputs) -> dict[int, int]:
    """id(layer) -> a tile width dividing the output grid, for unpadded 1x1 convolutions, from the output sizes on
    ``example_inputs`` (shapes only: the forward runs on fake tensors). Empty without example inputs, or when the
    fake forward fails (the layers then use their default tiles: correct, with a padded tail)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._pytree import tree_map

    from ..codegen.conv_geometry import exact_tile
    from ..nn.lowered import pointwise_unpadded
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


def _llvm_builder(target_dict, tune, cache_dir, col_threshold, progress, tiles: dict[int, int]):
    from ..codegen.conv_op import build_condensed_conv
    from ..codegen.kernel_op import DEFAULT_COL_THRESHOLD, build_condensed_linear

    def build(layer, *shape):
        options = dict(tune=tune, cache_dir=cache_dir, progress=tune and progress)
        if isinstance(layer, CondensedConv):
            return build_condensed_conv(*shape, target_dict, lanes=tiles.get(id(layer)), **options)
        return build_condensed_linear(*shape, target_dict, **options)

    return build, DEFAULT_COL_THRESHOLD if col_threshold is None else col_threshold


def _cuda_builder(target_dict, dtype_name, cache_dir, col_threshold):
    from ..codegen.cuda_build import DEFAULT_CUDA_COL_THRESHOLD, build_cuda_condensed_linear

    def build(layer, *shape):  # convolutions run im2col on CUDA
        return build_cuda_condensed_linear(*shape, dtype_name, target_dict, cache_dir=cache_dir)

    return build, DEFAULT_CUDA_COL_THRESHOLD if col_threshold is None else col_threshold
