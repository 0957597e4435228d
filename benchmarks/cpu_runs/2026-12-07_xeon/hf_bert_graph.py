"""A Hugging Face BERT-base (random init, 90% uniform, lowered) at batch 1, with attention masks: eager against
``cpu_graph``, which refused it before its guards (transformers' mask code reads tensor values into Python).
One process, rounds alternating, medians of each round's median.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/cpu_runs/2026-12-07_xeon/hf_bert_graph.py --seq 128 --rounds 7
"""

import argparse
import json
import platform
import statistics
import subprocess
import time

import torch
import transformers

from srigl_compile import SRigLConfig, cpu_graph, lower, sparsify

parser = argparse.ArgumentParser()
parser.add_argument("--seq", type=int, default=128)
parser.add_argument("--rounds", type=int, default=7)
parser.add_argument("--calls", type=int, default=10)
args = parser.parse_args()

torch.manual_seed(0)
model = transformers.BertModel(transformers.BertConfig()).eval()  # (bert-base shapes: 12 layers, 768, 3072)
ids = torch.randint(0, 30522, (1, args.seq))
full = torch.ones(1, args.seq, dtype=torch.long)
padded = full.clone()
padded[0, args.seq * 3 // 4:] = 0
example = {"input_ids": ids, "attention_mask": full}
sparse = sparsify(model, SRigLConfig(sparsity=0.9, distribution="uniform"), example_inputs=example)
with torch.no_grad():
    lowered = lower(sparse, example_inputs=example, progress=False)
    graphed = cpu_graph(lowered)
    runs = {}
    for mask_name, mask in (("full mask", full), ("padded mask", padded)):
        want = sparse(input_ids=ids, attention_mask=mask)[0]
        for path, fn in (("eager", lowered), ("cpu_graph", graphed)):
            got = fn(input_ids=ids, attention_mask=mask)[0]
            error = float((got - want).abs().max() / want.abs().max())
            assert error < 1e-4, (mask_name, path, error)
            runs[(mask_name, path)] = (fn, mask, error)
    times = {key: [] for key in runs}
    for _ in range(args.rounds):
        for key, (fn, mask, _) in runs.items():
            calls = []
            for _ in range(args.calls):
                start = time.perf_counter()
                fn(input_ids=ids, attention_mask=mask)
                calls.append(time.perf_counter() - start)
            times[key].append(statistics.median(calls) * 1e3)
result = {
    "command": f"python benchmarks/cpu_runs/2026-12-07_xeon/hf_bert_graph.py --seq {args.seq} --rounds {args.rounds} "
               f"--calls {args.calls}",
    "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
    "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
    "torch": torch.__version__, "transformers": transformers.__version__,
    "median_ms": {f"{m}, {p}": statistics.median(t) for (m, p), t in times.items()},
    "max_rel_error": {f"{m}, {p}": runs[(m, p)][2] for (m, p) in runs},
    "replays": graphed.replays, "guard_misses": graphed.guard_misses,
    "rounds_ms": {f"{m}, {p}": t for (m, p), t in times.items()},
}
print(json.dumps(result))
