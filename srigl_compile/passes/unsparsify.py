"""unsparsify: a sparse model back as the plain torch modules it was made of, its zeros kept.

What ``torch.nn.utils.prune.remove`` is to torch's pruning: a model to hand on (its ``state_dict`` loads into the
original architecture, a Hugging Face model's ``save_pretrained`` into ``from_pretrained``, ONNX export sees
ordinary layers), with the sparsity as exact zeros in dense weights.

Contract.
    requires: a model from ``sparsify``, ``prune`` or ``from_sparse_weights`` (masked layers), whose weights outside
              the masks are zero (the masked layers compute with any that are not, which would then be kept in a
              model said to be the one the masks describe).
    ensures:  no masked layer is left: each is of the class it had before sparsify (``nn.Linear`` / ``nn.Conv*d``
              or the user's subclass), without its ``mask`` buffer and plan; a MultiheadAttention's packed
              projections are its ``in_proj_weight`` (and ``q/k/v_proj_weight``) parameters again; a Hugging Face
              ``Conv1D`` that sparsify rewrote as ``nn.Linear`` is a ``Conv1D`` again, its weight transposed back;
              the same parameters otherwise (values, names, requires_grad), and the same outputs.
"""

from __future__ import annotations

import copy

import torch.nn as nn

from ..errors import LayerError
from ..nn.masked import MaskedLayer, MaskedMultiheadAttention, MaskedProjection
from .as_linear import as_conv1d
from .base import replace_submodule
from .condense import refuse_stray_weights
from .sparsify import sparse_layers

__all__ = ["unsparsify"]


def unsparsify(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Return ``model`` (a sparse model) with its masked layers as the plain torch modules they were made of.

    Build it after training (an SRigLUpdater on the model keeps hooks on its weights: call ``updater.close()``
    first when ``inplace``). The result computes what the sparse model computes.

    Example:
        >>> import torch, torch.nn as nn
        >>> from srigl_compile import SRigLConfig, sparsify
        >>> sparse = sparsify(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)), SRigLConfig(0.9))
        >>> plain = unsparsify(sparse)
        >>> type(plain[0]) is nn.Linear, sorted(plain.state_dict()) == sorted(nn.Sequential(
        ...     nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).state_dict())
        (True, True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"unsparsify expects an nn.Module, not {type(model).__name__}")
    layers = list(sparse_layers(model))
    if not layers:
        raise LayerError("the model has no sparse layers: unsparsify takes a model from sparsify, prune or "
                         "from_sparse_weights")
    refuse_stray_weights(layers, "unsparsify", "which unsparsify would keep")
    if not inplace:
        model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, MaskedMultiheadAttention):
            _plain_attention_(module)
        elif isinstance(module, MaskedLayer) and not isinstance(module, MaskedProjection):
            _plain_layer_(module)
            if getattr(module, "srigl_conv1d", None) is not None:
                model = replace_submodule(model, name, as_conv1d(module))
    return model


def _plain_layer_(layer: nn.Module) -> None:
    """The layer as its class before sparsify: the first base after the masked ones (a masked user subclass is
    ``Masked<User>(MaskedLinear, User)``)."""
    layer.__class__ = next(base for base in type(layer).__mro__
                           if issubclass(base, nn.Module) and not issubclass(base, MaskedLayer))
    del layer._buffers["mask"]
    del layer.srigl_plan


def _plain_attention_(attention: MaskedMultiheadAttention) -> None:
    attention.__class__ = nn.MultiheadAttention  # (first: the masked class reads the packed weights as properties)
    for param_name in MaskedMultiheadAttention.PACKED:
        child = attention._modules.pop(MaskedMultiheadAttention.child_name(param_name), None)
        if child is not None:
            attention.register_parameter(param_name, child.weight)
    if isinstance(attention.out_proj, MaskedLayer):
        _plain_layer_(attention.out_proj)
        attention.out_proj.__class__ = nn.modules.linear.NonDynamicallyQuantizableLinear  # (what torch builds)
