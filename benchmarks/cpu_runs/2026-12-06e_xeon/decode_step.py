"""One decode step of benchmarks/decoder.py's lowered Llama, eager against replayed by cpu_graph, alternating in one
process (the static cache restored from a snapshot before each call), medians of 40 calls each.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/cpu_runs/2026-12-06e_xeon/decode_step.py [llama_1024|deep512]

deep512: hidden 512, MLP 1408, 16 layers, 8 heads / 2 key-value heads, vocabulary 8000 (more layers, less work each).
"""

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import decoder as D  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import set_threads  # noqa: E402

import srigl_compile  # noqa: E402
from srigl_compile.runtime.state_objects import Snapshot, is_state_object  # noqa: E402

set_threads(2)
D.DECODERS["deep512"] = D.DecoderSpec("deep512", 512, 1408, 16, 8, 2, 8000)
spec = D.DECODERS[sys.argv[1] if len(sys.argv) > 1 else "llama_1024"]
models, prompt = D.build(spec)
model = models["lowered"]
eager = model.forward
graphed = srigl_compile.cpu_graph(model.forward)
seen = []


def spy(*args, **kwargs):
    states = [v for v in kwargs.values() if is_state_object(v)]
    seen.append((kwargs, Snapshot(states) if states else None))
    return graphed(*args, **kwargs)


model.forward = spy
with torch.no_grad():
    model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0, cache_implementation="static")
    kwargs, snapshot = seen[-2]  # (a decode step the graph has recorded)
    eager_s, replayed_s = [], []
    for _ in range(40):
        snapshot.restore()
        start = time.perf_counter()
        want = eager(**kwargs)
        eager_s.append(time.perf_counter() - start)
        snapshot.restore()
        start = time.perf_counter()
        got = graphed(**kwargs)
        replayed_s.append(time.perf_counter() - start)
print(f"{spec.name}: decode step eager {np.median(eager_s) * 1e3:.2f} ms, replayed {np.median(replayed_s) * 1e3:.2f} "
      f"ms ({np.median(eager_s) / np.median(replayed_s):.2f}x); logits equal: {torch.equal(want.logits, got.logits)}; "
      f"recorded calls {len(list(graphed.graph._entries.values())[-1].recording)}")
