"""Typed errors of srigl_compile.

Every error names the layer or field at fault and says how to fix it. Catch ``SRigLError`` to catch them all.
"""

from __future__ import annotations

__all__ = [
    "SRigLError",
    "ConfigError",
    "LayerError",
    "TraceError",
    "InvariantError",
    "CheckpointError",
    "TrainingError",
    "UnsupportedTargetError",
    "LoweringError",
    "DeviceError",
    "ReplayError",
]


class SRigLError(Exception):
    """Base class of every error raised by srigl_compile."""


class ConfigError(SRigLError, ValueError):
    """A configuration field has a bad value (the message names the field and the allowed values)."""


class LayerError(SRigLError, ValueError):
    """A layer cannot be sparsified as asked (too small for k >= 1, unsupported type, ...)."""


class TraceError(SRigLError, RuntimeError):
    """The model's graph could not be captured with torch.fx nor torch.export."""


class InvariantError(SRigLError, RuntimeError):
    """A sparse-training invariant was violated (constant fan-in, zero masked weights, ...). Never a warning."""


class CheckpointError(SRigLError, ValueError):
    """A checkpoint lacks masks, belongs to another model, or is corrupt."""


class TrainingError(SRigLError, RuntimeError):
    """Training cannot go on (a non-finite loss or weights); the message says at which step and what to change."""


class UnsupportedTargetError(SRigLError, ValueError):
    """An unknown lowering target (the message lists the supported ones)."""


class LoweringError(SRigLError, RuntimeError):
    """Lowering a model to compiled kernels failed."""


class InferenceOnlyError(LoweringError):
    """A lowered (compiled) layer was called where autograd would need its backward, which it does not have."""


class DeviceError(SRigLError, RuntimeError):
    """A tensor or model is on a device the compiled kernel cannot run on (e.g. target='cuda' without a GPU)."""


class ReplayError(SRigLError, RuntimeError):
    """A forward cannot be recorded as a CPU graph (the message names the op or input at fault and what to do)."""
