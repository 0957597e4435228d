"""The direct convolution's kernel on the CPU: one layer shape's offset kernel, and each layer's offsets.

The offset kernel reads non-zero r of output row o at ``offsets[o, r] + q`` in a flattened padded image (q: the
output position, ``conv_geometry``); offsets depend on the image size, so each layer computes them on first use of
a size. Operands are blocked as a kernel task reads them (``block_rows``).

Example:
    >>> handle = get_handle(layer.kernel_key)                              # doctest: +SKIP
    >>> offsets = handle.offsets(layer.indices, (3, 3), (1, 1), plan)       # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .conv_geometry import DirectPlan, column_offsets
from .cpu_features import missing_host_features
from .handle import HandleBase
from .llvm_linear import load_cpu_library
from .llvm_params import ColParams
from .spec import CONV_GLUE, KernelSpec, block_rows, shared_columns
from .tvm_runtime import check_wait_policy

__all__ = ["LlvmConvHandle"]

_SIZES_PER_LAYER = 4  # image sizes whose offsets a layer keeps (each costs 4 bytes per non-zero)


@dataclasses.dataclass(eq=False)
class LlvmConvHandle(HandleBase):
    """The compiled offset kernel of one layer shape (n_in = the im2col width C * kh * kw, for bounds checks).

    Attributes:
        params: the compiled variant (rows per task, k-inner tile, rows interleaved, lanes = positions per tile).
        module: the TVM module holding the kernel (for ``export_kernels``).
    """

    params: ColParams
    module: Any
    library_path: str | None = None
    # whether the library's pad and crop read and write strided (planar) images; False in libraries saved before
    strided_glue: bool = True
    # whether the library's max-pool reads images with any row pitch and channel stride; False in libraries saved
    # before
    pitched_pool: bool = True
    device_type: ClassVar[str] = "cpu"
    kind: ClassVar[str] = "conv"
    conv_fn: Any = dataclasses.field(init=False, repr=False)
    # the copies around the kernel (``codegen.glue_kernels``); None in libraries saved before they existed
    pad_fn: Any = dataclasses.field(init=False, repr=False, default=None)
    crop_fn: Any = dataclasses.field(init=False, repr=False, default=None)
    max_pool_fn: Any = dataclasses.field(init=False, repr=False, default=None)  # (for ``runtime.pool_op``)
    global_avg_pool_fn: Any = dataclasses.field(init=False, repr=False, default=None)  # (likewise)
    # columns tensor (one per layer; held weakly, so a freed layer's entries go) -> {image size: offsets}
    _offsets: Any = dataclasses.field(init=False, repr=False, default_factory=WeakIdKeyDictionary)
    missing_features: tuple = dataclasses.field(init=False, repr=False, default=())

    def __post_init__(self) -> None:
        super().__post_init__()
        check_wait_policy()
        self.conv_fn = self.module[self.spec.symbol("offset")]
        self.pad_fn, self.crop_fn, self.max_pool_fn, self.global_avg_pool_fn = (
            self.module[self.spec.symbol(name)] if self.module.implements_function(self.spec.symbol(name), True)
            else None for name in CONV_GLUE)
        self.missing_features = missing_host_features(self.target)

    @property
    def lanes(self) -> int:
        return self.params.lanes

    def variant(self) -> tuple:
        return (self.params,)

    def capabilities(self) -> frozenset[str]:
        """Its functions, and the layouts its glue takes (False in libraries saved before)."""
        return super().capabilities() | {flag for flag in ("strided_glue", "pitched_pool") if getattr(self, flag)}

    def legacy(self) -> bool:
        """Glue missing, or glue that takes fewer layouts: its calls return other layouts (contiguous images)."""
        return not (self.strided_glue and self.pitched_pool
                    and all(getattr(self, f"{name}_fn") is not None for name in CONV_GLUE))

    @property
    def planar_glue(self) -> bool:
        """Whether this library's pad and crop read and write planar images (``runtime.conv_geometry``)."""
        return self.strided_glue and self.pad_fn is not None and self.crop_fn is not None

    def pack(self, values: torch.Tensor, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel operands from a condensed conv's (values, im2col columns) [n_out, k]: ``KernelSpec.pack``, then
        (with ``params.share`` > 1) grouped by ``shared_columns``, then blocked as the kernel reads them
        (``block_rows``: [n_out / rows, k / kin, rows (or rows / share for the columns), kin]). Do it once."""
        values, columns = super().pack(values, columns)
        rows, kin, share = self.params.rows, self.params.kin, self.params.share
        if share > 1:  # groups of rows reading their union of columns (``spec.shared_columns``)
            values, columns = shared_columns(values, columns, share, rows, kin)
        return block_rows(values, rows, kin), block_rows(columns, rows // share, kin)

    def is_packed(self, values: torch.Tensor) -> bool:
        return values.dim() == 4 and values.shape[2] == self.params.rows and (
            self.params.share > 1 or values.shape[1] * values.shape[3] == self.k_pad)

    def offsets(self, columns: torch.Tensor, kernel, dilation, plan: DirectPlan) -> torch.Tensor:
        """``column_offsets`` for this image size, computed once per layer (its columns tensor) and size. The
        cache is per layer, not per handle: layers of one shape share a handle (35 in a ResNet-152 stage), and a
        shared bound would make them evict each other on every call."""
        sizes = self._offsets.get(columns)
        if sizes is None:
            sizes = self._offsets[columns] = {}
        key = (columns._version, kernel, dilation, plan.rows, plan.pitch, plan.plane)
        if key not in sizes:
            if len(sizes) >= _SIZES_PER_LAYER:
                sizes.clear()
            sizes[key] = column_offsets(columns, kernel, dilation, plan, self.spec.n_in)
        return sizes[key]

    def manifest_entry(self, folder: Path, stem: str) -> dict[str, Any]:
        return {"kind": "conv", "params": dataclasses.asdict(self.params), "strided_glue": self.strided_glue,
                "pitched_pool": self.pitched_pool}

    @classmethod
    def from_manifest(cls, folder: Path, entry: dict[str, Any], spec: KernelSpec, library: Path):
        return load_cpu_library(cls, folder, entry, spec, library, {"params": ColParams(**entry["params"]),
                                                                    "strided_glue": entry.get("strided_glue", False),
                                                                    "pitched_pool": entry.get("pitched_pool", False)})
