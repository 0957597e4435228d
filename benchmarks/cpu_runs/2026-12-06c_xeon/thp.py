"""One-off: do huge pages for the replay's tensors shrink the in-place penalty?"""
from pathlib import Path
import os, sys, mmap, ctypes
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[2])); sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "micro"))
import torch
import models as model_bench
from common import set_threads
from profile_model import warm_up
from replay_calls import time_calls
from srigl_compile import cpu_graph
set_threads(2)
lowered = model_bench.build(model_bench.MODELS["resnet50"], 224)["lowered"]
x = torch.randn(1, 3, 224, 224)
warm_up(lowered, x)
graphed = cpu_graph(lowered)
def anon_huge():
    return [l for l in open("/proc/self/smaps_rollup") if "AnonHuge" in l][0].strip()
with torch.no_grad():
    graphed(x); graphed(x)
    (entry,) = graphed._entries.values()
    calls = entry.recording.calls
    where, hot = time_calls(calls, 15)
    print(f"4K pages: {where.sum():.2f} ms in place, {hot.sum():.2f} hot", anon_huge(), flush=True)
    tensors = [t for c in calls for t in c.args if isinstance(t, torch.Tensor)]
    storages = {}
    for t in tensors:
        s = t.untyped_storage()
        storages.setdefault(s.data_ptr(), s)
    total = sum(-(-s.nbytes() // 4096) * 4096 for s in storages.values())
    print(len(tensors), "tensors", len(storages), "storages", total / 2**20, "MB", flush=True)
    size = -(-total // (2 << 20)) * (2 << 20) + (2 << 20)
    mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    skip = (-base) % (2 << 20)
    mm.madvise(mmap.MADV_HUGEPAGE, skip, size - skip - ((size - skip) % (2 << 20)))
    arena = torch.frombuffer(mm, dtype=torch.uint8)[skip:]
    arena.zero_()
    moved, pos = {}, 0
    for ptr, s in storages.items():
        n = s.nbytes()
        region = arena[pos:pos + n]
        region.copy_(torch.empty(0, dtype=torch.uint8).set_(s))
        moved[ptr] = region.untyped_storage(), pos
        pos += -(-n // 4096) * 4096
    seen = set()
    for c in calls:
        for t in c.args:
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                s, off = moved[t.untyped_storage().data_ptr()]
                elem_off = (skip + off) // t.element_size() + t.storage_offset()
                t.set_(s, elem_off, t.shape, t.stride())
    print(anon_huge(), flush=True)
    where, hot = time_calls(calls, 15)
    print(f"huge pages: {where.sum():.2f} ms in place, {hot.sum():.2f} hot", flush=True)
