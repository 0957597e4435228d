"""``torch.ops.srigl_compile.tvm_condensed_linear``: a lowered layer's call into its compiled kernel.

    tvm_condensed_linear(x [..., n_in], values [n_out, k], indices [n_out, k], bias [n_out]?, kernel_key,
                         col_threshold, residual [..., n_out]?) -> [..., n_out]

The operator looks the handle up by ``kernel_key`` (``registry``), so the module keeps owning its tensors and the
graph only holds a string; the handle checks the input and picks the kernel for the batch (``launch``).
``col_threshold`` > 0 forces the large-batch kernel from that many rows; 0 leaves it to the handle. ``residual``
(exactly when the kernel was built with an "add" epilogue; anything that broadcasts to the output) is added by the
kernel as it writes the output. The operator
has a fake implementation, so ``torch.fx.symbolic_trace``, ``torch.export`` and ``torch.compile(fullgraph=True)``
keep it as one node; it passes ``torch.library.opcheck``. The kernels do no bounds checks, so indices must come
through ``handle.pack`` (which checks them).

Example:
    >>> values, indices = handle.pack(values, indices)    # once, when lowering   # doctest: +SKIP
    >>> y = condensed_linear(x, values, indices, bias, handle.key)                 # doctest: +SKIP
"""

from __future__ import annotations

import torch

from .checks import (
    check_bias,
    check_cpu_operands,
    check_no_grad,
    check_residual,
    check_residual_shape,
    register_fake,
)
from .registry import get_handle
from .spec import TORCH_INDEX

__all__ = ["condensed_linear"]


def _operands(handle, values, indices, bias):
    if values.shape[1] != handle.k_pad or indices.dtype != TORCH_INDEX[handle.index_dtype]:
        values, indices = handle.pack(values, indices)  # slow path: callers should pack once
    check_bias(handle, bias)
    tail = [bias.contiguous()] if bias is not None else []
    return [values.contiguous(), indices.contiguous(), *tail]


def _residual_rows(residual: torch.Tensor, out_shape: tuple, n_out: int) -> torch.Tensor:
    """The residual as the kernels read it: float32 [rows, n_out], contiguous (a copy only when it is not that
    already, e.g. one that broadcasts)."""
    check_residual_shape(residual, out_shape, "layer")
    return residual.to(torch.float32).expand(out_shape).contiguous().view(-1, n_out)


def _run(x, values, indices, bias, kernel_key: str, col_threshold: int,
         residual: torch.Tensor | None = None) -> torch.Tensor:
    handle = get_handle(kernel_key)
    if handle.device_type == "cpu":  # (first: a converted model explains a wrong input dtype too)
        check_cpu_operands(values, bias, handle)
    handle.check_input(x)
    check_residual(handle, residual)
    operands = _operands(handle, values, indices, bias)
    flat = x.dim() == 2  # the common case skips reshape/view (about 4 us of a ~10 us call overhead)
    rows = x if flat else x.reshape(-1, handle.n_in)
    if rows.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], handle.n_out)
    if residual is None:
        out = handle.launch(rows.contiguous(), operands, col_threshold)
    else:
        out_shape = (*x.shape[:-1], handle.n_out)
        out = handle.launch(rows.contiguous(), operands, col_threshold,
                            _residual_rows(residual, out_shape, handle.n_out))
    return out if flat else out.view(*x.shape[:-1], handle.n_out)


# Defined with the low-level Library API rather than torch.library.custom_op: the custom_op wrapper adds about
# 30 us a call (autograd and dynamo layers) to a 20-40 us batch-1 kernel, this about 7 us. FRAGMENT, not DEF: the
# namespace is shared with other srigl_compile ops. The impl is registered for every backend so that a CUDA input
# reaches _run, which raises the typed error naming the fix.
_LIB = torch.library.Library("srigl_compile", "FRAGMENT")
_LIB.define("tvm_condensed_linear(Tensor x, Tensor values, Tensor indices, Tensor? bias, str kernel_key, "
            "int col_threshold, Tensor? residual=None) -> Tensor")
_LIB.impl("tvm_condensed_linear", _run, "CompositeExplicitAutograd")


@register_fake("srigl_compile::tvm_condensed_linear", _LIB)
def _tvm_condensed_linear_fake(x, values, indices, bias, kernel_key, col_threshold, residual=None):
    return x.new_empty(*x.shape[:-1], values.shape[0])


def condensed_linear(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor | None,
                     kernel_key: str, col_threshold: int = 0, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Run the kernel registered as ``kernel_key`` (``col_threshold`` 0: the handle's own dispatch; ``residual``
    for a kernel with an "add" epilogue); plain eager tensors skip the dispatcher (about 10 us), tracers (fx
    proxies, fake/functional tensors, torch.compile) go through ``torch.ops.srigl_compile``."""
    if type(x) is torch.Tensor and not torch.compiler.is_compiling():
        check_no_grad(x, kernel_key)
        if residual is not None:
            check_no_grad(residual, kernel_key)
        return _run(x, values, indices, bias, kernel_key, col_threshold, residual)
    return torch.ops.srigl_compile.tvm_condensed_linear(x, values, indices, bias, kernel_key, col_threshold,
                                                         residual)
