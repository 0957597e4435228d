"""lower(): condense if needed, then replace condensed layers by TVM-compiled kernels.

A pipeline of passes on a deep copy, sharing one graph capture and one shape analysis (``passes/analysis.py``):
CondensePass (masked models; shrinks ablated neurons) -> BakeParametrizationsPass -> DenseConvolutionsPass (llvm
with dense forms) -> FoldBatchNormPass (unless ``fold_batchnorm=False``) -> PadAblatedRowsPass -> FuseEpiloguePass
(unless ``fuse_epilogues=False``) -> FuseProjectionsPass -> CastPass -> CompileKernelsPass -> LowerMaxPoolPass ->
LowerGlobalAvgPoolPass -> PlanarLayoutPass -> FuseConvPoolPass -> LowerLayerNormPass -> LowerAttentionPass ->
BatchChunksPass (llvm).

Contract.
    requires: the model has sparse (masked) or condensed layers; the target is supported.
    ensures:  every CondensedLinear / CondensedConv is a LoweredLinear / LoweredConv whose kernel is compiled and
              registered in this process (CPU kernels for llvm, fatbins for cuda); full-width layers with at most
              a quarter of their neurons ablated compute those neurons as zero-weight rows instead of scattering;
              outputs equal the condensed (= masked) model's up to float rounding (up to the dtype's rounding for
              float16 / bfloat16); the self-attention of torch transformer layers computes q, k and v with one
              stacked layer (``passes/fuse_projections.py``); on llvm, nn.MaxPool2d layers (floor mode, no
              indices) and nn.AdaptiveAvgPool2d(1) layers of a model with a direct convolution run the pooling
              kernels of its library, and nn.LayerNorm layers over the last dimension of a model with a Linear
              layer the layer-norm kernel of its library (``passes/lower_glue.py``); on llvm, a direct
              convolution whose output only direct convolutions and global average pools read returns it as
              planar images, one only max-pools read as its uncropped output grid (strided views,
              ``passes/planar_layout.py``), and one only a max-pool reads runs with it, band by band
              (``passes/fuse_conv_pool.py``: the pool's place holds both, the convolution's an nn.Identity reading
              as the convolution); on llvm with dense forms (the default), dense nn.Conv2d layers (one group,
              zero padding) are lowered too, as layers of full fan-in that run their dense form wherever it
              measures faster (``passes/dense_convolutions.py``); on llvm, per-sample nn.Sequential stacks of
              lowered convolutions may run a batch in chunks of images once ``settle`` measured that faster
              (``passes/batch_chunks.py``).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging

import torch
import torch.nn as nn

from .._warnings import warn_user
from ..errors import CheckpointError, LayerError
from ..nn.condensed import CondensedConv, CondensedLinear
from ..nn.lowered import LoweredConv, LoweredLinear, kernel_spec, make_lowered_, pointwise_unpadded
from ..nn.lowered_guards import refuse_stray_columns_on_load
from ..nn.masked import is_masked
from .analysis import GRAPH, OUTPUT_SHAPES, Analyses
from .base import Pass, PassResult
from .batch_chunks import BatchChunksPass
from .condense import CondensePass
from .dense_convolutions import DenseConvolutionsPass
from .fold_batchnorm import FoldBatchNormPass
from .fuse_conv_pool import FuseConvPoolPass
from .fuse_epilogue import FuseEpiloguePass
from .fuse_projections import FuseProjectionsPass
from .lower_glue import (
    LowerAttentionPass,
    LowerGlobalAvgPoolPass,
    LowerLayerNormPass,
    LowerMaxPoolPass,
    LowerRMSNormPass,
)
from .manager import PassManager
from .planar_layout import PlanarLayoutPass

__all__ = ["lower", "BakeParametrizationsPass", "PadAblatedRowsPass", "CastPass", "CompileKernelsPass"]

log = logging.getLogger(__name__)


def lower(model: nn.Module, target="llvm", *, example_inputs=None, tune: bool = False, cache_dir=None,
          col_threshold: int | None = None, progress: bool = True, dtype: torch.dtype = torch.float32,
          fold_batchnorm: bool = True, fuse_epilogues: bool = True) -> nn.Module:
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
            lowered for "llvm" becomes float32). On "llvm", bfloat16 condensed values with float32 activations:
            ``LlvmConfig(value_dtype=torch.bfloat16)``.
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
        fuse_epilogues: let each layer's kernel compute the ReLU, exact GELU or SiLU (and a convolution's residual
            add) after it, in an nn.Sequential, a torch transformer layer (its activation, into linear1) or where
            its parent module's forward can be traced (``passes/fuse_epilogue.py``: that parent becomes an
            fx.GraphModule with the same submodules; the model itself keeps its class); False leaves them as
            torch ops. Outputs are the same either way (bit for bit; GELU within ~1e-6: the kernels' erf).

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
    _check_lowerable(model)
    masked = any(is_masked(m) for m in model.modules())
    passes = [CondensePass()] if masked else []
    passes += [BakeParametrizationsPass()]
    if backend.kind == "llvm" and getattr(config, "dense_fallback", False):  # (the dense form: never slower)
        passes += [DenseConvolutionsPass()]
    if fold_batchnorm:  # eval semantics (the model is returned in eval mode): running statistics fold exactly
        passes += [FoldBatchNormPass()]
    passes += [PadAblatedRowsPass()]
    if fuse_epilogues:
        passes += [FuseEpiloguePass(backend.conv_route, backend.epilogues)]
    passes += [FuseProjectionsPass(), CastPass(config.dtype), CompileKernelsPass(backend, config),
               LowerMaxPoolPass(), LowerGlobalAvgPoolPass(), PlanarLayoutPass(), FuseConvPoolPass(),
               LowerLayerNormPass(), LowerRMSNormPass(), LowerAttentionPass()]
    if backend.kind == "llvm":  # (measured on CPUs only: settle chooses, whole batches until then)
        passes += [BatchChunksPass()]
    with torch.inference_mode(False):  # (tensors made in inference mode have no version counter: see _Condensed)
        lowered = PassManager(passes).run(copy.deepcopy(model), Analyses(example_inputs))
    _warn_dropped_hooks(model, lowered)
    model = lowered
    model.register_load_state_dict_pre_hook(refuse_stray_columns_on_load)  # (checked before anything is loaded)
    if callable(getattr(type(model), "save_pretrained", None)):  # (a Hugging Face model: push_to_hub saves so too)
        model.save_pretrained = functools.partial(refuse_save_pretrained, type(model).__name__)
    # Inference only: the kernels have no backward, dropout must be off, and dense parameters need no gradients
    # (a lowered layer refuses an input autograd tracks, InferenceOnlyError).
    return backend.place(model).eval().requires_grad_(False)


def refuse_save_pretrained(class_name: str, *args, **kwargs):
    """A lowered Hugging Face model's ``save_pretrained`` (an attribute of the instance, set by ``lower``): it would
    write condensed operands under names ``from_pretrained`` does not know, which then initialises those weights at
    random and returns a model that computes something else."""
    raise CheckpointError(f"a lowered {class_name} cannot be saved with save_pretrained: its layers hold condensed "
                          "values and indices, which from_pretrained would replace with random weights. Save it "
                          "with srigl_compile.save_lowered(model, path) (load_lowered reads it back), or save the "
                          "sparse model it was lowered from as plain modules (srigl_compile.unsparsify)")


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _warn_dropped_hooks(model: nn.Module, lowered: nn.Module) -> None:
    """A warning naming the modules whose forward hooks the lowered model no longer runs: replaced by lowered
    layers, or folded or fused into them (a feature extractor's hooks would fall silent)."""
    modules = dict(lowered.named_modules())
    gone = [name for name, m in model.named_modules() if _hooked(m) and not _hooked(modules.get(name, nn.Module()))]
    if gone:
        warn_user(f"lower: forward hooks on {gone[:5]}{' ...' if len(gone) > 5 else ''} do not run in the lowered "
                  "model: those modules became lowered layers, or were folded or fused into them (a BatchNorm, an "
                  "activation, a rewritten block). Register the hooks on the lowered model's modules; "
                  "fold_batchnorm=False and fuse_epilogues=False keep BatchNorms and activations as modules")


def _condensed_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if type(m) in (CondensedLinear, CondensedConv)]


