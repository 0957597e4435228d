"""Runtime forms of one layer: dense -> masked (training) -> condensed (inference)."""

from .masked import (
    LayerPlan,
    MaskedConv1d,
    MaskedConv2d,
    MaskedConv3d,
    MaskedLayer,
    MaskedLinear,
    MaskedMultiheadAttention,
    MaskedProjection,
    is_masked,
    make_masked_,
)

__all__ = [
    "LayerPlan",
    "MaskedConv1d",
    "MaskedConv2d",
    "MaskedConv3d",
    "MaskedLayer",
    "MaskedLinear",
    "MaskedMultiheadAttention",
    "MaskedProjection",
    "is_masked",
    "make_masked_",
]
