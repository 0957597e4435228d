"""The kernel handle protocol: what the operators, the registry and the kernel folders need of a compiled kernel.

A handle is built by a backend (``codegen.backends``) or loaded from a kernel folder (``kernel_io``), registered
under its key (``registry``), and called by the torch operators with a layer's packed operands. ``HandleBase``
holds what every handle shares: key, spec, target, and the spec's fields as plain attributes (they are read on
every call).

Example:
    >>> handle = get_handle(layer.kernel_key)                    # doctest: +SKIP
    >>> values, indices = handle.pack(values, indices)           # once, when lowering   # doctest: +SKIP
    >>> y = handle.launch(rows, [values, indices, bias], 0)      # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from .linear_op import condensed_linear
from .spec import KernelSpec

__all__ = ["KernelHandle", "HandleBase", "LinearHandleBase"]


class KernelHandle(Protocol):
    """A compiled kernel of one ``KernelSpec`` for one target.

    Attributes:
        key: registry key (``spec.key(backend.target_tag(target))``); what a lowered layer stores.
        device_type: "cpu" or "cuda": where it runs (and the manifest's ``device``).
        kind: "linear" (rows of x, ``linear_op``) or "conv" (padded images, ``conv_op``).
        module / library_path: the TVM module (for ``export_kernels``), and the library file it was loaded from.
    """

    key: str
    spec: KernelSpec
    target: dict[str, Any]
    device_type: ClassVar[str]
    kind: ClassVar[str]
    module: Any
    library_path: str | None

    def pack(self, values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's (values, indices) as this kernel's operands; done once, when lowering."""

    def manifest_entry(self, folder: Path, stem: str) -> dict[str, Any]:
        """The manifest fields beyond the shared ones (variants, dispatch); writes any extra files into ``folder``
        named ``stem.*``."""

    @classmethod
    def from_manifest(cls, folder: Path, entry: dict[str, Any], spec: KernelSpec, library: Path) -> KernelHandle:
        """The handle an entry written by ``manifest_entry`` describes (its library checked already)."""


@dataclasses.dataclass(eq=False)
class HandleBase:
    """key, spec and target, and the spec's shape fields copied for the per-call paths."""

    key: str
    spec: KernelSpec
    target: dict[str, Any]
    n_out: int = dataclasses.field(init=False, repr=False)
    n_in: int = dataclasses.field(init=False, repr=False)
    k: int = dataclasses.field(init=False, repr=False)
    k_pad: int = dataclasses.field(init=False, repr=False)
    index_dtype: str = dataclasses.field(init=False, repr=False)
    has_bias: bool = dataclasses.field(init=False, repr=False)
    epilogue: str = dataclasses.field(init=False, repr=False)
    kind: ClassVar[str] = "linear"

    def __post_init__(self) -> None:
        spec = self.spec
        self.n_out, self.n_in, self.k, self.k_pad = spec.n_out, spec.n_in, spec.k, spec.k_pad
        self.index_dtype, self.has_bias, self.epilogue = spec.index_dtype, spec.has_bias, spec.epilogue

    def variant(self) -> tuple:
        """What the compiled schedules are, beyond the spec (operands are packed for them): equal variants of a
        key's spec and target run the same kernels on the same operands."""
        return ()

    def capabilities(self) -> frozenset[str]:
        """What the library can run: its compiled functions present (``*_fn``; libraries saved before some glue
        existed lack it)."""
        return frozenset(name for name, value in vars(self).items() if name.endswith("_fn") and value is not None)

    def legacy(self) -> bool:
        """Whether the library lacks something every build of this version has that changes what a call returns
        (a loaded library saved by an older version)."""
        return False

    def pack(self, values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel operands from a condensed layer's (values, indices) [n_out, k] (``KernelSpec.pack``). Do it once.

        Raises:
            ValueError: wrong shapes, or an index outside [0, n_in).
        """
        return self.spec.pack(values, indices, self.key)


class LinearHandleBase(HandleBase):
    """A handle of the linear op: ``handle(x, values, indices, bias)`` runs it as a lowered layer would (and
    ``check_input`` / ``launch`` are what the op calls)."""

    def __call__(self, x, values, indices, bias=None, col_threshold: int = 0):
        return condensed_linear(x, values, indices, bias, self.key, col_threshold)
