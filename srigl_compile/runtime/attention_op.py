"""``torch.ops.srigl_compile.tvm_attention``: a lowered self-attention's core, softmax(q k^T / sqrt(D)) v per head,
run by the ``attention`` glue kernel of one of the model's linear libraries (``codegen.attention_kernel``).

    tvm_attention(q [B, T, Wq], k [B, S, Wk], v [B, S, Wv], heads, head_dim, q_off, k_off, v_off, kernel_key)
        -> o [B, T, heads * head_dim]

Head h reads columns ``q_off + h * head_dim`` onwards of q (k, v likewise): the stacked q/k/v projection's
output goes in three times with offsets 0, E, 2E, so nothing is split or transposed, and the output is already
the out projection's input. Same values as ``F.scaled_dot_product_attention`` on the heads to float32 rounding
(no mask, not causal, no dropout). Calls the kernel does not take (head_dim not a multiple of 64, more than
``MAX_KEYS`` keys, not float32 on the CPU, autograd, a library without the function) run torch's SDPA instead.

Example:
    >>> o = attention(qkv, qkv, qkv, 12, 64, 0, 768, 1536, layer.kernel_key)      # doctest: +SKIP
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import register_fake
from .registry import get_handle
from .scratch import result, scratch

__all__ = ["attention", "MAX_KEYS", "HEAD_MULTIPLE"]

MAX_KEYS = 2048  # keys the kernel takes: its scores live in a fixed stack buffer (``codegen.attention_kernel``)
HEAD_MULTIPLE = 64  # head dims the kernel takes: its output blocks are 64 values of d


def _heads(x: torch.Tensor, offset: int, heads: int, head_dim: int) -> torch.Tensor:
    return x[..., offset:offset + heads * head_dim].unflatten(-1, (heads, head_dim)).transpose(1, 2)


def _torch(q, k, v, heads: int, head_dim: int, q_off: int, k_off: int, v_off: int) -> torch.Tensor:
    out = F.scaled_dot_product_attention(_heads(q, q_off, heads, head_dim), _heads(k, k_off, heads, head_dim),
                                         _heads(v, v_off, heads, head_dim))
    return out.transpose(1, 2).flatten(2)


def _takes(q, k, v, head_dim: int, fn) -> bool:
    grad = torch.is_grad_enabled()
    return (fn is not None and head_dim % HEAD_MULTIPLE == 0 and 0 < k.shape[1] <= MAX_KEYS and q.shape[1] > 0
            and all(t.dim() == 3 and t.is_cpu and t.dtype == torch.float32 and not (grad and t.requires_grad)
                    for t in (q, k, v)))


def _run(q, k, v, heads: int, head_dim: int, q_off: int, k_off: int, v_off: int, kernel_key: str) -> torch.Tensor:
    fn = getattr(get_handle(kernel_key), "attention_fn", None)
    if not _takes(q, k, v, head_dim, fn):
        return _torch(q, k, v, heads, head_dim, q_off, k_off, v_off)
    batch, keys = k.shape[:2]
    q, k, v = (t.contiguous() for t in (q, k, v))
    kt = scratch("attention_keys", (batch, heads, -(-keys // HEAD_MULTIPLE), head_dim, HEAD_MULTIPLE))
    out = result((batch, q.shape[1], heads * head_dim))
    fn(q, k, v, kt, out, heads, q_off, k_off, v_off, head_dim ** -0.5)
    return out


_LIB = torch.library.Library("srigl_compile", "FRAGMENT")
_LIB.define("tvm_attention(Tensor q, Tensor k, Tensor v, int heads, int head_dim, int q_off, int k_off, int v_off, "
            "str kernel_key) -> Tensor")
_LIB.impl("tvm_attention", _run, "CompositeExplicitAutograd")


@register_fake("srigl_compile::tvm_attention", _LIB)
def _tvm_attention_fake(q, k, v, heads, head_dim, q_off, k_off, v_off, kernel_key):
    return q.new_empty((q.shape[0], q.shape[1], heads * head_dim))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, head_dim: int, q_off: int, k_off: int,
              v_off: int, kernel_key: str) -> torch.Tensor:
    """The attention core through the kernel of ``kernel_key``'s library (module docstring). Plain eager tensors
    skip the dispatcher, tracers go through ``torch.ops``."""
    if all(type(t) is torch.Tensor for t in (q, k, v)) and not torch.compiler.is_compiling():
        return _run(q, k, v, heads, head_dim, q_off, k_off, v_off, kernel_key)
    return torch.ops.srigl_compile.tvm_attention(q, k, v, heads, head_dim, q_off, k_off, v_off, kernel_key)
