"""torch's dense computations of ResNet-50's layer4 1x1 shape (2048 -> 512 on 7x7, batch 64), eager: F.conv2d (oneDNN),
sgemm on [C, H * W] (the dense form's first computation), inductor's convolution, channels_last, and a permuted mm.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/cpu_runs/2026-12-07_xeon/dense_ops_1x1.py
"""
import torch, time, statistics, torch.nn.functional as F
torch.manual_seed(0)
x = torch.randn(64, 2048, 7, 7); w = torch.randn(512, 2048, 1, 1)
def t(f, n=15):
    for _ in range(3): f()
    ts=[]
    for _ in range(n):
        s=time.perf_counter(); f(); ts.append(time.perf_counter()-s)
    return round(statistics.median(ts)*1e3, 2)
w2 = w.flatten(1)
conv = torch.nn.Conv2d(2048, 512, 1, bias=False).eval(); conv.weight.data.copy_(w)
with torch.no_grad():
    cc = torch.compile(conv)
    print("F.conv2d", t(lambda: F.conv2d(x, w)))
    print("matmul", t(lambda: torch.matmul(w2, x.flatten(2))))
    print("inductor conv", t(lambda: cc(x)))
    print("F.conv2d channels_last in+out", t(lambda: F.conv2d(x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)).contiguous()))
    xl = x.to(memory_format=torch.channels_last)
    print("F.conv2d channels_last (input already)", t(lambda: F.conv2d(xl, w)))
    print("permute+mm", t(lambda: (x.permute(0,2,3,1).reshape(-1,2048) @ w2.T)))
