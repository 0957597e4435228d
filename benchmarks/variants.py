"""The variants of the layer benchmark, declared once: how each runs one layer, and when it does not apply.

    python benchmarks/run.py --only layers         # runs it (layers.py drives this module)
    from variants import VARIANTS, LayerCase
    case = LayerCase(spec, sparsity, masked_model, mask_info, dense_module, compiled_dense)
    for variant in VARIANTS: fn = variant.build(case, batch)   # fn(x) -> y, or a Skip with the reason

Inputs arrive on the variant's device. Every variant computes the same layer from the same masked weights;
``layers.py`` checks each against the dense reference before timing it. "structured" is the dense layer over
the active neurons only (what dropping ablated neurons alone buys) and is compared on those neurons' outputs.
Variants marked ``mask_independent`` cost the same whatever the mask (dense products): they are checked for
every mask but timed once per layer and batch. Convolutions run CSR and TVM dense on im2col rows (the lowered
stride-1 convolution reads the padded input directly: ``runtime.conv_op``). ``lowered_cuda`` calls
``lower(target="cuda")`` only where torch sees a GPU.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from layer_specs import LayerSpec
from tvm_dense import TVMDense

from srigl_compile import condense, lower
from srigl_compile.errors import SRigLError

GATHER_LIMIT_BYTES = 512 * 2**20  # the torch gather materialises [B, n, k(, L)]: gigabytes at large batch


@dataclasses.dataclass(frozen=True)
class Skip:
    reason: str


def _cuda_missing() -> Skip | None:
    return None if torch.cuda.is_available() else Skip("no CUDA device")


@dataclasses.dataclass
class LayerCase:
    """One layer at one sparsity with one mask; the expensive forms (condensed, lowered) are built on first use."""

    spec: LayerSpec
    sparsity: float
    masked: nn.Sequential
    mask_info: dict
    dense: nn.Module  # the layer's dense module, holding this case's masked weights
    dense_compiled: Callable  # torch.compile(dense), compiled once per layer shape

    @property
    def layer(self) -> nn.Module:
        return self.masked[0]

    @functools.cached_property
    def active(self) -> torch.Tensor:
        return self.layer.mask.reshape(self.layer.mask.shape[0], -1).any(1).nonzero().squeeze(1)

    @functools.cached_property
    def condensed(self) -> nn.Module:
        return condense(self.masked)

    @functools.cached_property
    def lowered(self) -> nn.Module:
        return lower(self.masked, target="llvm", progress=False)

    @functools.cached_property
    def tvm_dense(self) -> TVMDense:
        return TVMDense(self.weight2d(), self.bias())

    @functools.cached_property
    def dense_cuda(self) -> nn.Module | Skip:
        return _cuda_missing() or copy.deepcopy(self.dense).cuda()

    @functools.cached_property
    def lowered_cuda(self) -> nn.Module | Skip:
        """lower(target="cuda"), called only where torch sees a GPU."""
        if skip := _cuda_missing():
            return skip
        try:
            return lower(self.masked, target="cuda", progress=False).cuda()
        except SRigLError as err:  # e.g. UnsupportedTargetError while the CUDA backend is being wired
            return Skip(f"lower(target='cuda') failed: {err}")

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """x as the rows of the layer's matrix product: itself, or im2col rows [B * L, C * k * k] of a conv (the
        same strided-view im2col the lowered conv uses)."""
        return self.condensed[0].im2col_rows(x)[0] if self.spec.is_conv else x

    def unrows(self, y: torch.Tensor, batch: int) -> torch.Tensor:
        """[rows, n_out] back to the layer's output shape."""
        if not self.spec.is_conv:
            return y
        return y.view(batch, -1, y.shape[-1]).transpose(1, 2).reshape(batch, -1, self.spec.size, self.spec.size)

    def weight2d(self) -> torch.Tensor:
        return self.layer.weight.detach().reshape(self.spec.n_out, -1)

    def bias(self) -> torch.Tensor | None:
        return None if self.layer.bias is None else self.layer.bias.detach()


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    build: Callable[[LayerCase, int], Callable | Skip]
    label: str
    device: str = "cpu"
    mask_independent: bool = False
    active_only: bool = False  # compared on the active neurons' outputs only


def _csr(case: LayerCase, batch: int):
    csr, bias = case.weight2d().to_sparse_csr(), case.bias()

    def run(x):
        y = torch.sparse.mm(csr, case.rows(x).t()).t()
        return case.unrows(y if bias is None else y + bias, x.shape[0])

    return run


def _structured(case: LayerCase, batch: int):
    """The dense layer restricted to the active neurons (its masked weights included: a dense product)."""
    active = case.active
    weight = case.layer.weight.detach()[active]
    bias = None if case.layer.bias is None else case.layer.bias.detach()[active]
    if case.spec.is_conv:
        return lambda x: F.conv2d(x, weight, bias, padding=case.spec.kernel // 2)
    return lambda x: F.linear(x, weight, bias)


def _gather(case: LayerCase, batch: int):
    info = case.mask_info
    needed = case.spec.rows(batch) * info["active"] * info["k"] * 4
    if needed > GATHER_LIMIT_BYTES:
        return Skip(f"would materialise {needed / 2**30:.2f} GiB of gathered inputs (limit "
                    f"{GATHER_LIMIT_BYTES / 2**30:.1f} GiB)")
    return case.condensed


def _tvm_dense(case: LayerCase, batch: int):
    return lambda x: case.unrows(case.tvm_dense(case.rows(x)), x.shape[0])




VARIANTS = (
    Variant("dense", lambda case, batch: case.dense, "torch dense (eager)", mask_independent=True),
    Variant("dense_compile", lambda case, batch: case.dense_compiled, "torch dense (torch.compile)",
            mask_independent=True),
    Variant("csr", _csr, "torch CSR"),
    Variant("structured", _structured, "structured (active neurons, dense)", active_only=True),
    Variant("gather", _gather, "torch condensed gather (reference)"),
    Variant("tvm_dense", _tvm_dense, "TVM dense kernel", mask_independent=True),
    Variant("lowered_llvm", lambda case, batch: case.lowered, "srigl_compile lowered (llvm)"),
    Variant("dense_cuda", lambda case, batch: case.dense_cuda, "torch dense (CUDA)", device="cuda",
            mask_independent=True),
    Variant("lowered_cuda", lambda case, batch: case.lowered_cuda, "srigl_compile lowered (cuda)", device="cuda"),
)
