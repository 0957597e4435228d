"""AsLinearPass: layers that are nn.Linear in another form become nn.Linear, so sparsify can mask them.

Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2, GPT-J's ancestors, DistilGPT-2, CTRL, ...) computes
``x @ W + b`` with ``W`` stored [in, out]: a Linear whose weight is transposed. It is recognised by its class name
and module (transformers is not imported) and rewritten as ``nn.Linear(in, out)`` holding ``W.T``.

Contract.
    requires: nothing (a model without such layers passes through unchanged).
    ensures:  no untied Hugging Face Conv1D is left; each rewritten layer keeps its name, so state-dict keys
              stay, with the weight transposed to nn.Linear's [out, in]; the output is unchanged up to float
              rounding (the same product, summed by a different BLAS call); it records the Conv1D class as
              ``srigl_conv1d`` (``unsparsify`` rewrites it back). A Conv1D whose weight is shared with another
              module stays as it is (rewriting it would untie the weights).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
import torch.nn as nn

from ..errors import LayerError
from .analysis import Analyses
from .base import Pass, PassResult, replace_submodule
from .discover import tied_parameter_ids

__all__ = ["AsLinearPass", "is_hf_conv1d", "conv1d_restored_on_error", "as_conv1d"]

log = logging.getLogger(__name__)


def is_hf_conv1d(module: nn.Module) -> bool:
    """A ``transformers`` Conv1D: weight [nx, nf], ``forward(x) = x @ weight + bias``."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers") and hasattr(module, "nf")


@contextlib.contextmanager
def conv1d_restored_on_error(model: nn.Module, inplace: bool) -> Iterator[None]:
    """Around an in-place call that starts with AsLinearPass: should it raise, the model's Conv1D layers are put
    back, so a refused call leaves the caller's model as it was (the root alone is never rewritten in place)."""
    originals = [(name, m) for name, m in model.named_modules() if name and is_hf_conv1d(m)] if inplace else []
    try:
        yield
    except BaseException:
        for name, conv in originals:
            replace_submodule(model, name, conv)
        raise


def _as_linear(conv: nn.Module) -> nn.Linear:
    n_in, n_out = conv.weight.shape
    linear = nn.Linear(n_in, n_out, bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    linear.train(conv.training)
    linear.srigl_conv1d = type(conv)  # (what unsparsify gives back)
    return linear


class AsLinearPass(Pass):
    """Rewrite Hugging Face Conv1D layers into nn.Linear (in place, the root excepted: see ``call``)."""

    def call(self, model: nn.Module, analyses: Analyses) -> PassResult:
        shared = tied_parameter_ids(model)
        found = [(name, m) for name, m in model.named_modules() if is_hf_conv1d(m)]
        for name, conv in found:
            if id(conv.weight) in shared:
                log.warning("%s (Conv1D) shares its weight with another module: left as it is", name or "model")
                continue
            model = replace_submodule(model, name, _as_linear(conv))
        return PassResult(model, modified=bool(found))

    def ensures(self, result: PassResult) -> None:
        shared = tied_parameter_ids(result.module)
        left = [name for name, m in result.module.named_modules() if is_hf_conv1d(m) and id(m.weight) not in shared]
        if left:
            raise LayerError(f"Conv1D layers {left} were not rewritten as nn.Linear")


def as_conv1d(linear: nn.Linear) -> nn.Module:
    """The Conv1D an ``AsLinearPass`` rewrite came from (``linear.srigl_conv1d``), holding the weight transposed
    back to [in, out]."""
    conv = linear.srigl_conv1d(linear.out_features, linear.in_features)  # Conv1D(nf, nx)
    conv.to(device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.t())
        if linear.bias is None:
            conv.bias = None
        else:
            conv.bias.copy_(linear.bias)
    for name, parameter in conv.named_parameters():  # (a frozen layer stays frozen)
        parameter.requires_grad_(getattr(linear, name).requires_grad)
    conv.train(linear.training)
    return conv
