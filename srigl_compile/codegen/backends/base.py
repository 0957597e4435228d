"""What a lowering backend decides for its target kind, and the frozen config ``lower()`` hands it.

Every decision that depends on the target lives in one ``Backend`` subclass: the target dicts it accepts and
their defaults, the float dtypes its kernels take, whether it tunes, how a convolution runs (``conv_route``:
"direct", the offset kernel on padded images, or "im2col", the linear kernel on im2col rows), how a kernel is
built from a ``KernelSpec``, how the registry key names its target, and which run-time handle types load its
saved kernels (``runtime.kernel_io.HANDLE_TYPES``). Dispatch thresholds belong to the handles it builds.

Example:
    >>> backend = BACKENDS["llvm"]                                  # doctest: +SKIP
    >>> config = backend.config(None, tune=True)                    # doctest: +SKIP
    >>> handle = backend.build(KernelSpec(64, 100, 13, "int32", True), config)   # doctest: +SKIP
"""

from __future__ import annotations

import abc
import dataclasses
import numbers
import os
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ...errors import LoweringError
from ...runtime.conv_geometry import exact_tile
from ...runtime.spec import KernelSpec

__all__ = ["Backend", "TargetConfig", "CONV_ROUTES"]

CONV_ROUTES = ("direct", "im2col")


@dataclasses.dataclass(frozen=True)
class TargetConfig:
    """The options every backend takes (its subclass adds its own).

    Attributes:
        target: a target dict of the backend's kind, or None for its default (the host CPU; this machine's GPU,
            else sm_80 + sm_90). ``lower()`` stores the resolved dict here.
        dtype: the lowered model's float dtype (the backend's ``dtypes`` list what its kernels take).
        cache_dir: tuning records and build caches (default ``$SRIGL_COMPILE_CACHE`` or
            ``~/.cache/srigl_compile/tuning``).
        col_threshold: force the large-batch kernel from this many rows; None: each handle's own dispatch.
    """

    target: Mapping[str, Any] | None = None
    dtype: torch.dtype = torch.float32
    cache_dir: str | os.PathLike | None = None
    col_threshold: int | None = None
    kind: ClassVar[str] = ""

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


class Backend(abc.ABC):
    """One target kind's decisions (module docstring). Subclasses set the class attributes and build kernels."""

    kind: ClassVar[str]
    description: ClassVar[str]  # one line for the list of supported targets
    dtypes: ClassVar[tuple[str, ...]]
    conv_route: ClassVar[str]
    # what its kernels compute after the bias, per op ("linear", "conv"; runtime.spec.EPILOGUES): none by default
    epilogues: ClassVar[dict[str, frozenset[str]]] = {}
    config_type: ClassVar[type[TargetConfig]]
    handle_types: ClassVar[tuple[type, ...]]  # the runtime handles it builds (and that load its saved kernels)

    @abc.abstractmethod
    def resolve_target(self, given: Mapping[str, Any] | None) -> dict[str, Any]:
        """A checked target dict (None: the default); raises UnsupportedTargetError naming the fix."""

    @abc.abstractmethod
    def target_tag(self, target: Mapping[str, Any]) -> str:
        """How registry keys name the target (``KernelSpec.key``)."""

    @abc.abstractmethod
    def build(self, spec: KernelSpec, config: TargetConfig):
        """Compile (or fetch) the kernel of ``spec`` and register its handle; returns the handle."""

    def config(self, given: Mapping[str, Any] | None, **options) -> TargetConfig:
        """``lower()``'s keyword options as this backend's config: the target resolved first (an unknown one is
        the first thing to hear about), then the dtype and the options checked."""
        target = self.resolve_target(given)
        self.check_dtype(options.get("dtype", torch.float32))
        self.check_options(options)
        names = {f.name for f in dataclasses.fields(self.config_type)}
        return _fields_checked(self.config_type(target=target, **{k: v for k, v in options.items() if k in names}))

    def checked(self, config: TargetConfig) -> TargetConfig:
        """A config made by the caller, checked as ``config`` checks options, with its target resolved."""
        if not isinstance(config, self.config_type):
            raise LoweringError(f"target {self.kind!r} takes a {self.config_type.__name__}, not "
                                f"{type(config).__name__}")
        target = self.resolve_target(config.target)
        self.check_dtype(config.dtype)
        return _fields_checked(dataclasses.replace(config, target=target))

    def check_dtype(self, dtype: torch.dtype) -> None:
        if not isinstance(dtype, torch.dtype):
            raise LoweringError(f"dtype={dtype!r} must be a torch.dtype, e.g. torch.float32")
        name = str(dtype).removeprefix("torch.")
        if name not in self.dtypes:
            raise LoweringError(f"target {self.kind!r} lowers to dtypes {self.dtypes}, not {name}")

    def check_options(self, options: dict[str, Any]) -> None:
        """Refuse options this backend does not have (default: none refused)."""

    def spec_dtype(self, config: TargetConfig) -> str | None:
        """The dtype a KernelSpec names: only where the backend has several (it is then part of the key)."""
        return config.dtype_name if len(self.dtypes) > 1 else None

    def conv_tile(self, spec: KernelSpec, positions: int, config: TargetConfig) -> int | None:
        """The tile width of an unpadded 1x1 convolution whose output has ``positions`` positions (a divisor: no
        padded tail; ``conv_geometry.exact_tile``), or None for the variant's own. Default: AVX2-sized."""
        return exact_tile(positions)

    def place(self, model: nn.Module) -> nn.Module:
        """Where the lowered model goes (default: it stays where it is)."""
        return model


def _fields_checked(config: TargetConfig) -> TargetConfig:
    """The config, its flags and counts of the right types (a string such as "no" would act as True)."""
    name = type(config).__name__
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(field.default, bool) and not isinstance(value, bool):
            raise LoweringError(f"{name}.{field.name}={value!r} must be True or False")
    threshold = config.col_threshold
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, numbers.Integral)
                                  or threshold < 0):
        raise LoweringError(f"{name}.col_threshold={threshold!r} must be None (each kernel's own dispatch) or a "
                            "row count >= 0")
    if config.cache_dir is not None and not isinstance(config.cache_dir, (str, os.PathLike)):
        raise LoweringError(f"{name}.cache_dir={config.cache_dir!r} must be a directory path, or None")
    return config
