"""Tensors a condensed layer hands out or keeps: a data-less stand-in for its dense weight, normal copies of
tensors made under ``torch.inference_mode()`` (which have no version counter, and the kernels' prepared calls and
dense forms watch versions), and its operands read fast.

Example:
    >>> WeightStandIn.make((4, 8), torch.float32, torch.device("cpu")).shape
    torch.Size([4, 8])
"""

from __future__ import annotations

import torch

from ..errors import LayerError

__all__ = ["WeightStandIn", "operands", "outside_inference_mode", "version_of"]


class WeightStandIn(torch.Tensor):
    """A data-less tensor answering shape / dtype / device questions about a condensed layer's dense weight, and
    raising LayerError on anything else (not TypeError, which tensor operators turn into NotImplemented). A plain
    meta tensor would not do: ``F.linear(cpu_x, meta_w)`` returns CPU garbage."""

    _READS = frozenset({"dtype", "shape", "ndim", "dim", "size", "numel", "layout", "requires_grad",
                        "is_floating_point", "is_complex", "element_size", "is_sparse", "is_quantized", "is_meta",
                        "is_cpu", "is_cuda"})
    _cache: dict = {}

    @classmethod
    def make(cls, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> WeightStandIn:
        key = (shape, dtype, str(device))
        if key not in cls._cache:
            cls._cache[key] = torch.Tensor._make_subclass(cls, torch.empty(shape, dtype=dtype, device="meta"))
            cls._cache[key]._device = torch.device(device)
        return cls._cache[key]

    @property
    def device(self) -> torch.device:
        return self._device

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(getattr(func, "__self__", None), "__name__", None) if func.__name__ == "__get__" \
            else func.__name__
        if name in cls._READS:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        raise LayerError(f"a condensed layer keeps no dense weight: `.weight` only answers shape, dtype and device "
                        f"questions, not {name}. Use the layer itself, or its values / indices.")

    def __repr__(self) -> str:  # (printing would otherwise go through torch functions)
        return f"WeightStandIn(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"


def outside_inference_mode(value):
    """``value``, or a normal copy of it if it is a tensor made under torch.inference_mode()."""
    if not isinstance(value, torch.Tensor) or not value.is_inference():
        return value
    with torch.inference_mode(False):
        return value.clone()


def version_of(tensor: torch.Tensor) -> int | None:
    """The tensor's version counter; None for a tensor made under torch.inference_mode() (it has none)."""
    return None if tensor.is_inference() else tensor._version


def operands(layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(values, indices, bias) of a condensed layer, from its buffers (``nn.Module.__getattr__`` costs ~1 us a
    buffer, and a batch-1 call reads them all); through its attributes where a parametrization
    (``torch.nn.utils.parametrize``) took one over, moving the buffer into ``layer.parametrizations``."""
    buffers = layer._buffers
    try:
        return buffers["values"], buffers["indices"], buffers["bias"]
    except KeyError:
        return layer.values, layer.indices, layer.bias
