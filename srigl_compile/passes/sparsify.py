"""SparsifyPass: turn a model's Linear / Conv / attention-projection weights into constant-fan-in masked layers.

Contract.
    requires: the model has no masked layer yet and no parameter on the meta device; its graph can be captured
              (symbolic_trace or torch.export).
    ensures:  every planned layer is a masked module whose active neurons all have exactly k0 inputs and whose
              masked weights are exactly zero; every other module, and the model's class, is unchanged.

Initialisation (SRIGL_SPEC §2.4). Each neuron gets k0 random inputs from a ``torch.Generator(seed)``. With
``reinit`` the active weights are redrawn from N(0, std^2) with std = sqrt(2 / k0): the sparse Kaiming rule of
Evci et al. (2022) the paper cites, i.e. variance 2 / (sparse fan-in). The reference passes 2 / k as the *std*,
which for k = 76 gives 0.026 instead of 0.162; we implement the method as described, not that slip.
"""

from __future__ import annotations

import copy
import math
import re

import torch
import torch.nn as nn

from .._warnings import warn_user
from ..config import Distribution, SRigLConfig, TooSmallPolicy
from ..errors import ConfigError, LayerError
from ..nn.condensed import CondensedConv, CondensedLinear
from ..nn.condensed_attention import CondensedMultiheadAttention
from ..nn.masked import LayerPlan, is_masked, make_masked_, mask_attention_projection_
from ..sparsity import check_constant_fan_in, erk_densities, layer_budget, random_fan_in_mask, uniform_densities
from .analysis import GRAPH, Analyses
from .as_linear import AsLinearPass, conv1d_restored_on_error
from .base import Pass, PassResult
from .discover import FilterFn, LayerCandidate, discover_layers
from .manager import PassManager

__all__ = ["SparsifyPass", "plan_layers", "sparsify", "sparse_layers"]


def _matches(pattern: str, name: str) -> bool:
    return pattern == name or re.fullmatch(pattern, name) is not None


def check_no_ablation(config: SRigLConfig, names: list[str]) -> None:
    """Every ``config.no_ablation`` entry names (or fully matches) a sparsifiable layer."""
    for pattern in config.no_ablation:
        if not any(_matches(pattern, n) for n in names):
            raise ConfigError(f"SRigLConfig.no_ablation entry {pattern!r} matches no sparsifiable layer; layers: "
                              f"{names}")


def is_protected(config: SRigLConfig, candidate: LayerCandidate) -> bool:
    """Whether a layer's neurons are never ablated: the output layer, and ``config.no_ablation``'s layers."""
    return candidate.is_last or any(_matches(p, candidate.name) for p in config.no_ablation)


def _fixed_densities(candidates: list[LayerCandidate], config: SRigLConfig) -> dict[str, float]:
    """Layers whose density is not left to the distribution: overrides, then keep_first/last_dense."""
    names = [c.name for c in candidates]
    for key in config.overrides:
        if not any(_matches(key, n) for n in names):
            raise ConfigError(f"SRigLConfig.overrides key {key!r} matches no sparsifiable layer; layers: {names}")
    check_no_ablation(config, names)
    fixed = {}
    for c in candidates:
        matched, sparsity = config.override_for(c.name)
        if matched:
            fixed[c.name] = 1.0 if sparsity is None else 1.0 - sparsity
        elif (config.keep_first_dense and c.is_first) or (config.keep_last_dense and c.is_last):
            fixed[c.name] = 1.0
    return fixed


def plan_layers(candidates: list[LayerCandidate], config: SRigLConfig) -> list[tuple[LayerCandidate, LayerPlan]]:
    """Per-layer density, budget floor(N d) and k0 = floor(budget / n_out); dense layers are left out."""
    shapes = {c.name: c.shape for c in candidates}
    fixed = _fixed_densities(candidates, config)
    if config.distribution is Distribution.ERK:
        densities = erk_densities(shapes, config.density, fixed, config.erk_power)
    else:
        densities = uniform_densities(shapes, config.density, fixed)
    plans, kept_dense = [], []
    for c in candidates:
        density = densities[c.name]
        if density >= 1.0:
            continue
        budget = layer_budget(c.numel, density)
        k0 = budget // c.n_out
        if k0 < 1:
            if config.too_small is TooSmallPolicy.DENSE:
                kept_dense.append(c.name)
                continue
            raise LayerError(
                f"layer {c.name!r} ({c.n_out} neurons x fan-in {c.fan_in}) gets a budget of {budget} non-zeros at "
                f"density {density:.4f}, so its constant fan-in k would be 0. Lower the sparsity, widen the layer, "
                f"keep it dense with overrides={{{c.name!r}: None}} (CLI: --dense {c.name}), or set "
                f"too_small='dense' (CLI: --too-small dense)."
            )
        plans.append((c, LayerPlan(c.name, c.kind, c.n_out, c.fan_in, density, budget, k0, is_protected(config, c))))
    if kept_dense:  # (said, not silent: the density reports count sparse layers only)
        warn_user(f"too_small='dense': layers {kept_dense[:8]} would get a constant fan-in of 0 at their density, "
                  "so they stay dense (the sparsity and density figures count the sparse layers only)")
    return plans


