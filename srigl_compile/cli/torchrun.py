"""Commands started by ``torchrun --nproc-per-node N -m srigl_compile ...``: one process per rank.

torchrun sets WORLD_SIZE, RANK and the rendezvous address; the command joins that process group for its run (gloo:
the reference training loop runs on the CPU) and leaves it afterwards.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch.distributed as dist

__all__ = ["torchrun_group", "is_main_rank", "world_size"]


@contextlib.contextmanager
def torchrun_group() -> Iterator[None]:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
