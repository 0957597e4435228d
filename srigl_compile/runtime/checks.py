"""Typed errors and input checks shared by the kernel operators and handles (each names the fix).

Example:
    >>> check_cpu_float32(torch.zeros(2, 3), "o4_i3_k1_int16_b@...")   # float32 on the CPU: fine
"""

from __future__ import annotations

import functools
import sys

import torch

from ..errors import DeviceError, InferenceOnlyError, LoweringError

__all__ = ["KernelDeviceError", "KernelDtypeError", "KernelShapeError", "check_cpu_float32", "check_runs_here",
           "check_no_grad", "check_cpu_operands", "check_bias", "check_residual", "check_residual_shape",
           "broadcasts_to", "check_batch_input", "in_onnx_export", "refuse_onnx_export", "register_fake"]


class KernelDeviceError(DeviceError, ValueError):
    """The input is not on the device the kernel runs on (the llvm kernels: the host CPU)."""


class KernelDtypeError(DeviceError, TypeError):
    """The input's dtype is not the kernel's."""


class KernelShapeError(LoweringError, ValueError):
    """The input's shape does not fit the layer (features, channels, dimensions); lowered layers add their name."""


def check_cpu_float32(x: torch.Tensor, key: str) -> None:
    """The CPU kernels' input check: a float32 tensor on the CPU, else a typed error naming the fix."""
    if not x.is_cpu:  # (x.device.type costs 0.4 us; this path is per call)
        raise KernelDeviceError(f"kernel {key} runs on the CPU but got a tensor on {x.device}; move the "
                                "input (and the layer) to the CPU with .cpu()")
    if x.dtype != torch.float32:
        raise KernelDtypeError(f"kernel {key} takes float32 inputs, got {x.dtype}; call .float() on it")


def check_runs_here(handle) -> None:
    """Kernels compiled for a CPU with instructions this one lacks would kill the process (SIGILL): refuse."""
    if handle.missing_features:
        mcpu = handle.target.get("mcpu")
        raise KernelDeviceError(
            f"kernel {handle.key} was compiled for {mcpu}, whose instructions {list(handle.missing_features)} this "
            f"CPU lacks: running it would crash the process. Lower for this machine (target='llvm'), or run the "
            f"model on a {mcpu} machine.")


def check_no_grad(x: torch.Tensor, key: str) -> None:
    """The kernels have no backward: an input that autograd tracks would otherwise leave every parameter upstream
    of the layer without a gradient, silently."""
    if x.requires_grad and torch.is_grad_enabled():
        raise InferenceOnlyError(
            f"kernel {key} got an input that requires grad: lowered layers run inference only (no backward). "
            "Call the model under torch.no_grad() or torch.inference_mode(), or train the sparse model from "
            "sparsify() and lower it afterwards.")


def check_cpu_operands(values: torch.Tensor, bias: torch.Tensor | None, handle) -> None:
    """A lowered model converted after lowering (``.half()``, ``.double()``) no longer matches its CPU kernels,
    which take float32 biases and values of the kernel's value dtype (float32, or bfloat16)."""
    for tensor, dtype in ((values, handle.spec.value_dtype), (bias, torch.float32)):
        if tensor is not None and tensor.dtype != dtype:
            raise KernelDtypeError(f"kernel {handle.key} takes {dtype} but the layer holds {tensor.dtype}: a "
                                   "lowered model keeps the dtypes lower() gave it; convert the sparse model and "
                                   "lower it again")


def check_bias(handle, bias) -> None:
    """The op got a bias exactly when its kernel was built with one."""
    if (bias is not None) != handle.has_bias:
        raise ValueError(f"kernel {handle.key} was built with has_bias={handle.has_bias}, got bias="
                         f"{'a tensor' if bias is not None else 'None'}")


def check_residual(handle, residual) -> None:
    """The op got a residual exactly when its kernel was built with an "add" epilogue."""
    if (residual is not None) != handle.spec.has_residual:
        raise ValueError(f"kernel {handle.key} was built with epilogue {handle.spec.epilogue!r}, got residual="
                         f"{'a tensor' if residual is not None else 'None'}")


def broadcasts_to(shape, out_shape: tuple) -> bool | None:
    """Whether a tensor of ``shape`` broadcasts to ``out_shape`` as it is (False: only to a larger shape, which
    ``out_shape`` would broadcast up to as well; None: the two do not broadcast at all)."""
    if tuple(shape) == out_shape:  # (torch.broadcast_shapes costs ~80 us: compare first, the usual case)
        return True
    try:
        return tuple(torch.broadcast_shapes(shape, out_shape)) == out_shape
    except RuntimeError:
        return None


def check_residual_shape(residual: torch.Tensor, out_shape: tuple, layer: str) -> None:
    """A fused residual must broadcast to the layer's output (the kernel adds it to each output element once)."""
    if not broadcasts_to(residual.shape, out_shape):
        raise KernelShapeError(f"a fused residual of shape {tuple(residual.shape)} does not broadcast to the "
                               f"{layer}'s output {out_shape}")


def check_batch_input(x: torch.Tensor, handle) -> None:
    if x.dim() == 0 or x.shape[-1] != handle.n_in:
        raise KernelShapeError(f"expects {handle.n_in} input features, got an input of shape {tuple(x.shape)} "
                               f"(kernel {handle.key})")


def in_onnx_export() -> bool:
    """Whether ``torch.onnx.export`` is tracing (without importing torch.onnx, which nothing else needs)."""
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and onnx.is_in_onnx_export()


def refuse_onnx_export(what: str) -> None:
    """Under ``torch.onnx.export``: ONNX has no operator for a compiled kernel, and its own error named neither."""
    if in_onnx_export():
        raise LoweringError(f"torch.onnx.export met {what}, which ONNX cannot hold: export the sparse model (from "
                            "sparsify or prune) to ONNX, or keep the lowered model in torch (torch.export and "
                            "torch.compile keep its kernels; save_lowered saves it)")


def register_fake(op: str, lib):
    """``torch.library.register_fake`` for the library's operators, whose fakes also refuse ``torch.onnx.export``
    (its default exporter traces with them)."""
    def register(fake):
        @functools.wraps(fake)
        def refusing_onnx(*args, **kwargs):
            refuse_onnx_export(f"{op.split('::')[-1]}, a compiled kernel of a lowered model")
            return fake(*args, **kwargs)
        return torch.library.register_fake(op, refusing_onnx, lib=lib)
    return register