class SparsifyPass(Pass):
    """Rewrite the planned layers of a model (in place) into masked layers with random constant-fan-in masks.

    Subclasses choose the masks otherwise (``passes/prune.py``): ``plan`` the layers, ``prepare`` from the model
    before anything changes, and give each layer its ``initial_mask``; ``reinit`` says whether kept weights are
    redrawn.
    """

    def __init__(self, config: SRigLConfig, filter_fn: FilterFn | None = None, example_inputs=None) -> None:
        self.config = config
        self.filter_fn = filter_fn
        self.example_inputs = example_inputs
        self.reinit = config.reinit

    def plan(self, candidates: list[LayerCandidate]) -> list[tuple[LayerCandidate, LayerPlan]]:
        return plan_layers(candidates, self.config)

    def prepare(self, model: nn.Module, plans: list[tuple[LayerCandidate, LayerPlan]]) -> None:
        """Read what the masks need from the unchanged model (raise here, before any layer is rewritten)."""

    def initial_mask(self, candidate: LayerCandidate, plan: LayerPlan, generator: torch.Generator) -> torch.Tensor:
        """The layer's mask as a bool neuron view [n_out, fan_in]."""
        return random_fan_in_mask(plan.n_out, plan.fan_in, plan.k0, generator)

    def requires(self, model: nn.Module) -> None:
        condensed = [name or type(m).__name__ for name, m in model.named_modules()
                     if isinstance(m, (CondensedLinear, CondensedConv, CondensedMultiheadAttention))]
        if condensed:  # (its other layers would be sparsified beside them, and lower() would take the mix)
            raise LayerError(f"the model is already condensed or lowered (layers {condensed[:5]}): sparsify, prune "
                             "or import the dense or masked model it came from")
        already = [name for name, m in model.named_modules() if is_masked(m)]
        if already:
            raise LayerError(f"model is already sparsified (masked layers: {already[:5]}); sparsify it only once")
        lazy = [name for name, p in model.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)]
        if lazy:  # (their shapes are unknown: the layer discovery failed on them with torch's load_state_dict hint)
            raise LayerError(f"parameters {lazy[:3]} are uninitialized (a lazy module, e.g. nn.LazyLinear): run one "
                             "forward pass on an example input first, so that they get their shapes, then sparsify")
        on_meta = [name for name, p in model.named_parameters() if p.is_meta]
        if on_meta:
            raise LayerError(f"parameters {on_meta[:3]} are on the meta device (no values to draw masks over): "
                             "materialize the model first, e.g. model.to_empty(device='cpu') and initialize it")

    def call(self, model: nn.Module, analyses: Analyses) -> PassResult:
        candidates = discover_layers(model, analyses.get(GRAPH, model), self.filter_fn)
        if not candidates:
            raise LayerError(
                f"{type(model).__name__} has no layer sparsify can mask (Linear, Conv1d/2d/3d, MultiheadAttention "
                "used by the forward and not tied or filtered out); see the warnings above for the layers it skipped"
            )
        self.plans = self.plan(candidates)
        if not self.plans and type(self).plan is SparsifyPass.plan:
            names = [c.name for c in candidates][:5]
            warn_user(f"sparsify left every layer of {type(model).__name__} dense (layers {names}: kept dense by "
                      "keep_first_dense / keep_last_dense / overrides / too_small, or at density 1 in the "
                      "distribution): nothing will be sparse")
        self.prepare(model, self.plans)
        generator = torch.Generator().manual_seed(self.config.seed)
        for candidate, plan in self.plans:
            mask = self.initial_mask(candidate, plan, generator)
            if self.reinit:
                std = math.sqrt(2.0 / plan.k0)
                values = torch.randn(plan.n_out, plan.fan_in, generator=generator) * std
                with torch.no_grad():
                    weight = getattr(candidate.owner, candidate.param_name)
                    weight.copy_(values.view(weight.shape).to(weight))
            if candidate.kind == "attention":
                mask_attention_projection_(candidate.owner, candidate.param_name, plan, mask)
            else:
                make_masked_(candidate.owner, plan, mask)
        return PassResult(model, modified=bool(self.plans))

    def ensures(self, result: PassResult) -> None:
        planned = {plan.name: plan for _, plan in self.plans}
        for name, layer in sparse_layers(result.module):
            plan = planned.pop(layer.srigl_plan.name, None)
            if plan is None:
                raise LayerError(f"layer {name!r} is masked but was not planned")
            k, ablated = check_constant_fan_in(layer.neuron_view(layer.mask), layer=name)
            n_active = plan.n_out - int(ablated.sum())
            if (plan.protected and ablated.any()) or n_active == 0 or k != plan.budget // n_active:
                raise LayerError(f"layer {name!r}: {n_active} active neurons of fan-in {k} do not fit its plan "
                                 f"(budget {plan.budget}, protected {plan.protected})")
            if (layer.weight.detach()[~layer.mask] != 0).any():
                raise LayerError(f"layer {name!r}: masked weights are not zero after sparsify")
        if planned:
            raise LayerError(f"planned layers {sorted(planned)} were not masked")


