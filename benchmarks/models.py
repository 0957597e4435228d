"""The model benchmark: end-to-end latency of whole models at 90% sparsity, dense vs masked vs lowered.

    python benchmarks/run.py --only models [--quick]

Models (random weights, defined in ``srigl_compile.zoo``; nothing is downloaded): a ViT-B/16-shaped encoder
(``vit_b16``: 12 layers, width 768, 12 heads, MLP 3072; 197 tokens at 224x224), ResNet-50 (``resnet50``) and
ResNet-34 (``resnet34``, basic blocks: its residual adds are in cropped 3x3 convolutions), with torchvision's layer
shapes. Sparsified at 90% (ViT uniform, ResNets ERK, as in the SRigL paper); "masked" is the
sparsified model in eval mode, "lowered" is ``srigl_compile.lower(masked, target="llvm")``, checked against
masked before it is timed. Inputs are 224x224 at batch 1 and 64; a batch-64 forward takes 12-30 s on 2 cores, so
this part took ~11 minutes with the first two models, and ResNet-34 adds ~7 (its two sizes with peers: 43 s and
378 s; ``--model-inputs 1x224 64x112`` runs in a fraction: the ViT then has 50 tokens).

Share of time in the sparse layers: one extra forward with forward pre/post hooks (``time.perf_counter``) on the
layers sparsify made sparse. Before = the dense model with each ``nn.MultiheadAttention`` swapped for the q/k/v/out
split the lowered model uses (``CondensedMultiheadAttention.from_attention``, dense projections), so the attention
input projection is a module of its own (``nn.MultiheadAttention`` hides it in a fused call); after = the lowered
model's lowered layers. The hooked forward's own total is reported with the share.

Dense at its own best thread setting: this process runs under ``OMP_WAIT_POLICY=PASSIVE`` (the lowered models need
it: spinning torch threads starve TVM's pool), which makes every small torch op wake its threads and slowed dense
ResNet-50 at batch 1 from ~82 to ~157 ms. So the dense (and BN-folded dense) models are also timed in child
processes under each of ``DENSE_THREAD_SETTINGS`` (``python benchmarks/models.py --dense-child ...``), and the
fastest of every dense time is the "best dense" the lowered model is compared with.

Peers (``--peers``, ``benchmarks/peers.py``; the ``[peers]`` extra): ONNX Runtime and OpenVINO (f32 and its default
precision) on the dense model and on the masked model's weights baked into a plain dense copy, each in its own
process with the same threads, checked against torch's output. The lowered row then also gets
``speedup_vs_fastest_dense_f32``: over the fastest dense f32 runtime of all (torch under every setting, ONNX
Runtime, OpenVINO f32). A runtime not installed gives a row with ``skipped`` saying so.

Dense compiled (``--dense-compiled``): each dense child also times ``dense_compiled``, the dense model under
``torch.compile`` (inductor, freezing); it counts as a dense f32 runtime like the others.

bf16 values (``--bf16-values``): the masked model is also lowered with bfloat16 condensed values
(``LlvmConfig(value_dtype=torch.bfloat16)``; activations and sums stay float32) as ``lowered_bf16``, checked
against the masked model within the peers' reduced-precision tolerance and timed like ``lowered``; with
``--peers`` its row gets ``speedup_vs_fastest_dense_reduced``: over the fastest dense runtime in a reduced precision
(OpenVINO's default, bf16 on CPUs with AMX or AVX512-BF16), issue 19's bf16 target.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from torch.fx.experimental.optimization import fuse

from common import TimerConfig, measure
from layer_efficiency import layer_efficiency
from peers import REDUCED_MAX_REL_ERR

from srigl_compile import SRigLConfig, cpu_graph, lower, sparse_layers, sparsify
from srigl_compile.codegen.backends.llvm import LlvmConfig
from srigl_compile.nn.condensed_attention import CondensedMultiheadAttention
from srigl_compile.nn.settle import settle
from srigl_compile.nn.dense_fallback import dense_path_layers
from srigl_compile.nn.lowered import LoweredConv, LoweredLinear
from srigl_compile.zoo import ResNet, SmallViT, resnet34, resnet50, vit_b16

SPARSITY = 0.9
MAX_REL_ERR = 1e-3  # lowered vs masked, relative to the largest output: float32 sums in another order
# the lowered variants and their tolerance against the masked model: bf16 values keep 8 bits of mantissa, as the
# peers' reduced precisions do, and get their tolerance (measured 5e-3 on ResNet-50 and ViT-B/16)
# lowered_graph: the lowered model under cpu_graph (its forward recorded, then replayed without Python)
LOWERED = {"lowered": MAX_REL_ERR, "lowered_graph": MAX_REL_ERR, "lowered_bf16": REDUCED_MAX_REL_ERR}
# Environments the dense models are also timed under, each in a fresh process (libgomp reads them at start):
# its default (threads spin ~300k times before sleeping) and short spins.
DENSE_THREAD_SETTINGS = {"default_omp": {}, "gomp_spin_20k": {"GOMP_SPINCOUNT": "20000"}}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    title: str
    factory: Callable[[int], nn.Module]  # input resolution -> model (a ViT's position table depends on it)
    distribution: str
    inputs: tuple[tuple[int, int], ...]  # (batch, resolution)


MODELS = {
    "vit_b16": ModelSpec("vit_b16", "ViT-B/16-shaped encoder", lambda res: vit_b16((3, res, res), 1000), "uniform",
                         ((1, 224), (64, 224))),
    "resnet50": ModelSpec("resnet50", "ResNet-50", lambda res: resnet50((3, res, res), 1000), "erk",
                          ((1, 224), (64, 224))),
    "resnet34": ModelSpec("resnet34", "ResNet-34", lambda res: resnet34((3, res, res), 1000), "erk",
                          ((1, 224), (64, 224))),
}
QUICK_MODELS = {
    "tiny_vit": ModelSpec("tiny_vit", "tiny ViT (2 layers, width 32)", lambda res: SmallViT(
        (3, res, res), 10, patch=4, dim=32, depth=2, heads=2, mlp_dim=64), "uniform", ((1, 16), (3, 16))),
    "tiny_resnet": ModelSpec("tiny_resnet", "tiny bottleneck ResNet (1 block a stage, width 8)",
                             lambda res: ResNet(10, blocks=(1, 1, 1, 1), width=8), "erk", ((1, 32), (3, 32))),
}


def split_attention(model: nn.Module) -> nn.Module:
    """A copy with each nn.MultiheadAttention as separate q/k/v/out Linear modules (same outputs)."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.MultiheadAttention):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, CondensedMultiheadAttention.from_attention(module, name))
    return model.eval()


