"""The one place TVM is imported: thread-pool set-up first, then the namespaces this package uses (TVM 0.27)."""

from __future__ import annotations

import functools
import os

__all__ = ["tvm_modules"]


@functools.cache
def tvm_modules():
    """Import TVM once, after sizing its thread pool (it defaults to half the cores on x86).

    Returns (tvm, te, s_tir).
    """
    if "TVM_NUM_THREADS" not in os.environ:
        import torch

        os.environ["TVM_NUM_THREADS"] = str(torch.get_num_threads())
    try:
        import tvm
        import tvm.s_tir as s_tir
        from tvm import te
    except ImportError as err:
        from ..errors import LoweringError

        raise LoweringError(
            "lower() needs apache-tvm: pip install 'srigl-compile[tvm]' (apache-tvm==0.27.0.post1 with "
            "apache-tvm-ffi==0.1.14.post1)"
        ) from err
    return tvm, te, s_tir
