"""A lowered layer's dense form, and the choice per input shape between it and the layer's kernel: what keeps a
lowered layer from running slower than the dense layer it replaced.

The condensed kernels win by a wide margin on sparse layers, but not always on near-dense ones at large batches:
a 1x1 convolution 2048 -> 512 on 7x7 maps at 50% sparsity, batch 64, ran 44.2 ms lowered against 26.1 ms for
torch's dense convolution (0.59x; 70%: 0.76x) on the 2-core Xeon (``python benchmarks/run.py --only layers
--layers r50_conv1x1 --sparsities 0.5 0.7 --batches 1 64 256 --masks uniform``). So ``lower`` gives each CPU layer
whose density is at least ``CANDIDATE_DENSITY`` a ``DenseForm``, and the first calls at each input shape are a
trial: each runs the kernel (whose output it returns) and the dense form, both timed inside the model, caches as
they really are, in alternating order; after one untimed call (which prepares: plans, scratch buffers, oneDNN
primitives) and ``ROUNDS`` timed ones (more while a path has run less than ``BUDGET_S`` in all, up to
``MAX_ROUNDS``), the faster by the median of its timed calls (the dense form only when 5% and 50 us faster a
call: small calls stay on the kernel, their timings noise) runs that shape from then on, like
``torch.backends.cudnn.benchmark`` (the median, not the fastest call: torch's dense convolution at large batches
varies from call to call, and its best call promised more than its typical one). Below that density the kernels
measured >= 1.3x over dense at every batch, so sparser layers carry no dense form (and no lookup per call).
``nn.settle.settle(model, x)`` makes the calls that finish the trials (``settle_trials``), as a server would at
start-up and as the benchmarks do before timing (until then, calls at a new shape run both paths: up to twice as
long), then keeps the dense paths they chose only if whole forwards run faster with them (``keep_if_faster``): a
trial cannot see what a dense layer costs the kernels around it, nor what waking torch's threads costs once no
trial keeps them busy.

What the dense form computes is the layer's own result: the condensed weights scattered into a dense weight
(zero where a neuron has no input; ablated neurons zero rows with their bias, unless the layer is compact), torch's
``F.linear`` / ``F.conv2d`` (an unpadded 1x1 convolution: that or ``torch.matmul`` on its pixels, whichever its
trial measured faster: ``DENSE_VARIANTS``), then the layer's
epilogue and residual as ``spec.apply_epilogue`` computes them. The
two paths sum in different orders, so they agree to float32 rounding, not bit for bit: a shape's outputs are the
kernel's until its choice is made, then the chosen path's. A model whose outputs must not depend on timings is
lowered with ``LlvmConfig(dense_fallback=False)``.

Scope: eager calls on plain float32 CPU tensors without autograd; torch.compile follows the choices eager calls
made before it traced (``nn.traced_dense``); other traced calls (fx, export) and anything else run the kernel, as
does a shape still without a choice inside a ``cpu_graph`` recording (which would replay both paths of a trial
forever). Layers: Linear, and 2-d convolutions with one group and zero padding. The dense
weight is built only when a shape is on trial and kept only while some shape chooses it. The form snapshots the
condensed operands at lowering (a convolution's before they are packed: a second copy of its weights); if the
layer's operands are changed or replaced afterwards the form is dropped before it would run again, and the kernel
runs. ``save_lowered`` keeps the form and its choices, which a model loaded on another machine (CPU, core or
thread count) forgets.

Example:
    >>> lowered = lower(model)                                              # doctest: +SKIP
    >>> settle(lowered, torch.randn(64, 3, 224, 224))   # nn.settle            # doctest: +SKIP
    >>> lowered.layer4[0].conv1._dense_form.choices   # True: dense faster  # doctest: +SKIP
    {(torch.Size([64, 2048, 7, 7]), None): False}
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..runtime.call_record import recording_here
from ..runtime.checks import broadcasts_to
from ..runtime.spec import apply_epilogue
from .condensed_tensors import operands, version_of

__all__ = ["DenseForm", "CANDIDATE_DENSITY", "DENSE_VARIANTS", "MARGIN", "MIN_SAVING_S", "FORWARD_SAVING_S",
           "dense_form_for", "watched_operands", "operands_of", "form_takes", "run_dense_if_faster", "settle_trials",
           "keep_if_faster", "machine"]

CANDIDATE_DENSITY = 0.15  # layers at least this dense get a dense form (see the module docstring)
# A 1x1 convolution's dense computations, timed side by side in its trials: sgemm on [C, H * W] per image, or
# oneDNN's convolution. Neither wins everywhere on the 2-core Xeon: sgemm ran 170-360 GFLOP/s against oneDNN's
# 50-250 on 64-2048 channels at batch 1 and 64, yet at 2048 -> 512 on 7x7, batch 64, oneDNN took 23.0 ms and
# sgemm 26.9 (``benchmarks/cpu_runs/2026-12-07_xeon/dense_ops_1x1.py``).
DENSE_VARIANTS = ("matmul", "conv2d")
ROUNDS = 3  # timed calls of each path in a shape's trial, at least (after one untimed call) ...
BUDGET_S = 0.005  # ... and more until each path has run this long in all (short calls are noisy) ...
MAX_ROUNDS = 15  # ... but no more than this
MARGIN = 0.95  # the dense path is chosen only when at least 5% faster: ties go to the sparse kernel ...
MIN_SAVING_S = 50e-6  # ... and at least this much faster a call: below it, timing noise decides and nothing is won
FORWARD_SAVING_S = 50e-6  # what whole forwards must save per dense choice to keep them (``keep_if_faster``) ...
FORWARD_BUDGET_S = 0.05  # ... timed (ROUNDS to MAX_ROUNDS forwards each way) until each way has run this long


@dataclasses.dataclass(eq=False)
class DenseForm:
    """The dense form of one lowered layer (see the module docstring).

    values / columns: the condensed weights [rows, k] and the dense column each one sits in (an input feature, or
    a convolution's im2col column), rows being the layer's output rows (active neurons of a compact layer, else
    every neuron, ablated ones with no entries); ``dense_shape`` the weight F.linear / F.conv2d takes; ``conv``
    F.conv2d's keyword arguments (None: a Linear); ``watched`` the layer's operand tensors when the form was made
    and their versions (a change drops the form)."""

    values: torch.Tensor
    columns: torch.Tensor
    rows: torch.Tensor
    bias: torch.Tensor | None
    dense_shape: tuple[int, ...]
    epilogue: str
    conv: dict[str, Any] | None
    watched: tuple[tuple[torch.Tensor, int | None], ...]
    choices: dict = dataclasses.field(default_factory=dict)  # (input shape, residual shape) -> True: dense
    trials: dict = dataclasses.field(default_factory=dict)  # shapes still on trial -> _Trial
    # (input shape, residual shape) -> the faster of a 1x1 convolution's dense computations (``DENSE_VARIANTS``)
    variants: dict = dataclasses.field(default_factory=dict)
    _weight: torch.Tensor | None = dataclasses.field(default=None, repr=False)

    def stale(self, operands: tuple[torch.Tensor, ...]) -> bool:
        """Whether the layer's operands are no longer the tensors (and versions) this form was made from (or are
        tensors without a version counter: made under torch.inference_mode, changes to them cannot be seen)."""
        return len(operands) != len(self.watched) or any(
            now is not then or version is None or now._version != version
            for now, (then, version) in zip(operands, self.watched))

    def rewatch(self, replaced: dict[int, torch.Tensor]) -> None:
        """Watch the tensors that replaced operands (by the replaced tensors' ids), at their present versions."""
        tensors = [replaced.get(id(tensor), tensor) for tensor, _ in self.watched]
        self.watched = tuple((tensor, version_of(tensor)) for tensor in tensors)

    def weight(self) -> torch.Tensor:
        """The dense weight (built on first use; scatter-add: padded rows repeat their last column with zeros)."""
        if self._weight is None:
            width = int(torch.Size(self.dense_shape[1:]).numel())
            filled = torch.zeros(len(self.rows), width).scatter_add_(1, self.columns, self.values.float())
            weight = torch.zeros(self.dense_shape[0], width).index_copy_(0, self.rows, filled)
            self._weight = weight.view(self.dense_shape)
        return self._weight

    def run(self, x: torch.Tensor, residual: torch.Tensor | None, variant: str | None = None) -> torch.Tensor:
        """The layer's output computed densely: by ``variant`` (``DENSE_VARIANTS``), else by the one its trial at
        this shape measured faster."""
        if self.pointwise and variant is None:
            variant = self.variants.get((x.shape, None if residual is None else residual.shape), "matmul")
        if self.conv is None:
            y = F.linear(x, self.weight(), self.bias)
        elif self.pointwise and variant == "matmul":
            return self._pointwise(x, residual)
        else:
            y = F.conv2d(x, self.weight(), self.bias, **self.conv)
        return apply_epilogue(y, self.epilogue, residual)

    def dense_variants(self) -> tuple[str, ...]:
        """The dense computations a trial times: two for a 1x1 convolution (``DENSE_VARIANTS``), else one."""
        return DENSE_VARIANTS if self.pointwise else ("",)

    @property
    def pointwise(self) -> bool:
        """An unpadded 1x1 convolution: a matrix product per image of its (strided) pixels."""
        return self.conv is not None and self.dense_shape[2:] == (1, 1) and self.conv["padding"] in (
            (0, 0), 0, "valid", "same")  # (a 1x1 kernel's "same" pads nothing)

    def _pointwise(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """A 1x1 convolution as sgemm on [C, H * W] per image (``DENSE_VARIANTS``' "matmul"). The epilogue runs in
        place on the product (one pass each: the product is new)."""
        stride = self.conv["stride"]
        images = x[:, :, ::stride[0], ::stride[1]] if stride != (1, 1) else x
        shape = (x.shape[0], self.dense_shape[0], *images.shape[2:])
        y = torch.matmul(self.weight().flatten(1), images.flatten(2))  # (planar images flatten without a copy)
        if self.bias is not None:
            y += self.bias[:, None]
        y = y.view(shape)
        if "add" in self.epilogue:  # (in place unless the product broadcasts up to the residual's shape)
            y = y.add_(residual) if broadcasts_to(residual.shape, tuple(y.shape)) else y + residual
        if "relu" in self.epilogue:
            return y.relu_()
        return y if self.epilogue in ("", "add") else apply_epilogue(y, self.epilogue, None)

    def run_trial(self, key: tuple, x: torch.Tensor, residual: torch.Tensor | None,
                  kernel: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One call of the shape's trial (module docstring): the kernel's output; the choice once the trial is
        over (the dense weight dropped again when no shape chose it)."""
        variants = self.dense_variants()
        trial = self.trials.setdefault(key, _Trial(times=tuple([] for _ in range(1 + len(variants)))))
        dense_first = trial.calls % 2 == 1  # (the second call of the two finds warmer caches: take turns)
        turn = variants[::-1] if trial.calls % 4 >= 2 else variants  # (and the dense variants among themselves)

        def timed_dense() -> list[float]:
            seconds = {v: _timed(lambda v=v: self.run(x, residual, v)) for v in turn}
            return [seconds[v] for v in variants]

        if dense_first:
            dense_s = timed_dense()
        start = time.perf_counter()
        y = kernel()
        kernel_s = time.perf_counter() - start
        if not dense_first:
            dense_s = timed_dense()
        if trial.record(kernel_s, *dense_s):
            if self.trials.pop(key, None) is not trial:  # (another thread's call on this trial ended it first)
                return y
            kernel_s, *dense_s = (statistics.median(times) for times in trial.times)
            fastest = min(range(len(variants)), key=dense_s.__getitem__)
            if self.pointwise:
                self.variants[key] = variants[fastest]
            dense_s = dense_s[fastest]
            self.choices[key] = dense_s < MARGIN * kernel_s and kernel_s - dense_s >= MIN_SAVING_S
            if not any(self.choices.values()):
                self._weight = None
        return y

    def __getstate__(self):  # (the weight is rebuilt on demand; an unfinished trial starts again)
        # (a form whose operands changed since it was made stays stale in the copy: the copy's counters restart)
        fresh = all(version is not None and tensor._version == version for tensor, version in self.watched)
        return {**self.__dict__, "trials": {}, "_weight": None, "machine": machine(), "fresh": fresh}

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("variants", {})  # (forms saved before 1x1 layers had two dense computations)
        if state.pop("machine", None) != machine():  # timings are this machine's
            self.choices, self.variants = {}, {}
        self.__dict__.pop("machine", None)
        # the loaded operands are the tensors watched (one pickle), their version counters new; a form saved stale
        # watches no version, so its first call drops it (a probe found a copy computing with the old weights)
        fresh = self.__dict__.pop("fresh", True)
        self.watched = tuple((tensor, version_of(tensor) if fresh else None) for tensor, _ in self.watched)


def _timed(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def machine() -> tuple:
    """What the timings depend on: the CPU, its cores and torch's threads (TVM's pool follows them)."""
    return platform.machine(), platform.processor(), os.cpu_count(), torch.get_num_threads()


@dataclasses.dataclass
class _Trial:
    """One shape's trial so far: calls made, and the timed calls of each path (kernel, then each dense variant)."""

    calls: int = 0
    times: tuple = dataclasses.field(default_factory=lambda: ([], []))

    def record(self, *seconds: float) -> bool:
        """Count a call that ran every path (``seconds`` in the order of ``times``); whether the trial is over."""
        self.calls += 1
        if self.calls > 1:  # (the first call prepares: not timed)
            for times, value in zip(self.times, seconds):
                times.append(value)
        rounds = self.calls - 1
        return rounds >= ROUNDS and (min(map(sum, self.times)) >= BUDGET_S or rounds >= MAX_ROUNDS)


def dense_form_for(layer, values: torch.Tensor, columns: torch.Tensor) -> DenseForm | None:
    """The dense form of a condensed layer about to be lowered, from its unpacked ``values`` (in the kernel's value
    dtype: bfloat16 values give the dense form the same rounded weights) and dense ``columns`` ([n_active, k]);
    None where there is none: too sparse (``CANDIDATE_DENSITY``), no active neuron,
    or a convolution other than 2-d, single-group, zero-padded."""
    from .condensed import CondensedConv

    if not layer.n_active or values.shape[1] < CANDIDATE_DENSITY * layer.fan_in:
        return None
    is_conv = isinstance(layer, CondensedConv)
    if is_conv and (layer.dims != 2 or layer.groups != 1 or layer.padding_mode != "zeros"):
        return None
    compact = layer.compact or layer.n_active == layer.n_out
    rows = torch.arange(layer.n_active) if compact else layer.active.long()
    height = layer.n_active if compact else layer.n_out
    bias = layer.bias if compact else layer.full_bias
    dense_shape = (height, *layer.dense_shape[1:])
    conv = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation) if is_conv else None
    return DenseForm(values.detach().float().clone(), columns.long().clone(), rows,
                     None if bias is None else bias.detach().float().clone(), dense_shape, layer.epilogue, conv, ())


def operands_of(layer) -> tuple[torch.Tensor, ...]:
    """The lowered layer's operand tensors: values, indices, and bias if any."""
    values, indices, bias = operands(layer)
    return (values, indices) + ((bias,) if bias is not None else ())


def watched_operands(layer) -> tuple[tuple[torch.Tensor, int | None], ...]:
    """The lowered layer's operand tensors with their versions (what ``DenseForm.stale`` compares against)."""
    return tuple((tensor, version_of(tensor)) for tensor in operands_of(layer))


def form_takes(form: DenseForm, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
    """Whether the dense form computes this call: float32 CPU tensors autograd does not track, batched images
    for a convolution."""
    return not (x.dtype != torch.float32 or not x.is_cpu or (x.dim() != 4 if form.conv is not None else x.dim() == 0)
                or (torch.is_grad_enabled() and x.requires_grad)
                or (residual is not None and (not residual.is_cpu or residual.dtype != torch.float32
                                              or (torch.is_grad_enabled() and residual.requires_grad))))


def run_dense_if_faster(layer, form: DenseForm, x: torch.Tensor, residual: torch.Tensor | None,
                        kernel: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]) -> torch.Tensor | None:
    """The layer's output by its dense form when that is the faster path at this input's shape, or by the kernel
    (``kernel(x, residual)``) while the shape is on trial; None when the kernel runs it: the choice, a call the
    form does not take, or a shape without a choice inside a recording (module docstring). A form whose layer's
    operands changed since it was made is dropped."""
    if residual is not None and type(residual) is not torch.Tensor:
        return None
    key = (x.shape, None if residual is None else residual.shape)
    dense = form.choices.get(key)  # (True / False once measured, None while on trial)
    if dense is False:  # (the common case first: a call costs a dict lookup more than the kernel's)
        return None
    if form.stale(operands_of(layer)):
        layer.__dict__.pop("_dense_form", None)  # (pop: two threads may find it stale at once)
        return None
    if not form_takes(form, x, residual):
        return None
    if dense is None:
        if recording_here():  # a recorded trial would run both paths at every replay and never end
            return None
        return form.run_trial(key, x, residual, lambda: kernel(x, residual))
    return form.run(x, residual)


def settle_trials(model: torch.nn.Module, *args, **kwargs) -> int:
    """Call ``model(*args, **kwargs)`` (without gradients) until no layer's dense form has a trial open, then
    ``keep_if_faster`` on the dense paths these calls chose; returns the calls made (``nn.settle.settle``'s first
    step)."""
    forms = _forms(model)
    before = [dict(form.choices) for form in forms]
    calls = 0
    with torch.no_grad():
        while calls < MAX_ROUNDS + 2:  # (a trial ends after MAX_ROUNDS + 1 calls at most)
            model(*args, **kwargs)
            calls += 1
            if not any(form.trials for form in _forms(model)):  # (the forms still there: stale ones are dropped)
                break
        chosen = [(form, key) for form, old in zip(forms, before)
                  for key, dense in form.choices.items() if dense and key not in old]
        if chosen:
            calls += keep_if_faster(model, chosen, *args, **kwargs)
    return calls


def dense_path_layers(model: torch.nn.Module) -> dict[str, list[list[int]]]:
    """{layer name: the input shapes at which its dense form runs (the trials chose it, the forward check kept
    it)}: what a timing of ``model`` measured besides its kernels."""
    chosen = {name: [list(key[0]) for key, dense in m.__dict__["_dense_form"].choices.items() if dense]
              for name, m in model.named_modules() if "_dense_form" in m.__dict__}
    return {name: shapes for name, shapes in chosen.items() if shapes}


def _forms(model: torch.nn.Module) -> list[DenseForm]:
    return [m.__dict__["_dense_form"] for m in model.modules() if "_dense_form" in m.__dict__]


def keep_if_faster(model: torch.nn.Module, chosen: list[tuple[DenseForm, tuple]], *args, **kwargs) -> int:
    """Keep the dense paths ``chosen`` ((form, shape key) pairs) only if whole forwards run faster with them than
    with the kernels, by the median of alternating timed forwards (after one untimed of each), at least
    ``FORWARD_SAVING_S`` a chosen layer; else every one goes back to its kernel. Returns the forwards made.

    A layer's trial times its two paths side by side, while the trials of every near-dense layer keep torch's
    threads busy. Settled, a lone dense layer among TVM kernels wakes torch's sleeping threads (OMP_WAIT_POLICY
    PASSIVE) while TVM's pool still spins on the cores: on the 2-core Xeon a 1x1 layer that won its trial at
    0.50 against 0.70 ms then took 1.4 ms, and ResNet-50 at batch 1 ran 24.3 ms with three such choices against
    21.4 with none. Only a whole forward shows what a choice costs the layers around it."""
    if not chosen:
        return 0
    times: tuple[list[float], list[float]] = ([], [])  # forwards with the choices, and without
    calls = 0
    with torch.no_grad():
        while calls < 2 * (MAX_ROUNDS + 1):
            for with_dense, timings in ((True, times[0]), (False, times[1])):
                for form, key in chosen:
                    form.choices[key] = with_dense
                seconds = _forward_seconds(model, *args, **kwargs)
                calls += 1
                if calls > 2:  # (one untimed forward of each first)
                    timings.append(seconds)
            rounds = len(times[0])
            if rounds >= ROUNDS and (min(map(sum, times)) >= FORWARD_BUDGET_S or rounds >= MAX_ROUNDS):
                break
    with_dense, without = (statistics.median(timings) for timings in times)
    keep = with_dense <= without - FORWARD_SAVING_S * len(chosen)
    for form, key in chosen:
        form.choices[key] = keep
        if not any(form.choices.values()):
            form._weight = None
    return calls


def _forward_seconds(model: torch.nn.Module, *args, **kwargs) -> float:
    start = time.perf_counter()
    model(*args, **kwargs)
    return time.perf_counter() - start
