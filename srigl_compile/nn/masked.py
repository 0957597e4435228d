"""Masked training layers: a dense ``.weight`` (exactly zero where masked) and a boolean ``.mask`` buffer.

The masked classes subclass the layers they replace (``MaskedLinear`` is an ``nn.Linear``), and ``make_masked_``
swaps the class of an existing module in place, so parameters, hooks and attributes (and any code that checks
``isinstance(m, nn.Linear)``) are untouched. Their forward is the original one: masked weights are zero, and the
updater keeps them zero by masking gradients. ``nn.MultiheadAttention`` uses its packed ``in_proj_weight``
functionally, so that tensor moves into a ``MaskedProjection`` child and the attention module reads it back
through a property.

Example:
    >>> import torch.nn as nn
    >>> from srigl_compile.nn.masked import LayerPlan, make_masked_
    >>> lin = nn.Linear(8, 4)
    >>> plan = LayerPlan("fc", "linear", n_out=4, fan_in=8, density=0.5, budget=16, k0=4, protected=True)
    >>> layer = make_masked_(lin, plan, torch.ones(4, 8, dtype=torch.bool))
    >>> isinstance(layer, nn.Linear), layer.mask.shape
    (True, torch.Size([4, 8]))
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from ..errors import TraceError
from .sharding import local_part, part_like

__all__ = [
    "LayerPlan",
    "MaskedLayer",
    "MaskedLinear",
    "MaskedConv1d",
    "MaskedConv2d",
    "MaskedConv3d",
    "MaskedProjection",
    "MaskedMultiheadAttention",
    "make_masked_",
    "is_masked",
]


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """What sparsify decided for one layer: its neuron geometry, target density and non-zero budget.

    n_out: neurons (rows); fan_in: dense inputs per neuron (in/groups * kernel size for a conv); budget:
    floor(N * density) non-zeros; k0: constant fan-in with no neuron ablated; protected: never ablated (the
    output layer and ``SRigLConfig.no_ablation`` matches).
    """

    name: str
    kind: str
    n_out: int
    fan_in: int
    density: float
    budget: int
    k0: int
    protected: bool

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class MaskedLayer:
    """Mixin of every sparse layer: ``weight`` (the Parameter), ``mask`` (a bool buffer, weight's shape) and
    ``srigl_plan`` (a ``LayerPlan``). (No class annotations: torch.jit.script reads them as the module's attribute
    types and cannot resolve them; it compiles the layer's own forward, which the mask leaves unchanged.)"""

    __jit_unused_properties__ = ["fan_in"]  # (a LayerPlan is no TorchScript type; forward never reads it)

    def neuron_view(self, tensor: torch.Tensor) -> torch.Tensor:
        """[n_out, fan_in] form of a weight-shaped tensor, for reading: a view when the tensor is contiguous, a copy
        when it is not (a channels_last weight or gradient), so never write through it; write to the weight-shaped
        tensor with a weight-shaped mask instead."""
        return tensor.reshape(tensor.shape[0], -1)

    @property
    def fan_in(self) -> int:
        return self.srigl_plan.fan_in

    @torch.no_grad()
    def apply_mask_(self) -> None:
        """Zero the weights outside the mask (in place; this rank's part of a sharded weight)."""
        local_part(self.weight).mul_(part_like(self.mask, self.weight))

    def sparsity_repr(self) -> str:
        counts = self.neuron_view(self.mask).view(torch.uint8).sum(dim=1)
        active = int((counts > 0).sum())
        k = int(counts.max()) if active else 0
        return f"k={k}/{self.fan_in}, active_neurons={active}/{self.mask.shape[0]}"

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.sparsity_repr()}"  # the layer's own repr, then the sparsity


class MaskedLinear(MaskedLayer, nn.Linear):
    """``nn.Linear`` with a constant-fan-in mask."""


class MaskedConv1d(MaskedLayer, nn.Conv1d):
    """``nn.Conv1d`` with a mask; a neuron is an output filter, fan-in in_channels/groups * kernel size."""


class MaskedConv2d(MaskedLayer, nn.Conv2d):
    """``nn.Conv2d`` with a mask; a neuron is an output filter, fan-in in_channels/groups * kh * kw."""


class MaskedConv3d(MaskedLayer, nn.Conv3d):
    """``nn.Conv3d`` with a mask."""


class MaskedProjection(MaskedLayer, nn.Module):
    """A packed attention projection weight (``in_proj_weight`` [3d, d]) as a sparse layer of its own.

    It has no forward: ``MaskedMultiheadAttention`` passes ``.weight`` to the functional attention.
    """

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, *args, **kwargs):  # noqa: D102
        raise RuntimeError("MaskedProjection holds a weight for MultiheadAttention; it is not called directly")

    def extra_repr(self) -> str:
        return f"weight={tuple(self.weight.shape)}, {self.sparsity_repr()}"


class MaskedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose packed projection weights live in ``MaskedProjection`` children.

    ``in_proj_weight`` (and ``q/k/v_proj_weight`` when kdim/vdim differ) read through to the children, so
    ``forward`` and TransformerEncoderLayer's fast path run unchanged. ``out_proj`` is a ``MaskedLinear``.
    A state dict with the dense key ``in_proj_weight`` still loads (into ``in_proj.weight``).
    """

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for param_name in self.PACKED:
            child = self.child_name(param_name)
            if prefix + param_name in state_dict and child in self._modules:
                state_dict[f"{prefix}{child}.weight"] = state_dict.pop(prefix + param_name)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    PACKED = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")

    @staticmethod
    def child_name(param_name: str) -> str:
        return param_name.removesuffix("_weight")

    def _packed(self, param_name: str):
        child = self._modules.get(self.child_name(param_name))
        if child is not None:
            return child.weight
        return self._parameters.get(param_name)

    def __prepare_scriptable__(self):
        raise TraceError(f"torch.jit.script cannot compile {type(self).__name__}: its packed projection weights "
                         "are properties reading sparse child layers, which TorchScript does not support; use "
                         "torch.jit.trace or torch.export, or script srigl_compile.unsparsify(model)")

    in_proj_weight = property(lambda self: self._packed("in_proj_weight"))
    q_proj_weight = property(lambda self: self._packed("q_proj_weight"))
    k_proj_weight = property(lambda self: self._packed("k_proj_weight"))
    v_proj_weight = property(lambda self: self._packed("v_proj_weight"))


_MASKED_CLASS = {
    nn.Linear: MaskedLinear,
    nn.Conv1d: MaskedConv1d,
    nn.Conv2d: MaskedConv2d,
    nn.Conv3d: MaskedConv3d,
}
# Subclasses that add nothing but a name: they become the plain masked class.
_PLAIN = {nn.modules.linear.NonDynamicallyQuantizableLinear}
_SUBCLASSES: dict[type, type] = {}


def is_masked(module: nn.Module) -> bool:
    return isinstance(module, MaskedLayer)


def _rebuild_masked(user_class: type, state: dict) -> nn.Module:
    """Unpickle a layer of a masked user subclass (its class is made at run time, so pickle cannot name it)."""
    layer = _masked_subclass(user_class).__new__(_masked_subclass(user_class))
    layer.__dict__.update(state)
    return layer


def _masked_subclass(user_class: type) -> type:
    """``Masked<UserClass>(MaskedLinear, UserClass)``: keeps the user's methods and isinstance checks."""
    if user_class not in _SUBCLASSES:
        masked_base = next(m for b, m in _MASKED_CLASS.items() if issubclass(user_class, b))
        _SUBCLASSES[user_class] = type(
            f"Masked{user_class.__name__}", (masked_base, user_class),
            {"__module__": __name__, "__reduce_ex__": lambda self, protocol: (
                _rebuild_masked, (user_class, self.__dict__.copy()))},
        )
    return _SUBCLASSES[user_class]


def masked_class_for(module: nn.Module) -> type | None:
    """The masked class replacing ``module``, or None. Subclasses qualify only if they keep the base forward;
    they get a masked subclass of their own so that their methods and isinstance checks survive."""
    for base, masked in _MASKED_CLASS.items():
        if isinstance(module, base) and type(module).forward is base.forward:
            plain = type(module) is base or type(module) in _PLAIN
            return masked if plain else _masked_subclass(type(module))
    return None


def make_masked_(module: nn.Module, plan: LayerPlan, mask: torch.Tensor) -> MaskedLayer:
    """Turn a Linear/Conv module into its masked class in place, register ``mask`` and zero masked weights."""
    masked = masked_class_for(module)
    if masked is None:
        raise TypeError(f"{type(module).__name__} has no masked form; supported: {[c.__name__ for c in _MASKED_CLASS]}")
    module.__class__ = masked
    _attach(module, plan, mask)
    return module


def mask_attention_projection_(mha: nn.MultiheadAttention, param_name: str, plan: LayerPlan,
                               mask: torch.Tensor) -> MaskedProjection:
    """Move ``mha.<param_name>`` into a ``MaskedProjection`` child and make the attention read it from there."""
    if type(mha) is nn.MultiheadAttention:
        mha.__class__ = MaskedMultiheadAttention
    weight = mha._parameters.pop(param_name)
    projection = MaskedProjection(weight)
    mha.add_module(MaskedMultiheadAttention.child_name(param_name), projection)
    _attach(projection, plan, mask)
    return projection


def _attach(layer: nn.Module, plan: LayerPlan, mask: torch.Tensor) -> None:
    with torch.no_grad():
        if not layer.weight.is_contiguous():  # neuron views must be views, not copies
            layer.weight.data = layer.weight.data.contiguous()
        layer.register_buffer("mask", mask.reshape(layer.weight.shape).to(layer.weight.device).clone())
        layer.srigl_plan = plan
        layer.apply_mask_()