def dense_sparse_names(masked: nn.Module) -> set[str]:
    """The split dense model's modules at the masked model's sparse layers (a packed in_proj is q, k and v)."""
    names = set()
    for name, _ in sparse_layers(masked):
        prefix, _, leaf = name.rpartition(".")
        names |= {f"{prefix}.{p}" for p in ("q_proj", "k_proj", "v_proj")} if leaf == "in_proj" else {name}
    return names


def hooked_share(model: nn.Module, is_sparse: Callable[[str, nn.Module], bool], x: torch.Tensor) -> dict:
    """Time in the selected modules over the total of one forward (hooks on those modules only)."""
    spent, starts, handles = [0.0], [], []
    for name, module in model.named_modules():
        if is_sparse(name, module):
            handles.append(module.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter())))
            handles.append(nn.Module.register_forward_hook(module,
                lambda *_: spent.__setitem__(0, spent[0] + time.perf_counter() - starts.pop())))
    try:
        start = time.perf_counter()
        model(x)
        total = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    return {"layers": len(handles) // 2, "sparse_ms": spent[0] * 1e3, "total_ms": total * 1e3,
            "share": spent[0] / total}


def build_dense(spec: ModelSpec, resolution: int) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    dense = spec.factory(resolution).eval()
    models = {"dense": dense}
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in dense.modules()):
        # lower() folds BatchNorm into the layers before it; the fair dense baseline gets the same fold (torch.fx)
        models["dense_folded"] = fuse(dense)
    return models


def build(spec: ModelSpec, resolution: int, bf16_values: bool = False) -> dict[str, nn.Module]:
    models = build_dense(spec, resolution)
    example = (torch.randn(2, 3, resolution, resolution),)
    config = SRigLConfig(sparsity=SPARSITY, distribution=spec.distribution)
    masked = sparsify(models["dense"], config, example_inputs=example).eval()
    lowered = lower(masked, example_inputs=example, progress=False)
    models.update(masked=masked, lowered=lowered, lowered_graph=cpu_graph(lowered))
    if bf16_values:
        models["lowered_bf16"] = lower(masked, LlvmConfig(value_dtype=torch.bfloat16, progress=False),
                                       example_inputs=example)
    return models