def sparse_layers(model: nn.Module):
    """Yield ``(name, module)`` for every masked layer of ``model``, in module order.

    Example:
        >>> for name, layer in sparse_layers(model):  # doctest: +SKIP
        ...     print(name, layer.mask.float().mean())
    """
    for name, module in model.named_modules():
        if is_masked(module):
            yield name, module


def check_no_torch_pruning(model: nn.Module) -> None:
    """Refuse layers pruned by ``torch.nn.utils.prune`` and not made permanent: their weight is recomputed from
    ``weight_orig * weight_mask`` before each forward (a hook), so it is no parameter to mask, and a deepcopy of
    the model fails in torch.

    Raises:
        LayerError: naming the layers and ``torch.nn.utils.prune.remove``.
    """
    from torch.nn.utils.prune import BasePruningMethod

    pruned = [name or type(model).__name__ for name, m in model.named_modules()
              if any(isinstance(hook, BasePruningMethod) for hook in m._forward_pre_hooks.values())]
    if pruned:
        raise LayerError(f"layers {pruned[:5]} are pruned by torch.nn.utils.prune and not made permanent (their weight "
                         "is weight_orig * weight_mask, recomputed before each forward): call "
                         "torch.nn.utils.prune.remove(layer, 'weight') on each first; from_sparse_weights then takes "
                         "their zeros as the masks")


def sparsify(model: nn.Module, config: SRigLConfig | None = None, *, filter_fn: FilterFn | None = None,
             example_inputs=None, inplace: bool = False) -> nn.Module:
    """Return ``model`` with its Linear / Conv / attention projections as constant-fan-in masked layers.

    Args:
        model: any nn.Module. It keeps its class and interface (a Hugging Face model stays that model). Hugging
            Face ``Conv1D`` layers (GPT-2) become ``nn.Linear`` first (``passes/as_linear.py``): same names and
            outputs, weights stored transposed as [out, in].
        config: SRigLConfig (defaults to ``SRigLConfig()``: 90% sparse, ERK).
        filter_fn: ``filter_fn(module, layer_name) -> bool``; False keeps that layer dense.
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs. Needed only when
            ``torch.fx.symbolic_trace`` fails (Hugging Face models, nn.TransformerEncoder): torch.export then
            captures the graph from them.
        inplace: rewrite ``model`` itself instead of a deep copy.

    Raises:
        ConfigError: a bad config field, or an override naming no layer.
        LayerError: a layer whose constant fan-in k would be 0 (unless ``too_small='dense'``).
        TraceError: neither symbolic_trace nor torch.export could capture the graph.

    Example:
        >>> import torch.nn as nn
        >>> net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        >>> sparse = sparsify(net, SRigLConfig(sparsity=0.9, distribution="uniform"))
        >>> [(name, int(layer.mask[0].sum())) for name, layer in sparse_layers(sparse)]
        [('0', 6), ('2', 12)]
    """
    config = config if config is not None else SRigLConfig()
    if not isinstance(config, SRigLConfig):
        raise ConfigError(f"config must be an SRigLConfig, not {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify expects an nn.Module, not {type(model).__name__}")
    check_no_torch_pruning(model)
    if not inplace:
        model = copy.deepcopy(model)
    # Hugging Face Conv1D (GPT-2) -> nn.Linear, then masks; the graph is captured once, after the rewrite.
    passes = [AsLinearPass(), SparsifyPass(config, filter_fn, example_inputs)]
    with conv1d_restored_on_error(model, inplace):
        return PassManager(passes).run(model, Analyses(example_inputs))