def _check_lowerable(model: nn.Module) -> None:
    """A LayerError, before any work, for a model with nothing to lower."""
    if any(is_masked(m) for m in model.modules()) or _condensed_layers(model):
        return
    lowered = [name or type(m).__name__ for name, m in model.named_modules()
               if isinstance(m, (LoweredLinear, LoweredConv))]
    if lowered:
        raise LayerError(f"the model is already lowered (layers {lowered[:5]} run compiled kernels): use it as "
                         "it is, or lower the sparse model it came from")
    raise LayerError("the model has no sparse or condensed layers to lower: sparsify (and train) it first")


class BakeParametrizationsPass(Pass):
    """Store each parametrized tensor (weight norm, ...) as the plain tensor it evaluates to: the lowered model is
    inference-only, so this is exact, saves recomputing it every forward, and lets ``save_lowered`` pickle the
    model (torch refuses to pickle parametrized modules).

    ensures: no module is parametrized. Preserves nothing: the graph read the weights through the
    parametrization modules.
    """

    def call(self, model: nn.Module, analyses: Analyses) -> PassResult:
        from torch.nn.utils import parametrize

        found = [m for m in model.modules() if parametrize.is_parametrized(m)]
        for module in found:
            _bake_parametrizations(module)
        return PassResult(model, modified=bool(found))