def time_dense_in_child(spec: ModelSpec, batch: int, resolution: int, config: TimerConfig,
                        setting: str, compiled: bool = False) -> dict[str, dict]:
    """{variant: time_us} of the dense models, timed in a fresh process under ``DENSE_THREAD_SETTINGS[setting]``
    (and without this process's OMP_WAIT_POLICY); ``compiled``: with ``dense_compiled`` too (``_dense_child``)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(DENSE_THREAD_SETTINGS[setting])
    command = [sys.executable, str(Path(__file__).resolve()), "--dense-child", spec.name, str(batch), str(resolution),
               json.dumps(dataclasses.asdict(config))] + (["--compiled"] if compiled else [])
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return float((out - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def run_input(spec: ModelSpec, models: dict, batch: int, resolution: int, config: TimerConfig,
              peer_sources: dict | None = None, peer_folder: Path | None = None,
              dense_compiled: bool = False) -> list[dict]:
    x = torch.randn(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(batch))
    base = {"model": spec.name, "batch": batch, "resolution": resolution, "sparsity": SPARSITY,
            "threads": config.threads}
    rows = []
    with torch.no_grad():
        expected = models["masked"](x)
        errors = {variant: relative_error(models[variant](x), expected) for variant in LOWERED if variant in models}
        sparse_names = dense_sparse_names(models["masked"])
        shares = {"dense": hooked_share(split_attention(models["dense"]), lambda n, m: n in sparse_names, x),
                  "lowered": hooked_share(models["lowered"], lambda n, m: isinstance(m, (LoweredLinear, LoweredConv)),
                                          x)}
        for variant, model in models.items():
            row = {**base, "variant": variant}
            if variant in LOWERED:
                row["check"] = {"passed": errors[variant] < LOWERED[variant], "max_rel_err_vs_masked": errors[variant],
                                "tolerance_rel": LOWERED[variant]}
            if variant in shares:
                row["sparse_share"] = shares[variant]
            if row.get("check", {}).get("passed", True):  # checked before timed
                if variant in LOWERED:  # (its layers' trials at this shape end before it is timed)
                    settle(model, x)
                row["time_us"] = measure(lambda m=model: m(x), config)
                if variant in LOWERED:  # what was timed: each layer's path as its first calls chose it (or dense)
                    as_timed = relative_error(model(x), expected)
                    row["check"].update(passed=as_timed < LOWERED[variant], max_rel_err_as_timed=as_timed,
                                        dense_path_layers=dense_path_layers(model))
                if variant == "lowered_graph":  # the storage its recording keeps alive (parameters included)
                    row["held_bytes"] = model.held_bytes
                if variant == "lowered":  # each layer's time and GFLOP/s against the sgemm peak
                    row["kernel_efficiency"] = layer_efficiency(model, x, forwards=5 if batch <= 8 else 2)
                row["speedup_vs_dense"] = rows[0]["time_us"]["median"] / row["time_us"]["median"] if rows else 1.0
                folded = next((r for r in rows if r["variant"] == "dense_folded"), None)
                if folded is not None:
                    row["speedup_vs_dense_folded"] = folded["time_us"]["median"] / row["time_us"]["median"]
            rows.append(row)
    rows += best_dense_rows(spec, rows, base, batch, resolution, config, dense_compiled)
    if peer_sources is not None:
        rows += peer_model_rows(models, rows, peer_sources, x, base, config, peer_folder)
    return rows


def peer_model_rows(models: dict, rows: list[dict], sources: dict, x: torch.Tensor, base: dict,
                    config: TimerConfig, folder: Path) -> list[dict]:
    """ONNX Runtime and OpenVINO on the dense and the masked model (``peers.peer_rows``), the lowered model's ratio
    to the fastest dense f32 runtime of all, and (with bf16 values) ``lowered_bf16``'s to the fastest dense runtime
    in a reduced precision."""
    from peers import fastest_dense_f32, fastest_dense_reduced, peer_rows

    with torch.no_grad():
        expected = {"dense": models["dense"](x), "masked": models["masked"](x)}
    dense_us = next(r["time_us"]["median"] for r in rows if r["variant"] == "dense" and "time_us" in r)
    new = peer_rows(sources, x, expected, base, config, folder, dense_us=dense_us)
    timed = {r["variant"]: r for r in rows if r["variant"] in LOWERED and "time_us" in r}
    fastest_f32 = fastest_dense_f32(rows + new)
    for variant, fastest, name in (("lowered", fastest_f32, "f32"), ("lowered_graph", fastest_f32, "f32"),
                                   ("lowered_bf16", fastest_dense_reduced(new), "reduced")):
        if variant in timed and fastest is not None:
            timed[variant][f"fastest_dense_{name}"] = {"variant": fastest[0], "median_us": fastest[1]}
            timed[variant][f"speedup_vs_fastest_dense_{name}"] = fastest[1] / timed[variant]["time_us"]["median"]
    return new


def best_dense_rows(spec: ModelSpec, rows: list[dict], base: dict, batch: int, resolution: int,
                    config: TimerConfig, dense_compiled: bool = False) -> list[dict]:
    """The dense models timed under each other thread setting, and the lowered model's ratio to the fastest dense
    time of all (``speedup_vs_best_dense``, ``best_dense``: which variant and setting)."""
    timed = {(r["variant"], "passive"): r["time_us"]["median"] for r in rows
             if r["variant"].startswith("dense") and "time_us" in r}
    extra = []
    for setting in DENSE_THREAD_SETTINGS:
        for variant, time_us in time_dense_in_child(spec, batch, resolution, config, setting, dense_compiled).items():
            extra.append({**base, "variant": f"{variant}@{setting}", "time_us": time_us})
            timed[(variant, setting)] = time_us["median"]
    (variant, setting), best = min(timed.items(), key=lambda item: item[1])
    for lowered in (r for r in rows if r["variant"] in ("lowered", "lowered_graph") and "time_us" in r):
        lowered["best_dense"] = {"variant": variant, "setting": setting, "median_us": best}
        lowered["speedup_vs_best_dense"] = best / lowered["time_us"]["median"]
    return extra


def export_peer_sources(models: dict, resolution: int, folder: Path) -> dict:
    """The dense model and the masked model (masks baked into a plain dense copy) as ONNX, once per resolution."""
    from peers import bake_masks, export_sources

    example = torch.randn(2, 3, resolution, resolution)
    baked = bake_masks(models["masked"], models["dense"])
    return export_sources({"dense": models["dense"], "masked": baked}, example, folder)


def run_models(specs: list[ModelSpec], config: TimerConfig, inputs=None, peers: bool = False,
               bf16_values: bool = False, dense_compiled: bool = False) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="srigl_peers_") as tmp:
        for spec in specs:
            built, sources = {}, {}
            for batch, resolution in inputs or spec.inputs:
                start = time.perf_counter()
                if resolution not in built:
                    built[resolution] = build(spec, resolution, bf16_values)
                    if peers:
                        folder = Path(tmp) / f"{spec.name}_{resolution}"
                        folder.mkdir()
                        sources[resolution] = (export_peer_sources(built[resolution], resolution, folder), folder)
                peer_sources, peer_folder = sources.get(resolution, (None, None))
                new = run_input(spec, built[resolution], batch, resolution, config, peer_sources, peer_folder,
                                dense_compiled)
                rows += new
                times = ", ".join(f"{r['variant']} {r['time_us']['median'] / 1e3:.1f} ms" for r in new
                                  if "time_us" in r)
                print(f"{spec.name} B={batch} {resolution}x{resolution}: {times} "
                      f"({time.perf_counter() - start:.0f} s)")
                for r in new:
                    if "skipped" in r:
                        print(f"  {r['variant']} skipped: {r['skipped']}")
            built.clear()
    return rows


def _dense_child(argv: list[str]) -> None:
    """``--dense-child NAME BATCH RESOLUTION CONFIG_JSON [--compiled]``: print {variant: time_us} of the dense
    models; ``--compiled``: also ``dense_compiled``, the BN-folded (else plain) dense model under
    ``torch.compile`` (inductor, with ``freezing``: weights as constants, convolution weights prepacked, as for
    inference), timed after its first calls compiled it and only if it matches the eager dense model."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--dense-child", nargs=4, required=True)
    parser.add_argument("--compiled", action="store_true")
    parsed = parser.parse_args(argv)
    name, batch, resolution, config = parsed.dense_child
    config = TimerConfig(**json.loads(config))
    from common import set_threads

    set_threads(config.threads)
    spec = {**MODELS, **QUICK_MODELS}[name]
    x = torch.randn(int(batch), 3, int(resolution), int(resolution), generator=torch.Generator().manual_seed(0))
    models = build_dense(spec, int(resolution))
    with torch.no_grad():
        times = {variant: measure(lambda m=model: m(x), config) for variant, model in models.items()}
        if parsed.compiled:
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True
            compiled = torch.compile(models.get("dense_folded", models["dense"]))
            error = relative_error(compiled(x), models["dense"](x))
            if error < 1e-4:
                times["dense_compiled"] = measure(lambda: compiled(x), config)
            else:
                print(f"dense_compiled left out: relative error {error:.2e} against eager", file=sys.stderr)
    print(json.dumps(times))


if __name__ == "__main__":
    _dense_child(sys.argv[1:])
