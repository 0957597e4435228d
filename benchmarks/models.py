"""The model benchmark: end-to-end latency of whole models at 90% sparsity, dense vs masked vs lowered.

    python benchmarks/run.py --only models [--quick]

Models (random weights, defined in ``srigl_compile.zoo``; nothing is downloaded): a ViT-B/16-shaped encoder
(``vit_b16``: 12 layers, width 768, 12 heads, MLP 3072; 197 tokens at 224x224) and ResNet-50 (``resnet50``,
torchvision's layer shapes). Sparsified at 90% (ViT uniform, ResNet ERK, as in the SRigL paper); "masked" is the
sparsified model in eval mode, "lowered" is ``srigl_compile.lower(masked, target="llvm")``, checked against
masked before it is timed. Inputs are 224x224 at batch 1 and 64; a batch-64 forward takes 12-30 s on 2 cores, so
this part takes ~11 minutes (``--model-inputs 1x224 64x112`` runs in ~3: the ViT then has 50 tokens).

Share of time in the sparse layers: one extra forward with forward pre/post hooks (``time.perf_counter``) on the
layers sparsify made sparse. Before = the dense model with each ``nn.MultiheadAttention`` swapped for the q/k/v/out
split the lowered model uses (``CondensedMultiheadAttention.from_attention``, dense projections), so the attention
input projection is a module of its own (``nn.MultiheadAttention`` hides it in a fused call); after = the lowered
model's lowered layers. The hooked forward's own total is reported with the share.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Callable

import torch
import torch.nn as nn
from torch.fx.experimental.optimization import fuse

from common import TimerConfig, measure

from srigl_compile import SRigLConfig, lower, sparse_layers, sparsify
from srigl_compile.nn.condensed_attention import CondensedMultiheadAttention
from srigl_compile.nn.lowered import LoweredConv, LoweredLinear
from srigl_compile.zoo import ResNet, SmallViT, resnet50, vit_b16

SPARSITY = 0.9
MAX_REL_ERR = 1e-3  # lowered vs masked, relative to the largest output: float32 sums in another order


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
            handles.append(module.register_forward_hook(
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


def build(spec: ModelSpec, resolution: int) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    dense = spec.factory(resolution).eval()
    example = (torch.randn(2, 3, resolution, resolution),)
    config = SRigLConfig(sparsity=SPARSITY, distribution=spec.distribution)
    masked = sparsify(dense, config, example_inputs=example).eval()
    models = {"dense": dense}
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in dense.modules()):
        # lower() folds BatchNorm into the layers before it; the fair dense baseline gets the same fold (torch.fx)
        models["dense_folded"] = fuse(dense)
    return {**models, "masked": masked, "lowered": lower(masked, example_inputs=example, progress=False)}


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return float((out - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def run_input(spec: ModelSpec, models: dict, batch: int, resolution: int, config: TimerConfig) -> list[dict]:
    x = torch.randn(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(batch))
    base = {"model": spec.name, "batch": batch, "resolution": resolution, "sparsity": SPARSITY,
            "threads": config.threads}
    rows = []
    with torch.no_grad():
        error = relative_error(models["lowered"](x), models["masked"](x))
        sparse_names = dense_sparse_names(models["masked"])
        shares = {"dense": hooked_share(split_attention(models["dense"]), lambda n, m: n in sparse_names, x),
                  "lowered": hooked_share(models["lowered"], lambda n, m: isinstance(m, (LoweredLinear, LoweredConv)),
                                          x)}
        for variant, model in models.items():
            row = {**base, "variant": variant}
            if variant == "lowered":
                row["check"] = {"passed": error < MAX_REL_ERR, "max_rel_err_vs_masked": error}
            if variant in shares:
                row["sparse_share"] = shares[variant]
            if row.get("check", {}).get("passed", True):  # checked before timed
                row["time_us"] = measure(lambda m=model: m(x), config)
                row["speedup_vs_dense"] = rows[0]["time_us"]["median"] / row["time_us"]["median"] if rows else 1.0
                folded = next((r for r in rows if r["variant"] == "dense_folded"), None)
                if folded is not None:
                    row["speedup_vs_dense_folded"] = folded["time_us"]["median"] / row["time_us"]["median"]
            rows.append(row)
    return rows


def run_models(specs: list[ModelSpec], config: TimerConfig, inputs=None) -> list[dict]:
    rows = []
    for spec in specs:
        built = {}
        for batch, resolution in inputs or spec.inputs:
            start = time.perf_counter()
            if resolution not in built:
                built[resolution] = build(spec, resolution)
            new = run_input(spec, built[resolution], batch, resolution, config)
            rows += new
            times = ", ".join(f"{r['variant']} {r['time_us']['median'] / 1e3:.1f} ms" for r in new)
            print(f"{spec.name} B={batch} {resolution}x{resolution}: {times} ({time.perf_counter() - start:.0f} s)")
    return rows
