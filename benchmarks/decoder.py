"""The decoder benchmark: a Llama-shaped Hugging Face decoder pruned one-shot by Wanda, greedy generate() tokens/s.

    python benchmarks/run.py --only decoder [--quick]

The model is built from a ``LlamaConfig`` (hidden 1024, MLP 2816, 4 layers, 16 heads with 4 key/value heads,
vocabulary 8000; random weights, nothing downloaded), pruned to 90% by ``srigl_compile.prune(..., "wanda")`` on
random calibration tokens (every block's projection at 90%; lm_head left dense, as Wanda leaves it), and lowered
for llvm. Rows:
the dense model, the pruned model (masked, as PyTorch runs it) and the lowered model, each generating
``NEW_TOKENS`` tokens greedily after a ``PROMPT``-token prompt at batch 1, median of repeated runs; then the lowered
model with a static key/value cache (transformers' ``StaticCache``, kept across calls and reset before each), eagerly
(``lowered_static``) and with its forward replayed by ``cpu_graph`` (``lowered_graph``: ``model.forward =
cpu_graph(model.forward)``, so that generate() replays its steps). The lowered models' tokens must equal the pruned
model's (the check); tokens/s = new tokens / wall time of generate().
"""

from __future__ import annotations

import dataclasses

import torch

from common import TimerConfig, measure

from srigl_compile import SRigLConfig, cpu_graph, lower, prune, sparse_layers

SPARSITY = 0.9
PROMPT, NEW_TOKENS, BATCH = 16, 32, 1


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int


DECODERS = {"llama_1024": DecoderSpec("llama_1024", 1024, 2816, 4, 16, 4, 8000)}
QUICK_DECODERS = {"tiny_llama": DecoderSpec("tiny_llama", 64, 128, 2, 4, 2, 100)}


def build(spec: DecoderSpec):
    import transformers

    config = transformers.LlamaConfig(vocab_size=spec.vocab, hidden_size=spec.hidden,
                                      intermediate_size=spec.intermediate, num_hidden_layers=spec.layers,
                                      num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                                      max_position_embeddings=PROMPT + NEW_TOKENS + 16)
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(config).eval()
    prompt = torch.randint(0, spec.vocab, (BATCH, PROMPT))
    calibration = [{"input_ids": torch.randint(0, spec.vocab, (2, 64))} for _ in range(4)]
    pruned = prune(dense, SRigLConfig(sparsity=SPARSITY, distribution="uniform"), "wanda", calibration=calibration,
                   filter_fn=lambda module, name: name != "lm_head", example_inputs={"input_ids": prompt}).eval()
    lowered = lower(pruned, example_inputs={"input_ids": prompt}, progress=False)
    return {"dense": dense, "pruned": pruned, "lowered": lowered}, prompt


def generate(model, prompt: torch.Tensor, cache=None) -> torch.Tensor:
    options = {}
    if cache is not None:  # (kept across calls, so that a replayed forward keeps its recordings: reset, not new)
        cache.reset()
        options["cache"] = cache
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                              pad_token_id=0, **options)


def static_variants(lowered, prompt: torch.Tensor) -> dict:
    """The lowered model generating with a static cache, eagerly and replayed: name -> a generate() call."""
    import transformers

    cache = transformers.StaticCache(config=lowered.config, max_cache_len=PROMPT + NEW_TOKENS)

    def replayed():
        lowered.forward = graphed
        try:
            return generate(lowered, prompt, cache)
        finally:
            del lowered.forward  # (the eager variants call the model's own forward)

    graphed = cpu_graph(lowered.forward)
    return {"lowered_static": lambda: generate(lowered, prompt, cache), "lowered_graph": replayed}


def run_decoders(specs: list[DecoderSpec], config: TimerConfig) -> list[dict]:
    rows = []
    for spec in specs:
        models, prompt = build(spec)
        calls = {name: (lambda m=model: generate(m, prompt)) for name, model in models.items()}
        calls |= static_variants(models["lowered"], prompt)
        tokens = {name: call() for name, call in calls.items()}
        layers = len(dict(sparse_layers(models["pruned"])))
        times = {name: measure(call, config) for name, call in calls.items()}
        for name, time_us in times.items():
            row = {"model": spec.name, "spec": dataclasses.asdict(spec), "variant": name, "batch": BATCH,
                   "prompt": PROMPT, "new_tokens": NEW_TOKENS, "sparsity": SPARSITY, "sparse_layers": layers,
                   "time_us": time_us, "tokens_per_s": NEW_TOKENS * BATCH / (time_us["median"] / 1e6)}
            if name != "dense":
                row["speedup_vs_dense"] = times["dense"]["median"] / time_us["median"]
            if name.startswith("lowered"):
                same = torch.equal(tokens[name], tokens["pruned"])
                row["check"] = {"passed": same, "tokens_equal_pruned": same}
            rows.append(row)
            print(f"{spec.name} {name}: {row['tokens_per_s']:.1f} tokens/s", flush=True)
    return rows
