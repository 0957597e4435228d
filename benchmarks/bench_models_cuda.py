"""Whole models on an NVIDIA GPU: dense fp16 against srigl_compile's lowered fp16 at 90%, in CUDA graphs.

On the GPU machine (runtime-only TVM, kernels prebuilt here by scripts/build_gpu_bundle.py):

    bash .gpu_bundle/run.sh python3 benchmarks/bench_models_cuda.py --out "$OUT"

Models (random weights; nothing downloaded):
- ``vit_b16``: the ViT-B/16-shaped encoder of the CPU benchmark (``srigl_compile.zoo.vit_b16``, 224x224, 197
  tokens), 90% uniform as the paper trains ViT; one forward at batch 1 and 64.
- ``llama_7b_<n>``: ``gpu_decoder.Decoder`` with Llama-2-7B's shapes (hidden 4096, MLP 11008, 32 heads,
  vocabulary 32000) and ``--decoder-layers`` blocks; every block projection at 90% uniform, the output head dense
  (as pruned LLMs keep it). One greedy decode step (a token for each sequence after a 16-token prompt, the
  key/value cache in place) at batch 1 and 16; tokens/s = batch / step time.

Each model runs dense (the original weights in fp16), and lowered (``lower(target="cuda", dtype=float16)``); both
are timed as replays of a captured CUDA graph (``common.cuda_graph_samples_us``: medians with quartiles). Before
timing, the lowered model's output is checked against the masked model run by torch in float32 (TF32 off):
relative error = largest |difference| / largest |reference|, at most 2e-2 (fp16 values and activations).
Each row also reports the bytes of the model's parameters and buffers, dense fp16 against lowered. Rows are
written to ``OUT/models_cuda.json`` as each model finishes (GPU, versions, command), and a markdown table.

``--build-kernels DIR`` (any machine with TVM and nvcc, no GPU) lowers the same layer shapes for sm_90 (one block
of each model: every block has the same shapes and k) and writes their kernels to DIR instead of timing.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from common import cuda_graph_time_us, environment, no_tf32  # noqa: E402
from gpu_decoder import Decoder, DecoderShape, example_inputs, new_cache  # noqa: E402

from srigl_compile import SRigLConfig, lower, sparsify  # noqa: E402
from srigl_compile.zoo import vit_b16  # noqa: E402

SPARSITY = 0.9
BUILD_TARGET = {"kind": "cuda", "arch": "sm_90"}  # H100 / H200: what the GPU machine lends
PROMPT = 16
TOLERANCE = 2e-2


def vit_models(depth: int | None = None) -> tuple[nn.Module, nn.Module, tuple]:
    """(dense, masked, example inputs) of the ViT-B/16-shaped encoder; ``depth`` fewer blocks (kernel builds)."""
    torch.manual_seed(0)
    dense = vit_b16((3, 224, 224), 1000).eval()
    if depth is not None:
        dense.encoder.layers = dense.encoder.layers[:depth]
        dense.encoder.num_layers = depth
    example = (torch.randn(2, 3, 224, 224),)
    masked = sparsify(dense, SRigLConfig(sparsity=SPARSITY, distribution="uniform"), example_inputs=example)
    return dense, masked.eval(), example


def decoder_models(layers: int) -> tuple[nn.Module, nn.Module, tuple]:
    """(dense, masked, example inputs) of the Llama-shaped decoder; every block projection sparse, lm_head dense."""
    torch.manual_seed(0)
    shape = DecoderShape.llama_7b(layers, max_len=PROMPT + 16)
    dense = Decoder(shape).eval()
    example = example_inputs(shape)
    masked = sparsify(dense, SRigLConfig(sparsity=SPARSITY, distribution="uniform"), example_inputs=example,
                      filter_fn=lambda module, name: name != "lm_head")
    return dense, masked.eval(), example


def build_handles() -> list:
    """Lower one block of each model for sm_90 in fp16 (no GPU needed); returns their CUDA kernel handles."""
    from srigl_compile.nn.lowered import LoweredConv, LoweredLinear
    from srigl_compile.runtime.registry import get_handle

    handles = []
    for _, masked, example in (vit_models(depth=1), decoder_models(layers=1)):
        lowered = lower(masked, target=BUILD_TARGET, dtype=torch.float16, example_inputs=example, progress=False)
        handles += [get_handle(m.kernel_key) for m in lowered.modules()
                    if isinstance(m, (LoweredLinear, LoweredConv)) and m.n_active]
    return handles


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def timing(fn, calls: int, repeats: int) -> dict[str, float]:
    return {key.replace("_us", "_ms"): value / 1e3 for key, value in cuda_graph_time_us(fn, calls, repeats).items()}


def relative_error(got: torch.Tensor, expected: torch.Tensor, what: str) -> float:
    error = float((got.float() - expected.float()).abs().max() / expected.float().abs().max())
    if not error <= TOLERANCE:  # (NaN fails too)
        raise AssertionError(f"{what}: lowered fp16 against the masked model in fp32, relative error {error:.2e}")
    return error


def vit_rows(batches: list[int], repeats: int) -> list[dict]:
    dense, masked, example = vit_models()
    lowered = lower(masked, target="cuda", dtype=torch.float16, example_inputs=example, progress=False)
    dense16, reference = copy.deepcopy(dense).half().cuda(), masked.cuda()
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, 224, 224, device="cuda")
        x16 = x.half()
        with torch.no_grad():
            with no_tf32():
                expected = reference(x)
            error = relative_error(lowered(x16), expected, f"vit_b16 at batch {batch}")
            calls = 5 if batch == 1 else 1
            times = {name: timing(lambda m=model: m(x16), calls, repeats)
                     for name, model in (("dense_fp16", dense16), ("lowered_fp16", lowered))}
        rows.append(row("vit_b16", batch, times, error, dense16, lowered))
    return rows


def decoder_rows(layers: int, batches: list[int], repeats: int) -> list[dict]:
    dense, masked, example = decoder_models(layers)
    shape = dense.shape
    lowered = lower(masked, target="cuda", dtype=torch.float16, example_inputs=example, progress=False)
    dense16, reference = copy.deepcopy(dense).half().cuda(), masked.cuda()
    name, rows = f"llama_7b_{layers}", []
    for batch in batches:
        prompt = torch.randint(0, shape.vocab, (batch, PROMPT), device="cuda")
        start = torch.zeros(1, dtype=torch.long, device="cuda")
        with torch.no_grad():
            with no_tf32():
                expected = reference(prompt, start, new_cache(shape, batch, torch.float32, "cuda"))
            error = relative_error(lowered(prompt, start, new_cache(shape, batch, torch.float16, "cuda")), expected,
                                   f"{name} at batch {batch}")
            times = {}
            for label, model in (("dense_fp16", dense16), ("lowered_fp16", lowered)):
                cache = new_cache(shape, batch, torch.float16, "cuda")
                model(prompt, start, cache)  # the prompt's keys and values
                token, position = prompt[:, -1:].clone(), torch.full((1,), PROMPT, device="cuda")
                # each replay writes the same cache slot: the step's work, not a growing sequence
                times[label] = timing(lambda m=model, c=cache, t=token, p=position: m(t, p, c), 5, repeats)
        result = row(name, batch, times, error, dense16, lowered)
        result["tokens_per_s"] = {label: batch / (t["median_ms"] / 1e3) for label, t in times.items()}
        rows.append(result)
    return rows


def row(model: str, batch: int, times: dict, error: float, dense16: nn.Module, lowered: nn.Module) -> dict:
    speedup = times["dense_fp16"]["median_ms"] / times["lowered_fp16"]["median_ms"]
    print(f"{model} batch {batch}: dense fp16 {times['dense_fp16']['median_ms']:.3f} ms, lowered fp16 "
          f"{times['lowered_fp16']['median_ms']:.3f} ms ({speedup:.2f}x), relative error {error:.1e}", flush=True)
    return {"model": model, "batch": batch, "times": times, "speedup": speedup, "rel_error": error,
            "dense_bytes": model_bytes(dense16), "lowered_bytes": model_bytes(lowered)}


def markdown(rows: list[dict]) -> str:
    lines = ["| model | batch | dense fp16 ms | lowered fp16 ms | speed-up | tokens/s dense / lowered "
             "| bytes lowered / dense | rel. error |", "|" + "---|" * 8]
    for r in rows:
        tokens = r.get("tokens_per_s")
        per_s = f"{tokens['dense_fp16']:.0f} / {tokens['lowered_fp16']:.0f}" if tokens else "-"
        lines.append(f"| {r['model']} | {r['batch']} | {r['times']['dense_fp16']['median_ms']:.3f} | "
                     f"{r['times']['lowered_fp16']['median_ms']:.3f} | {r['speedup']:.2f}x | {per_s} | "
                     f"{r['lowered_bytes'] / r['dense_bytes']:.1%} | {r['rel_error']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=["vit_b16", "decoder"], default=["decoder", "vit_b16"])
    parser.add_argument("--vit-batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--decoder-batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--decoder-layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--build-kernels", type=Path, help="build the kernels for sm_90 into this folder; no timing")
    args = parser.parse_args(argv)
    if args.build_kernels:
        from srigl_compile.runtime.kernel_io import export_kernels

        handles = build_handles()
        export_kernels(handles, args.build_kernels)
        return print(f"wrote {len({h.key for h in handles})} CUDA kernels to {args.build_kernels}")
    if not torch.cuda.is_available():
        raise SystemExit("bench_models_cuda needs a CUDA GPU (this machine has none); --build-kernels works anywhere")
    env = environment() | {"timing": "CUDA graph replays", "gpu": torch.cuda.get_device_name(),
                           "cuda": torch.version.cuda, "capability": "sm_%d%d" % torch.cuda.get_device_capability(),
                           "command": " ".join(sys.argv)}
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in args.models:  # (rows saved after each model: a run cut short keeps what it measured)
        rows += (decoder_rows(args.decoder_layers, args.decoder_batches, args.repeats) if model == "decoder"
                 else vit_rows(args.vit_batches, args.repeats))
        (args.out / "models_cuda.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
        (args.out / "models_cuda.md").write_text(markdown(rows) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
