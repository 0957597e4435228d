"""The torch side of the compiled kernels: ``torch.ops.srigl_compile.condensed_linear`` and ``..._cols``.

Operators with fake (meta) implementations, so eager mode, ``torch.fx.symbolic_trace``, ``torch.export`` and
``torch.compile(fullgraph=True)`` all see one opaque node. The compiled functions live in a process-wide registry
keyed by the kernel's shape key; importing this module does not import TVM.

    condensed_linear(x [..., n_in], values, indices, bias, kernel, col_threshold) -> [..., n_out]
        batches below col_threshold run the row kernel on x as is; larger ones are transposed (and padded to a
        multiple of the lane count) for the col kernel, and transposed back.
    condensed_linear_cols(xt [n_in, M], values, indices, bias, kernel) -> [n_out, M]
        the col kernel on operands already laid out [features, positions] (convolutions' im2col columns).
"""

from __future__ import annotations

import torch

from ..errors import DeviceError, LoweringError

__all__ = ["register_kernel", "registered", "condensed_linear", "condensed_linear_cols", "LANES"]

LANES = 16  # must match rules.LANES (kept here so that this module never imports TVM)
_REGISTRY: dict[str, object] = {}


def register_kernel(key: str, kernel) -> None:
    _REGISTRY[key] = kernel


def registered(key: str) -> bool:
    return key in _REGISTRY


def _kernel(key: str):
    try:
        return _REGISTRY[key]
    except KeyError:
        raise LoweringError(
            f"compiled kernel {key!r} is not loaded in this process: load the model with "
            "srigl_compile.load_lowered(path), or lower it again"
        ) from None


def _check_input(x: torch.Tensor, n_in: int) -> None:
    if x.device.type != "cpu":
        raise DeviceError(f"this layer was lowered for the CPU (target='llvm') but got a tensor on {x.device}; "
                          "move the input to the CPU or lower with another target")
    if x.dtype != torch.float32:
        raise DeviceError(f"the lowered kernels take float32 inputs, got {x.dtype}; call .float() on the input")
    if x.shape[-1] != n_in:
        raise ValueError(f"expected {n_in} input features, got input of shape {tuple(x.shape)}")


def _run_cols(xt: torch.Tensor, values, indices, bias, kernel: str) -> torch.Tensor:
    """xt [n_in, M] -> [n_out, M] through the col kernel, padding M to whole lane blocks."""
    n_in, m = xt.shape
    blocks = -(-m // LANES)
    padded = xt.new_zeros(n_in, blocks * LANES)
    padded[:, :m].copy_(xt)
    out = xt.new_empty(values.shape[0], blocks, LANES)
    _kernel(kernel).col(padded.view(n_in, blocks, LANES), values, indices, bias, out)
    return out.view(values.shape[0], blocks * LANES)[:, :m]


# Defined with the low-level Library API: a torch.library.custom_op wrapper costs ~35 us a call (autograd and
# dynamo-disable layers), this ~7 us, which matters for a 50 us batch-1 kernel.
_LIB = torch.library.Library("srigl_compile", "DEF")
_LIB.define("condensed_linear(Tensor x, Tensor values, Tensor indices, Tensor bias, str kernel, int col_threshold)"
            " -> Tensor")
_LIB.define("condensed_linear_cols(Tensor xt, Tensor values, Tensor indices, Tensor bias, str kernel) -> Tensor")


def condensed_linear(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor,
                     kernel: str, col_threshold: int) -> torch.Tensor:
    compiled = _kernel(kernel)
    n_in = compiled.spec.n_in
    _check_input(x, n_in)
    rows = x if x.dim() == 2 else x.reshape(-1, n_in)
    m, n_out = rows.shape[0], values.shape[0]
    if m == 0:
        return x.new_empty(*x.shape[:-1], n_out)
    if m < col_threshold:
        out = x.new_empty(m, n_out)
        compiled.row(rows.contiguous(), values, indices, bias, out)
        return out if x.dim() == 2 else out.reshape(*x.shape[:-1], n_out)
    else:
        out = _run_cols(rows.t(), values, indices, bias, kernel).t().contiguous()
    return out.reshape(*x.shape[:-1], n_out)


@torch.library.register_fake("srigl_compile::condensed_linear", lib=_LIB)
def _condensed_linear_fake(x, values, indices, bias, kernel, col_threshold):
    return x.new_empty(*x.shape[:-1], values.shape[0])


def condensed_linear_cols(xt: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor,
                          kernel: str) -> torch.Tensor:
    _check_input(xt.t(), _kernel(kernel).spec.n_in)
    if xt.shape[1] == 0:
        return xt.new_empty(values.shape[0], 0)
    return _run_cols(xt, values, indices, bias, kernel).contiguous()


@torch.library.register_fake("srigl_compile::condensed_linear_cols", lib=_LIB)
def _condensed_linear_cols_fake(xt, values, indices, bias, kernel):
    return xt.new_empty(values.shape[0], xt.shape[1])


_LIB.impl("condensed_linear", condensed_linear, "CPU")
_LIB.impl("condensed_linear_cols", condensed_linear_cols, "CPU")
