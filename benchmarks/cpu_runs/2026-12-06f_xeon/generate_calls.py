"""generate() of benchmarks/decoder.py's lowered Llama called again and again, eager against cpu_graph (the model's
forward replaced by ``cpu_graph(model.forward)``): seconds per call, with a new static cache each call as
generate() makes it. The environment is taken as it is (no OMP_WAIT_POLICY default), so that

    OMP_WAIT_POLICY=PASSIVE python benchmarks/cpu_runs/2026-12-06f_xeon/generate_calls.py [llama_1024] [tokens]
    env -u OMP_WAIT_POLICY python benchmarks/cpu_runs/2026-12-06f_xeon/generate_calls.py

compare the two wait policies too. Eager calls first (median of 5 after one warm-up), then 5 graphed calls (the
first records).
"""

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import decoder as D  # noqa: E402
import torch  # noqa: E402
from common import set_threads  # noqa: E402

import srigl_compile  # noqa: E402

set_threads(2)
spec = D.DECODERS[sys.argv[1] if len(sys.argv) > 1 else "llama_1024"]
tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 16
models, prompt = D.build(spec)
model = models["lowered"]
options = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0,
               cache_implementation="static")


def timed() -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = model.generate(prompt, **options)
    return time.perf_counter() - start, out


with torch.no_grad():
    timed()
    eager = [timed() for _ in range(5)]
    model.forward = srigl_compile.cpu_graph(model.forward)
    graphed = [timed() for _ in range(5)]
same = all(torch.equal(out, eager[0][1]) for _, out in graphed)
print(f"{spec.name}, {tokens} new tokens a call: eager {statistics.median(s for s, _ in eager):.3f} s; graphed "
      f"{', '.join(f'{s:.3f}' for s, _ in graphed)} s (the first records); replays {model.forward.graph.replays}; "
      f"tokens equal: {same}")