class PadAblatedRowsPass(Pass):
    """Full-width layers with at most a quarter of their neurons ablated compute them as zero-weight rows, so no
    scatter follows the kernel (``CondensedLinear.pad_ablated_rows_``).

    preserves: GRAPH, OUTPUT_SHAPES (a layer's internal form changes, not its outputs)."""

    preserves = frozenset({GRAPH, OUTPUT_SHAPES})

    def call(self, model: nn.Module, analyses: Analyses) -> PassResult:
        padded = [layer.pad_ablated_rows_() for _, layer in _condensed_layers(model)]
        return PassResult(model, modified=any(padded))


class CastPass(Pass):
    """Convert every floating tensor of the model to the kernels' dtype (the index buffers keep their integer
    types). preserves: GRAPH, OUTPUT_SHAPES (dtypes change, not dataflow or sizes)."""

    preserves = frozenset({GRAPH, OUTPUT_SHAPES})

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def call(self, model: nn.Module, analyses: Analyses) -> PassResult:
        tensors = (*model.parameters(), *model.buffers())
        if not any(t.is_floating_point() and t.dtype != self.dtype for t in tensors):
            return PassResult(model, modified=False)
        log.info("converting the model to %s (the kernels' dtype)", self.dtype)
        return PassResult(model.to(self.dtype), modified=True)  # (Module.to works in place)


class CompileKernelsPass(Pass):
    """Compile a kernel for each condensed layer on ``backend`` and turn the layer into its lowered form.

    requires: condensed layers. ensures: each is a LoweredLinear / LoweredConv whose kernel is registered.
    A 1x1 unpadded convolution on a direct-convolution backend gets a tile width dividing its output grid, sized
    from OUTPUT_SHAPES by the backend (``conv_tile``; none without example inputs: the default tile, correct with
    a padded tail).
    """

    def __init__(self, backend, config) -> None:
        self.backend, self.config = backend, config
        self.lowered: list[str] = []

    def requires(self, model: nn.Module) -> None:
        if not _condensed_layers(model):
            masked = [f"{name} ({type(m).__name__})" for name, m in model.named_modules() if is_masked(m)]
            if masked:
                raise LayerError(f"no condensed layers to compile: the sparse layers {masked[:5]} stay masked (no "
                                 "condensed form yet, e.g. Conv3d, or a weight the forward reads itself; see the "
                                 "warnings). Run the masked model as it is; lower() has nothing to make faster")
            raise LayerError("no condensed layers left to compile (every sparse layer was removed?)")

    def call(self, model: nn.Module, analyses: Analyses) -> PassResult:
        route = self.backend.conv_route
        for name, layer in _condensed_layers(model):
            # (a dense layer made condensed for speed keeps float32 values, as dense layers left in torch do)
            dtype = None if getattr(layer, "was_dense", False) else self.backend.spec_dtype(self.config)
            spec = kernel_spec(layer, route, dtype)
            if spec is not None and route == "direct" and isinstance(layer, CondensedConv) \
                    and pointwise_unpadded(layer):
                shape = analyses.get(OUTPUT_SHAPES, model).get(name)
                if shape is not None and len(shape) > 2:  # (unknown sizes: the variant's tile, a padded tail)
                    spec = dataclasses.replace(spec, lanes=self.backend.conv_tile(spec, shape[2:].numel(),
                                                                                  self.config))
            handle = self.backend.build(spec, self.config) if spec is not None else None  # (no neuron: no kernel)
            make_lowered_(layer, handle, route, self.config.col_threshold or 0, name,
                          dense_fallback=getattr(self.config, "dense_fallback", False))
            self.lowered.append(name)
            log.info("lowered %s -> %s", name, layer.kernel_key)
        return PassResult(model, modified=bool(self.lowered))

    def ensures(self, result: PassResult) -> None:
        left = [name for name, _ in _condensed_layers(result.module)]
        if left:
            raise LayerError(f"layers {left[:5]} were not lowered")


def _bake_parametrizations(module: nn.Module) -> None:
    from torch.nn.utils import parametrize

    # A deep copy shares its original's generated Parametrized* class, and removal deletes the tensor's property
    # from that class, which would break the caller's model: give the copy a class of its own.
    cls = type(module)
    module.__class__ = type(cls.__name__, cls.__bases__,
                            {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")})
    for name in list(module.parametrizations):
        parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    # weight_norm's hook mapping old weight_g / weight_v checkpoints onto the parametrization: moot now, and a
    # local function, which pickling (save_lowered) rejects.
    hooks = module._load_state_dict_pre_hooks
    for key in [k for k, h in hooks.items()
                if getattr(getattr(h, "hook", None), "__module__", "") == "torch.nn.utils.parametrizations"]:
        del hooks[key]
