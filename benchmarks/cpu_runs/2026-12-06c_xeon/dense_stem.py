"""One-off: torch's dense stem (7x7/2 conv 3 -> 64, then ReLU and 3x3/2 max-pool) at batch 1, 2 threads, median of
50 calls after 20 warm-up, NCHW and channels_last: what the lowered stem (0.86 ms hot) would be replaced by."""
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(2)
x, w, b = torch.randn(1, 3, 224, 224), torch.randn(64, 3, 7, 7), torch.randn(64)
for channels_last in (False, True):
    xx = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    ww = w.contiguous(memory_format=torch.channels_last) if channels_last else w
    for name, fn in (("conv", lambda: F.conv2d(xx, ww, b, 2, 3)),
                     ("conv+relu+pool", lambda: F.max_pool2d(F.relu(F.conv2d(xx, ww, b, 2, 3)), 3, 2, 1))):
        for _ in range(20):
            fn()
        times = []
        for _ in range(50):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        times.sort()
        print("channels_last" if channels_last else "nchw", name, f"{times[25] * 1e3:.3f} ms")
