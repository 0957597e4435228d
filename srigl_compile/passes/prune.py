"""From a trained dense model to constant fan-in without training from scratch.

``prune`` (PrunePass): one shot, each neuron keeps its k best inputs by magnitude or by Wanda's |W| x ||X||, the
densities planned exactly as ``sparsify`` plans them (uniform / ERK / overrides, the output layer protected).
``from_sparse_weights`` (ImportSparsePass): a checkpoint already pruned to constant fan-in and stored dense (a
Wanda checkpoint) is masked where its weights are zero.

Contract (both, on top of SparsifyPass's): kept weights are exactly the trained ones (no re-initialisation);
everything the masks need (calibration norms, finite weights, equal row counts) is checked before any layer is
rewritten.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.nn as nn

from .._warnings import warn_user
from ..config import SRigLConfig
from ..errors import ConfigError, LayerError
from ..nn.masked import LayerPlan
from ..sparsity import row_counts
from ..sparsity.pruning import magnitude_scores, prune_to_fan_in, wanda_scores
from ..sparsity.selection import top_per_row_mask
from .as_linear import AsLinearPass, conv1d_restored_on_error
from .calibration import collect_input_norms, recalibrate_batchnorm_
from .discover import FilterFn, LayerCandidate
from .sparsify import SparsifyPass, check_no_ablation, check_no_torch_pruning, is_protected

__all__ = ["PrunePass", "ImportSparsePass", "prune", "from_sparse_weights"]

Criterion = Literal["magnitude", "wanda"]
CRITERIA = ("magnitude", "wanda")


def _neuron_weight(candidate: LayerCandidate) -> torch.Tensor:
    weight = getattr(candidate.owner, candidate.param_name).detach()
    return weight.reshape(weight.shape[0], -1)


class PrunePass(SparsifyPass):
    """Masks from one-shot scores of the trained weights; weights kept as they are."""

    def __init__(self, config: SRigLConfig, criterion: Criterion, calibration: Any = None, *, ablation: bool = False,
                 filter_fn: FilterFn | None = None, example_inputs=None) -> None:
        super().__init__(config, filter_fn, example_inputs)
        self.criterion, self.calibration, self.ablation = criterion, calibration, ablation
        self.reinit = False
        self.scores: dict[str, torch.Tensor] = {}

    def prepare(self, model: nn.Module, plans: list[tuple[LayerCandidate, LayerPlan]]) -> None:
        for candidate, _ in plans:
            if not torch.isfinite(_neuron_weight(candidate)).all():
                raise LayerError(f"layer {candidate.name!r} has NaN or inf weights: pruning ranks weights by size, "
                                 "so fix or reload the checkpoint first")
        norms = {}
        if self.criterion == "wanda":
            norms = collect_input_norms(model, [c for c, _ in plans], self.calibration)
            unseen = [name for name, n in norms.items() if n is None]
            if unseen:
                warn_user(f"Wanda: the calibration forward never called layers {unseen} (their weights are read "
                          "without calling the module, e.g. MultiheadAttention's out_proj): they are pruned by "
                          "magnitude")
            bad = [name for name, n in norms.items() if n is not None and not bool(torch.isfinite(n).all())]
            if bad:
                raise ConfigError(f"Wanda: the calibration inputs reach layers {bad[:5]} with NaN or inf features: "
                                  "pass finite calibration inputs (and a model whose forward stays finite on them)")
            empty = [name for name, n in norms.items() if n is not None and not bool(n.any())]
            if empty:
                raise ConfigError(f"Wanda: every calibration feature reaching layers {empty[:5]} is zero (empty "
                                  "batches?): pass calibration batches of real inputs, or criterion='magnitude'")
        for candidate, _ in plans:
            weight, layer_norms = _neuron_weight(candidate), norms.get(candidate.name)
            self.scores[candidate.name] = (magnitude_scores(weight) if layer_norms is None
                                           else wanda_scores(weight, layer_norms.to(weight.device)))

    def initial_mask(self, candidate: LayerCandidate, plan: LayerPlan, generator: torch.Generator) -> torch.Tensor:
        result = prune_to_fan_in(self.scores.pop(candidate.name), budget=plan.budget, k0=plan.k0,
                                 ablation=self.ablation and not plan.protected, gamma_sal=self.config.gamma_sal)
        return result.mask


class ImportSparsePass(SparsifyPass):
    """Masks where the weights are non-zero, for layers whose active rows all hold the same number of non-zeros
    (rows of zeros are ablated neurons). Layers without zeros stay dense."""

    def __init__(self, config: SRigLConfig, *, rebalance: bool = False, filter_fn: FilterFn | None = None,
                 example_inputs=None) -> None:
        super().__init__(config, filter_fn, example_inputs)
        self.rebalance = rebalance
        self.reinit = False
        self.dropped: dict[str, int] = {}

    def plan(self, candidates: list[LayerCandidate]) -> list[tuple[LayerCandidate, LayerPlan]]:
        check_no_ablation(self.config, [c.name for c in candidates])
        plans = [(c, plan) for c in candidates if (plan := self._plan_one(c)) is not None]
        if not plans:
            raise LayerError("no layer of the model has zero weights: from_sparse_weights imports weights that are "
                             "already pruned; use srigl_compile.prune(model, config) to prune a dense model")
        return plans

    def _plan_one(self, c: LayerCandidate) -> LayerPlan | None:
        if not torch.isfinite(_neuron_weight(c)).all():
            raise LayerError(f"layer {c.name!r} has NaN or inf weights: its non-zeros would become the mask with "
                             "them; fix or reload the checkpoint first")
        counts = row_counts(_neuron_weight(c) != 0)
        active = counts > 0
        if bool((counts == c.fan_in).all()):
            return None
        if not active.any():
            raise LayerError(f"layer {c.name!r} is all zeros: nothing to import (leave it out with filter_fn)")
        protected = is_protected(self.config, c)
        if protected and not active.all():
            which = f"the output layer {c.name!r}" if c.is_last else f"layer {c.name!r} (SRigLConfig.no_ablation)"
            raise LayerError(f"{which} has rows of zeros {(~active).nonzero().flatten()[:5].tolist()}: its neurons "
                             "are never ablated; keep it dense with filter_fn" + ("" if c.is_last else
                                                                                 ", or leave it out of no_ablation"))
        fan_ins = counts[active].unique()
        k = int(fan_ins.min())
        if fan_ins.numel() > 1:
            surplus = int((counts[active] - k).sum())
            if not self.rebalance:
                raise LayerError(
                    f"layer {c.name!r}: its rows hold {fan_ins.tolist()[:6]} non-zeros, not one constant fan-in. "
                    f"from_sparse_weights(..., rebalance=True) prunes every row to the smallest count ({k}) by "
                    f"magnitude, dropping {surplus} of {int(counts.sum())} non-zeros; or keep the layer dense with "
                    "filter_fn")
            self.dropped[c.name] = surplus
        n_active = int(active.sum())
        budget = k * n_active
        return LayerPlan(c.name, c.kind, c.n_out, c.fan_in, budget / (c.n_out * c.fan_in), budget, budget // c.n_out,
                         protected)

    def initial_mask(self, candidate: LayerCandidate, plan: LayerPlan, generator: torch.Generator) -> torch.Tensor:
        weight = _neuron_weight(candidate)
        nonzero = weight != 0
        if candidate.name not in self.dropped:
            return nonzero.cpu()
        counts = row_counts(nonzero)
        keep = torch.where(counts > 0, int(counts[counts > 0].min()), 0)
        return top_per_row_mask(magnitude_scores(weight).masked_fill(~nonzero, -1.0).cpu(), keep.cpu())


def _prepared(model: nn.Module, config: SRigLConfig | None, inplace: bool, caller: str) -> tuple[nn.Module,
                                                                                               SRigLConfig]:
    config = config if config is not None else SRigLConfig()
    if not isinstance(config, SRigLConfig):
        raise ConfigError(f"config must be an SRigLConfig, not {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller} expects an nn.Module, not {type(model).__name__}")
    check_no_torch_pruning(model)
    model = model if inplace else copy.deepcopy(model)
    return model, config


def prune(model: nn.Module, config: SRigLConfig | None = None, criterion: Criterion = "magnitude",
          calibration: Any = None, *, ablation: bool = False, recalibrate_batchnorm: bool = False,
          filter_fn: FilterFn | None = None, example_inputs=None, inplace: bool = False) -> nn.Module:
    """Prune a trained model one-shot to constant fan-in: the masked model ``sparsify`` returns, with each neuron
    keeping its k best inputs and their trained values.

    Args:
        config: densities as in ``sparsify`` (sparsity, distribution, overrides; the output layer is never
            ablated). ``reinit`` is ignored: kept weights stay as trained.
        criterion: "magnitude" (|W| per row) or "wanda" (|W| x the L2 norm of each input feature over
            ``calibration``).
        calibration: for Wanda, model inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs,
            or an iterable (list, DataLoader) of them. Feature norms are gathered in eval mode.
        ablation: also ablate neurons with fewer than ``config.gamma_sal`` x k0 weights among the layer's
            ``budget`` highest scores (SRigL's rule); their budget goes to the other neurons.
        recalibrate_batchnorm: re-estimate BatchNorm running statistics over ``calibration`` after pruning (the
            pruned layers' outputs no longer have the statistics the dense model's BatchNorms hold).
        filter_fn, example_inputs, inplace: as in ``sparsify``.

    Fine-tune the result with ``SRigLUpdater`` (masks keep moving) or ``method="static"`` (masks fixed), then
    ``lower`` it.

    Example:
        >>> import torch.nn as nn
        >>> net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        >>> pruned = prune(net, SRigLConfig(sparsity=0.9, distribution="uniform"), "wanda",
        ...                calibration=[torch.randn(32, 64)])
        >>> [(name, int(layer.mask[0].sum())) for name, layer in sparse_layers(pruned)]
        [('0', 6), ('2', 12)]
    """
    if criterion not in CRITERIA:
        raise ConfigError(f"criterion={criterion!r}; choose one of {list(CRITERIA)}")
    if recalibrate_batchnorm and calibration is None:
        raise ConfigError("recalibrate_batchnorm=True needs calibration inputs to estimate the statistics from")
    for name, flag in (("ablation", ablation), ("recalibrate_batchnorm", recalibrate_batchnorm)):
        if not isinstance(flag, bool):
            raise ConfigError(f"prune: {name}={flag!r} must be True or False")
    if criterion == "magnitude" and calibration is not None and not recalibrate_batchnorm:
        warn_user("prune: criterion='magnitude' reads no calibration inputs (Wanda does): they are ignored")
    if recalibrate_batchnorm and isinstance(calibration, Iterator):
        calibration = list(calibration)  # (read more than once: by Wanda or the check below, then the statistics)
    model, config = _prepared(model, config, inplace, "prune")
    if recalibrate_batchnorm and inplace:  # (a dry run first: a failing input must leave the model unpruned)
        recalibrate_batchnorm_(model, calibration, keep=False)
    with conv1d_restored_on_error(model, inplace):
        model = AsLinearPass()(model).module
        pruned = PrunePass(config, criterion, calibration, ablation=ablation, filter_fn=filter_fn,
                           example_inputs=example_inputs)(model).module
    if recalibrate_batchnorm and not recalibrate_batchnorm_(pruned, calibration):
        warn_user("prune: recalibrate_batchnorm=True, but the model has no BatchNorm keeping running statistics: "
                  "nothing was recalibrated")
    return pruned


def from_sparse_weights(model: nn.Module, config: SRigLConfig | None = None, *, rebalance: bool = False,
                        filter_fn: FilterFn | None = None, example_inputs=None, inplace: bool = False) -> nn.Module:
    """Mask a model whose weights are already pruned to constant fan-in (a Wanda checkpoint saved dense) without
    changing a weight: each Linear / Conv layer with zeros becomes a masked layer whose mask is its non-zeros.

    A layer whose rows hold different numbers of non-zeros is a ``LayerError`` naming it; ``rebalance=True``
    instead prunes each of its rows to the smallest count by magnitude (a warning says how many weights that
    dropped). Rows of zeros become ablated neurons (not in the output layer nor ``config.no_ablation``'s layers,
    whose neurons are never ablated: an error). Layers without zeros stay dense. ``config`` carries ``seed``,
    ``no_ablation`` and the training settings for a later ``SRigLUpdater``; the densities come from the weights.
    """
    if not isinstance(rebalance, bool):
        raise ConfigError(f"from_sparse_weights: rebalance={rebalance!r} must be True or False")
    model, config = _prepared(model, config, inplace, "from_sparse_weights")
    import_pass = ImportSparsePass(config, rebalance=rebalance, filter_fn=filter_fn, example_inputs=example_inputs)
    with conv1d_restored_on_error(model, inplace):
        result = import_pass(AsLinearPass()(model).module).module
    if import_pass.dropped:
        warn_user(f"from_sparse_weights(rebalance=True) dropped weights to equal each row's count: "
                  f"{import_pass.dropped} (layer: weights dropped)")
    return result

