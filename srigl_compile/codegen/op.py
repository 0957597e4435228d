"""The torch side of the compiled kernels: ``torch.ops.srigl_compile.condensed_linear`` and ``..._cols``.

Custom ops with fake (meta) implementations, so eager mode, ``torch.fx.symbolic_trace``, ``torch.export`` and
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


@torch.library.custom_op("srigl_compile::condensed_linear", mutates_args=())
def condensed_linear(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor,
                     kernel: str, col_threshold: int) -> torch.Tensor:
    n_in = _kernel(kernel).spec.n_in
    _check_input(x, n_in)
    rows = x.reshape(-1, n_in)
    m, n_out = rows.shape[0], values.shape[0]
    if m == 0:
        return x.new_empty(*x.shape[:-1], n_out)
    if m < col_threshold:
        out = x.new_empty(m, n_out)
        _kernel(kernel).row(rows.contiguous(), values, indices, bias, out)
    else:
        out = _run_cols(rows.t(), values, indices, bias, kernel).t().contiguous()
    return out.reshape(*x.shape[:-1], n_out)


@condensed_linear.register_fake
def _(x, values, indices, bias, kernel, col_threshold):
    return x.new_empty(*x.shape[:-1], values.shape[0])


@torch.library.custom_op("srigl_compile::condensed_linear_cols", mutates_args=())
def condensed_linear_cols(xt: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor,
                          kernel: str) -> torch.Tensor:
    _check_input(xt.t(), _kernel(kernel).spec.n_in)
    if xt.shape[1] == 0:
        return xt.new_empty(values.shape[0], 0)
    return _run_cols(xt, values, indices, bias, kernel).contiguous()


@condensed_linear_cols.register_fake
def _(xt, values, indices, bias, kernel):
    return xt.new_empty(values.shape[0], xt.shape[1])
