"""What a lowered layer checks and refuses before its kernel runs, each error naming the layer: columns out of the
kernel's range (and, before a lowered model's ``load_state_dict`` copies anything, in the state dict), operands on
the meta device, train mode, inputs or operands autograd tracks, torch.jit tracing and ONNX export."""

from __future__ import annotations

import torch

from ..errors import InferenceOnlyError, LayerError, LoweringError
from ..runtime.checks import KernelDeviceError, KernelDtypeError, KernelShapeError, refuse_onnx_export
from ..runtime.registry import get_handle

__all__ = ["layer_label", "with_layer_name", "check_columns", "refuse_stray_columns_on_load", "refuse_train",
           "refuse_autograd", "refuse_torchscript"]


def with_layer_name(err: KernelShapeError | KernelDtypeError, layer) -> KernelShapeError | KernelDtypeError:
    """The kernel's shape or dtype error, naming the layer (the kernel's key may serve several layers)."""
    return type(err)(f"{layer_label(layer)} {err}")


def layer_label(layer) -> str:
    """How errors name a lowered layer: "lowered LoweredConv 'layer1.0.conv2'" (``lower`` records each lowered
    layer's name)."""
    name = getattr(layer, "layer_name", "")
    return f"lowered {type(layer).__name__} {name!r}" if name else f"lowered {type(layer).__name__}"


def check_columns(layer, indices: torch.Tensor) -> None:
    """Raise LayerError unless every column ``indices`` holds is one the layer's kernel may read, in [0, n_in):
    the kernels read them unchecked, and one written from outside (``load_state_dict``, an edit in place) read
    memory past the input, or crashed the process. Checked when the indices tensor or its version is new (eager
    calls: a tuple compare each)."""
    mark = layer.__dict__.get("_columns_checked")
    if mark is not None and mark[0] is indices and mark[1] == indices._version:
        return
    if indices.is_cuda and torch.cuda.is_current_stream_capturing():
        return  # (reading the columns back would break a CUDA graph's capture: the next eager call checks them)
    if indices.is_meta:
        raise KernelDeviceError(f"{layer_label(layer)}: its operands are on the meta device (moved by .to('meta')), "
                                "which holds no values: a lowered model runs on the device lower() built it for; "
                                "lower the source model again")
    if not indices.numel():
        return  # (every neuron ablated: no kernel, no columns; its output is the scatter of its biases)
    if (stray := _stray_columns(layer, indices)) is not None:
        raise LayerError(f"{layer_label(layer)}: its indices hold {stray}: overwritten with another model's or "
                         "damaged (load_state_dict from a lowered model of the same source model, or lower the "
                         "source model again)")
    layer.__dict__["_columns_checked"] = (indices, indices._version)


def _stray_columns(layer, indices: torch.Tensor) -> str | None:
    """What is wrong with ``indices`` as the layer's columns (None: all in the kernel's [0, n_in))."""
    bound = get_handle(layer.kernel_key).spec.n_in
    low, high = int(indices.min()), int(indices.max())
    return None if 0 <= low and high < bound else f"columns in [{low}, {high}], outside the kernel's [0, {bound})"


def refuse_stray_columns_on_load(model: torch.nn.Module, state_dict: dict, prefix: str, *_) -> None:
    """``load_state_dict`` pre-hook ``lower`` puts on the lowered model: refuse a state dict holding columns outside
    a lowered layer's kernel before any tensor is copied (torch loads module by module, so a layer refusing its
    own would leave the ones loaded before it changed)."""
    for name, layer in model.named_modules():
        if getattr(layer, "kernel_key", None) is None or "indices" not in layer._buffers:
            continue  # (lowered Linear and convolution layers hold columns; norms and pools do not)
        indices = state_dict.get(f"{prefix}{name}.indices" if name else f"{prefix}indices")
        if isinstance(indices, torch.Tensor) and indices.numel() and not indices.is_meta \
                and (stray := _stray_columns(layer, indices)) is not None:
            raise LayerError(f"load_state_dict refused, nothing loaded: {layer_label(layer)}: the state dict's "
                             f"{prefix}{name}.indices hold {stray}: it is another model's or damaged; load the "
                             "state dict of a lowered model of the same source model, or lower the source model "
                             "again")


def refuse_train(layer, mode: bool):
    """``nn.Module.train`` for lowered layers: eval mode only. A lowered model computes eval semantics (BatchNorm
    folded with its running statistics, attention without dropout) and has no backward, so train mode would only
    have mixed them with the torch modules' train behaviour (dropout on)."""
    if mode:
        raise InferenceOnlyError(
            f"{layer_label(layer)} runs in eval mode only (BatchNorm folded, no backward): train() switched the "
            "modules before it to train mode; call model.eval() to undo it. To train, train the sparse model and "
            "lower it again")
    return torch.nn.Module.train(layer, False)


def refuse_autograd(layer, x: torch.Tensor, residual: torch.Tensor | None = None) -> None:
    """Under grad mode: the kernels have no backward, so an input, residual or operand of ``layer`` that autograd
    tracks (an operand set to requires_grad to fine-tune it, a replacement in ``torch.func.functional_call``)
    would get no gradient, silently."""
    named = [("its input", x), ("the residual", residual), *((f"its {n}", t) for n, t in layer._buffers.items()),
             *((f"its {n}", t) for n, t in layer._parameters.items())]
    tracked = [name for name, tensor in named if isinstance(tensor, torch.Tensor) and tensor.requires_grad]
    if tracked:
        raise InferenceOnlyError(
            f"{layer_label(layer)}: autograd tracks {', '.join(tracked)}, but lowered layers run inference only (no "
            "backward), so its gradient would stay None. Call the model under torch.no_grad() or "
            "torch.inference_mode(), or fine-tune the sparse model (sparsify, prune) and lower it again.")


def refuse_torchscript(layer) -> None:
    """torch.jit.trace of a lowered model: the kernels are TVM functions TorchScript cannot record (it failed with an
    internal assert or a raw TVM type error)."""
    refuse_onnx_export(layer_label(layer))  # (torch.onnx.export(..., dynamo=False) traces with torch.jit)
    raise LoweringError(f"{layer_label(layer)}: torch.jit cannot trace the TVM kernels; use torch.export.export or "
                        "torch.compile (both keep them), or save_lowered")
