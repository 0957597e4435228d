"""Three settles of the 1x1 layer (2048 -> 512 on 7x7, batch 64, 50% uniform), printing each trial's medians (kernel,\nsgemm, oneDNN; ms) and the choice and dense variant kept: how steady the variant choice is on this VM.\n\n    OMP_WAIT_POLICY=PASSIVE python benchmarks/cpu_runs/2026-12-07_xeon/dense_variant_trials.py\n"""
import torch, torch.nn as nn, time, statistics
from srigl_compile import SRigLConfig, lower, sparsify
import srigl_compile.nn.dense_fallback as dfb
torch.manual_seed(0)
dense = nn.Sequential(nn.Conv2d(2048, 512, 1, bias=False), nn.ReLU()).eval()
x = torch.randn(64, 2048, 7, 7)
sparse = sparsify(dense, SRigLConfig(sparsity=0.5, distribution="uniform"), example_inputs=(x[:1],))
orig_rec = dfb._Trial.record
def rec(self, *s):
    done = orig_rec(self, *s)
    if done: print("trial medians ms", [round(statistics.median(t)*1e3,2) for t in self.times])
    return done
dfb._Trial.record = rec
orig_keep = dfb.keep_if_faster
def keep(model, chosen, *a, **k):
    n = orig_keep(model, chosen, *a, **k)
    print("after keep_if_faster", [f.choices for f, _ in chosen])
    return n
dfb.keep_if_faster = keep
from srigl_compile.nn.settle import settle
import srigl_compile.nn.settle as st
st.settle_trials.__globals__["keep_if_faster"] = keep
with torch.no_grad():
    for i in range(3):
        lowered = lower(sparse, progress=False)
        settle(lowered, x)
        print(i, lowered[0]._dense_form.choices, lowered[0]._dense_form.variants)
