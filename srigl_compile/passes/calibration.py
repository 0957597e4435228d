"""Input feature norms of a model's layers over calibration inputs (what Wanda scores weights by).

For each layer, ||X_j||_2 over every row the layer multiplies (batch x tokens for a Linear, batch x output
positions for a convolution), in the order of the layer's neuron view [n_out, fan_in]:
- Linear: feature j of the input's last dimension.
- ConvNd: feature (c, kernel offset) of the unfolded input, per group; the sum of squares of every patch entry is
  a depthwise convolution of x^2 with one one-hot kernel per offset, so no im2col copy is built.
- MultiheadAttention's packed in_proj (or q/k/v_proj_weight): q rows read the query, k rows the key, v rows the
  value.
Norms are gathered with forward pre-hooks, in eval mode and without gradients; a layer whose hook never fires (a
weight the forward reads without calling its module, such as MultiheadAttention's out_proj) has no norms.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .discover import LayerCandidate

__all__ = ["calibration_batches", "collect_input_norms", "recalibrate_batchnorm_"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def calibration_batches(calibration: Any) -> Iterator[tuple[tuple, dict]]:
    """(args, kwargs) for each calibration item: a tensor is one positional input, a tuple or list the positional
    inputs, a mapping (a dict, a tokenizer's BatchEncoding) keyword inputs. ``calibration`` is one such item (a
    tuple: one item, its positional inputs) or an iterable of them (a list, a DataLoader yielding model inputs)."""
    if calibration is None:
        raise ConfigError("criterion='wanda' needs calibration inputs: pass calibration=[batch, ...] (tensors, tuples "
                          "of positional inputs or dicts of keyword inputs), e.g. a few hundred training samples")
    items = [calibration] if isinstance(calibration, (torch.Tensor, Mapping, tuple)) else calibration
    if not isinstance(items, Iterable):
        raise ConfigError(f"calibration must be a tensor, a dict of inputs or an iterable of them, not "
                          f"{type(calibration).__name__}")
    for item in items:
        if isinstance(item, torch.Tensor):
            yield (item,), {}
        elif isinstance(item, Mapping):
            yield (), dict(item)
        elif isinstance(item, (tuple, list)):
            yield tuple(item), {}
        else:
            raise ConfigError(f"a calibration item must be a tensor, a tuple of positional inputs or a dict of "
                              f"keyword inputs, not {type(item).__name__}")


class _SumOfSquares:
    """Per-candidate running sum of squared input features, shaped [rows reading alike, fan_in]."""

    def __init__(self, candidate: LayerCandidate) -> None:
        self.candidate = candidate
        self.total: torch.Tensor | None = None

    def add(self, sums: torch.Tensor) -> None:
        sums = sums.detach().double().cpu()
        self.total = sums if self.total is None else self.total + sums

    def norms(self) -> torch.Tensor | None:
        """[n_out or groups..., fan_in] broadcastable to the neuron view, or None if the hook never fired."""
        if self.total is None:
            return None
        norms = self.total.sqrt().float()
        rows_alike = self.candidate.n_out // norms.shape[0]
        return norms.repeat_interleave(rows_alike, dim=0)


def _linear_sums(x: torch.Tensor) -> torch.Tensor:
    if x.is_nested:  # (torch's encoder fast path with a padding mask: its valid tokens, as the layers see them)
        x = torch.cat([row.reshape(-1, row.shape[-1]) for row in x.unbind()])
    x = x.float()
    return x.reshape(-1, x.shape[-1]).pow(2).sum(dim=0, keepdim=True)


def _conv_sums(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """[groups, in/groups x prod(kernel)]: the sum over batch and output positions of each patch entry squared."""
    dims = len(conv.kernel_size)
    unbatched = x.dim() == dims + 1
    x = x.float().pow(2)
    if unbatched:
        x = x.unsqueeze(0)
    padding = conv.padding
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = 0
    channels, offsets = x.shape[1], math.prod(conv.kernel_size)
    one_hot = torch.eye(offsets, dtype=x.dtype, device=x.device).reshape(offsets, 1, *conv.kernel_size)
    patches = _CONV[dims](x, one_hot.repeat(channels, *([1] * (dims + 1))), stride=conv.stride, padding=padding,
                          dilation=conv.dilation, groups=channels)
    sums = patches.sum(dim=0).reshape(channels * offsets, -1).sum(dim=1)
    return sums.reshape(conv.groups, -1)


def _attention_sums(candidate: LayerCandidate, args: tuple, kwargs: dict) -> torch.Tensor:
    names = ("query", "key", "value")
    inputs = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
    per_input = {name: _linear_sums(inputs[name])[0] for name in names if name in inputs}
    if candidate.param_name == "in_proj_weight":  # [3d, d]: q, k, v rows
        return torch.stack([per_input[name] for name in names])
    reads = {"q_proj_weight": "query", "k_proj_weight": "key", "v_proj_weight": "value"}[candidate.param_name]
    return per_input[reads].unsqueeze(0)


def _hook(candidate: LayerCandidate, sums: _SumOfSquares):
    def record(module, args, kwargs):
        if candidate.kind == "attention":
            sums.add(_attention_sums(candidate, args, kwargs))
            return
        x = args[0] if args else kwargs.get("input")
        if candidate.kind == "linear":
            sums.add(_linear_sums(x))
        else:
            sums.add(_conv_sums(module, x))

    return record


@torch.no_grad()
def collect_input_norms(model: nn.Module, candidates: list[LayerCandidate], calibration: Any
                        ) -> dict[str, torch.Tensor | None]:
    """Run the calibration inputs through ``model`` (eval mode, no gradients) and return each candidate's input
    feature norms (None for a layer whose module the forward never called)."""
    sums = {c.name: _SumOfSquares(c) for c in candidates}
    with contextlib.ExitStack() as stack:
        for c in candidates:
            handle = c.owner.register_forward_pre_hook(_hook(c, sums[c.name]), with_kwargs=True)
            stack.callback(handle.remove)
        stack.enter_context(_modes_kept(model))
        model.eval()
        _forward_all(model, calibration)
    return {name: s.norms() for name, s in sums.items()}


@contextlib.contextmanager
def _modes_kept(model: nn.Module) -> Iterator[None]:
    """Every module's train/eval flag put back as it was (a model training with frozen BatchNorms keeps them
    frozen: ``model.train(flag)`` would set all of them)."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _forward_all(model: nn.Module, calibration: Any) -> None:
    count = 0
    for count, (args, kwargs) in enumerate(calibration_batches(calibration), start=1):
        try:
            model(*args, **kwargs)
        except Exception as err:  # any error of the user's model: name the item, keep the cause
            if "more than 1 value per channel when training" in str(err):
                raise ConfigError(f"calibration input #{count} holds one value per channel for a BatchNorm, which "
                                  "recalibrating its statistics cannot normalise: give batches of 2 samples or more "
                                  "(a DataLoader's short last batch: drop_last=True)") from err
            pairs = ("; an (inputs, labels) batch passes its labels to the forward too: give the inputs alone, e.g. "
                     "[x for x, _ in loader]") if len(args) > 1 else ""
            raise ConfigError(f"calibration input #{count} does not fit the model "
                              f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); pass "
                              f"what the model's forward takes{pairs}") from err
    if count == 0:
        raise ConfigError("calibration is empty: pass at least one batch of inputs")


@torch.no_grad()
def recalibrate_batchnorm_(model: nn.Module, calibration: Any, *, keep: bool = True) -> int:
    """Re-estimate every BatchNorm's running mean and variance over the calibration inputs (the cumulative
    average, as if they were the training set), with the rest of the model in eval mode: pruning changes the
    activations those statistics describe. Returns the number of BatchNorm modules updated. A failing input
    leaves the statistics as they were, as does ``keep=False`` (a dry run: the calibration is checked only).

    Raises:
        ConfigError: an input the model cannot take, naming it.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    saved = [{name: buffer.clone() for name, buffer in m.named_buffers(recurse=False) if buffer is not None}
             for m in norms]
    with _modes_kept(model):
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: every calibration batch counts alike
            m.train()
        kept = False
        try:
            _forward_all(model, calibration)
            kept = keep
        finally:
            for m, momentum, buffers in zip(norms, momenta, saved):
                m.momentum = momentum
                if not kept:
                    for name, buffer in buffers.items():
                        getattr(m, name).copy_(buffer)
    return len(norms)
