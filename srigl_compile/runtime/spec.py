"""KernelSpec: what one compiled condensed kernel depends on, and every name and operand layout derived from it.

A layer's kernel is defined by its active rows ``n_out``, the input width ``n_in`` (a convolution's im2col width
for the direct kernel), the fan-in ``k``, the index dtype, whether it adds a bias, and where the target has several
float dtypes (CUDA), the dtype. Kernels are compiled for ``k_pad`` (k rounded up to ``K_MULTIPLE``): the padding
entries are zero weights on each row's last index, so rows stay sorted and the result is unchanged.

The names derived from a spec (these strings are in saved manifests, libraries and tuning records: they keep their
format):
    key(tag)              registry key, e.g. ``o768_i3072_k307_int16_b@kind=llvm,mcpu=znver3,num-cores=2``;
                          ``conv_`` + ... + ``_l49`` for a direct convolution with its own tile width;
                          ``..._float16@cuda-sm_90`` on CUDA (the target tag comes from the backend)
    symbol(layout)        a CPU kernel's global symbol, per layout and padded shape
    hashed_symbol(...)    a CUDA kernel's global symbol: unique per key (dtype and arch included)
    record_key(...)       a CPU tuning record's key;  measured_record_name(): a CUDA record's file name

Example:
    >>> spec = KernelSpec(768, 3072, 307, "int16", True)
    >>> spec.k_pad, spec.symbol("row")
    (312, 'srigl_row_o768_i3072_k312_int16_b')
    >>> KernelSpec(768, 3072, 307, "int16", True, "float16").key("cuda-sm_90")
    'o768_i3072_k307_int16_b_float16@cuda-sm_90'
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["KernelSpec", "K_MULTIPLE", "MID_LANES", "TORCH_INDEX", "TORCH_FLOAT", "EPILOGUES", "target_key",
           "block_rows", "shared_columns", "apply_epilogue", "CONV_GLUE", "LINEAR_GLUE"]

K_MULTIPLE = 8  # kernels are compiled for k rounded up to this (zero weights on the row's last index)
MID_LANES = 8  # batch rows per tile of the CPU mid-batch kernel: one AVX2 vector
TORCH_INDEX = {"int16": torch.int16, "int32": torch.int32}
TORCH_FLOAT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# What a kernel may compute on its output before writing it: "" nothing, "relu", "add" (a residual tensor of the
# output's shape), "add_relu" (relu(y + residual)), "gelu" (exact GELU, erf form; kernels use a rational erf good
# to a few float32 ulps, so outputs match torch's to ~1e-6, not bit for bit), "silu" (x sigmoid(x); kernels use a
# polynomial exp, likewise ~1e-6).
EPILOGUES = ("", "relu", "add", "add_relu", "gelu", "silu")
# The TIR helpers a CPU convolution's library holds besides its kernel (``codegen.glue_kernels``), each under
# ``spec.symbol(name)``: input padding / phase split, output crop, and the model's max-pooling and global average
# pooling (``pool_op``).
CONV_GLUE = ("pad", "crop", "max_pool", "global_avg_pool")
# ... and a CPU linear layer's library: the model's layer norms and RMS norms (``norm_op``) and self-attention cores
# (``attention_op``).
LINEAR_GLUE = ("layer_norm", "attention", "rms_norm")


def apply_epilogue(y: torch.Tensor, epilogue: str, residual: torch.Tensor | None) -> torch.Tensor:
    """The reference of a kernel's epilogue, in torch (what condensed layers run, and what kernels must equal)."""
    if "add" in epilogue:
        y = y + residual
    if "gelu" in epilogue:
        return torch.nn.functional.gelu(y)
    if "silu" in epilogue:
        return torch.nn.functional.silu(y)
    return torch.relu(y) if "relu" in epilogue else y


def target_key(target: Mapping[str, Any]) -> str:
    """A stable string naming a target dict (for kernel keys and tuning records)."""
    return ",".join(f"{k}={target[k]}" for k in sorted(target))


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One kernel's shape (k = the layer's real fan-in).

    Attributes:
        dtype: the float dtype where the target offers several, part of the key: CUDA's model dtype
            ("float32", "float16", "bfloat16"); on llvm the values' dtype when not float32 ("bfloat16": inputs,
            outputs and sums stay float32); None for float32 on llvm, whose keys do not name it.
        op: "linear" (rows of x) or "conv" (the direct convolution kernel on padded images).
        lanes: a convolution's output positions per tile, chosen for its image size (None: the variant's own).
        epilogue: one of ``EPILOGUES``, computed on the output tile before it is written (a key and symbol
            suffix ``_e<epilogue>``; tuning records ignore it).
    """

    n_out: int
    n_in: int
    k: int
    index_dtype: str
    has_bias: bool
    dtype: str | None = None
    op: str = "linear"
    lanes: int | None = None
    epilogue: str = ""

    def __post_init__(self) -> None:
        if self.epilogue not in EPILOGUES:
            raise ValueError(f"epilogue {self.epilogue!r} is not one of {EPILOGUES}")

    @property
    def has_residual(self) -> bool:
        return "add" in self.epilogue

    @property
    def k_pad(self) -> int:
        return -(-self.k // K_MULTIPLE) * K_MULTIPLE

    @property
    def value_dtype(self) -> torch.dtype:
        return TORCH_FLOAT[self.dtype or "float32"]

    @property
    def _bias_tag(self) -> str:
        return ("b" if self.has_bias else "nb") + (f"_e{self.epilogue}" if self.epilogue else "")

    def key(self, target_tag: str) -> str:
        """The registry key, ``target_tag`` naming the target (the backend's ``target_tag``)."""
        dtype = f"_{self.dtype}" if self.dtype else ""
        key = f"o{self.n_out}_i{self.n_in}_k{self.k}_{self.index_dtype}_{self._bias_tag}{dtype}@{target_tag}"
        if self.op == "conv":
            return f"conv_{key}" + (f"_l{self.lanes}" if self.lanes else "")
        return key

    def symbol(self, layout: str) -> str:
        """A CPU kernel's global symbol, unique per layout, padded shape, epilogue and value dtype, so several
        kernels share a library."""
        dtype = f"_{self.dtype}" if self.dtype else ""
        return f"srigl_{layout}_o{self.n_out}_i{self.n_in}_k{self.k_pad}_{self.index_dtype}_{self._bias_tag}{dtype}"

    @staticmethod
    def hashed_symbol(layout: str, key: str) -> str:
        """A CUDA kernel's global symbol, unique per key (a library per key: dtype and arch are in the key)."""
        return f"srigl_cuda_{layout}_{hashlib.sha256(key.encode()).hexdigest()[:12]}"

    def record_key(self, layout: str, target_tag: str) -> str:
        """The key of a CPU tuning record (one per layout, padded shape and target)."""
        bias = "bias" if self.has_bias else "nobias"
        return (f"condensed_linear|{layout}|o{self.n_out}|i{self.n_in}|k{self.k_pad}|{self.index_dtype}|{bias}|"
                f"{target_tag}")

    def measured_record_name(self) -> str:
        """The file name (without .json) of a CUDA record measured on a GPU: per padded shape and dtype."""
        return f"o{self.n_out}_i{self.n_in}_k{self.k_pad}_{self.dtype}"

    def pack(self, values: torch.Tensor, indices: torch.Tensor, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) [n_out, k] as kernel operands: the value dtype, the index dtype, k padded to ``k_pad``
        with zero weights on each row's last index (rows stay sorted), contiguous.

        Raises:
            ValueError: wrong shapes, or an index outside [0, n_in) (the kernels do no bounds checks); the message
                names the kernel ``key``.
        """
        if tuple(values.shape) != (self.n_out, self.k) or tuple(indices.shape) != (self.n_out, self.k):
            raise ValueError(f"kernel {key} takes values and indices of shape ({self.n_out}, {self.k}); got "
                             f"{tuple(values.shape)} and {tuple(indices.shape)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.n_in):
            raise ValueError(f"indices must lie in [0, {self.n_in}) for kernel {key}")
        values = values.detach().to(self.value_dtype)
        indices = indices.detach().to(TORCH_INDEX[self.index_dtype])
        extra = self.k_pad - self.k
        if extra:
            values = torch.cat([values, values.new_zeros(self.n_out, extra)], dim=1)
            indices = torch.cat([indices, indices[:, -1:].expand(self.n_out, extra)], dim=1)
        return values.contiguous(), indices.contiguous()


def block_rows(operand: torch.Tensor, rows: int, k_tile: int) -> torch.Tensor:
    """[n, k] -> [ceil(n / rows), k / k_tile, rows, k_tile], contiguous: row block by row block, k-tile by k-tile,
    the order a kernel task reads them in; zero rows fill the last block (zero weights, index 0, in range)."""
    n, k = operand.shape
    blocks = -(-n // rows)
    if blocks * rows != n:
        operand = torch.cat([operand, operand.new_zeros(blocks * rows - n, k)])
    return operand.view(blocks, rows, k // k_tile, k_tile).permute(0, 2, 1, 3).contiguous()


def shared_columns(values: torch.Tensor, columns: torch.Tensor, share: int, rows: int,
                   k_tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows in groups of ``share`` reading one list of columns: ([n', ku] values, [n' / share, ku] columns), n' = n
    rounded up to ``rows`` (zero rows at column 0), ku = the largest group's union of columns rounded up to
    ``k_tile``. Each group's columns are its rows' union, sorted (then its last column repeated); a row's value
    sits at its column's place in its group, zero elsewhere. Duplicate columns within a row (``pack``'s zero-weight
    padding) add up: their weights are zero.
    """
    n, k = values.shape
    padded = -(-n // rows) * rows
    if padded != n:
        values = torch.cat([values, values.new_zeros(padded - n, k)])
        columns = torch.cat([columns, columns.new_zeros(padded - n, k)])
    ordered = columns.reshape(padded // share, share * k).sort(dim=1).values
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    counts = first.sum(dim=1)
    width = -(-int(counts.max()) // k_tile) * k_tile
    union = ordered.new_zeros(padded // share, width).scatter_(1, first.long().cumsum(1) - 1, ordered)
    last = union.gather(1, (counts - 1)[:, None])
    union = torch.where(torch.arange(width) < counts[:, None], union, last)  # (sorted: searchsorted finds slots)
    slots = torch.searchsorted(union.repeat_interleave(share, dim=0), columns)
    spread = values.new_zeros(padded, width).scatter_add_(1, slots, values)
    return spread, union
