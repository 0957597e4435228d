"""Helpers every test tier shares (test modules never import each other): comparing a model's outputs with a
reference, BatchNorm statistics that are not the identity (so that folding or dropping them is visible), ablating
neurons by hand, the invariants a freshly sparsified or training model must hold, and a resumable recipe run.
The shared test models are in ``tests/models.py``."""

from __future__ import annotations

import copy
import math
import re
import warnings

import torch
import torch.nn as nn

from srigl_compile import (
    SRigLConfig,
    sparse_layers,
)
from srigl_compile.data import teacher_student
from srigl_compile.nn.masked import MaskedMultiheadAttention, MaskedProjection, is_masked
from srigl_compile.recipes import train_classifier
from srigl_compile.sparsity import check_constant_fan_in
from srigl_compile.zoo import build_model


def assert_same(model: nn.Module, reference: nn.Module, *inputs, tol: float | dict = 1e-5) -> None:
    """``model(*inputs)`` equals ``reference(*inputs)`` within ``tol`` (rtol = atol = tol, or a dict of both), both
    in eval mode and without gradients."""
    tolerances = tol if isinstance(tol, dict) else {"rtol": tol, "atol": tol}
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(*inputs), reference.eval()(*inputs), **tolerances)


def randomize_bn(model: nn.Module) -> nn.Module:
    """Random running statistics and affine parameters in every BatchNorm of ``model`` (in place)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-1, 1)
    return model


def ablate(model, rows_by_layer, biases=None):
    """Ablate neurons by hand (as the updater would): empty their mask rows and zero their weights."""
    layers = dict(sparse_layers(model))
    with torch.no_grad():
        for name, rows in rows_by_layer.items():
            layers[name].mask[rows] = False
            layers[name].weight[rows] = 0
        for (name, row), value in (biases or {}).items():
            layers[name].bias[row] = value
    return model


def batchnorm_names(model):
    return sorted(name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


def masked_dense_reference(original: nn.Module, sparse: nn.Module) -> nn.Module:
    """A plain copy of ``original`` carrying the sparse model's state, with each sparse weight set to weight * mask.

    The packed attention weight lives at ``<mha>.in_proj.weight`` in the sparse model and at ``<mha>.in_proj_weight``
    in the plain one.
    """
    reference = copy.deepcopy(original)
    state = {k: v.detach().clone() for k, v in sparse.state_dict().items()}
    for name, layer in sparse_layers(sparse):
        state[f"{name}.weight" if name else "weight"] = (layer.weight * layer.mask).detach().clone()
    new_state = {}
    for key in reference.state_dict():
        source = key if key in state else re.sub(r"(^|\.)((?:in|q|k|v)_proj)_weight$", r"\1\2.weight", key)
        new_state[key] = state[source]
    reference.load_state_dict(new_state, strict=True)
    assert not any(is_masked(m) for m in reference.modules())
    return reference


def assert_fresh_invariants(model: nn.Module, expected_names=None) -> dict[str, nn.Module]:
    """Right after sparsify: every active neuron has exactly k0 inputs, none ablated, masked weights exactly zero."""
    layers = dict(sparse_layers(model))
    assert layers, "no sparse layer"
    if expected_names is not None:
        assert sorted(layers) == sorted(expected_names)
    for name, layer in layers.items():
        plan = layer.srigl_plan
        assert layer.mask.dtype == torch.bool, name
        assert layer.mask.shape == layer.weight.shape, name
        counts = layer.neuron_view(layer.mask).sum(dim=1)
        assert torch.all(counts == plan.k0), (name, counts.unique().tolist(), plan.k0)
        assert 1 <= plan.k0 <= plan.fan_in, name
        assert plan.k0 == plan.budget // plan.n_out, name
        assert plan.fan_in == math.prod(layer.weight.shape[1:]), name
        assert torch.all(layer.weight.detach()[~layer.mask] == 0), name
        assert torch.count_nonzero(layer.weight.detach()[layer.mask]) > 0, name
    return layers


def assert_training_invariants(model: nn.Module) -> None:
    """During training: constant fan-in over active neurons, budget respected, protected layers unablated, zeros."""
    for name, layer in sparse_layers(model):
        k, ablated = check_constant_fan_in(layer.neuron_view(layer.mask), layer=name)
        assert k >= 1, name
        assert k * int((~ablated).sum()) <= layer.srigl_plan.budget, name
        if layer.srigl_plan.protected:
            assert not ablated.any(), name
        assert torch.all(layer.weight.detach()[~layer.mask] == 0), name
        if layer.weight.grad is not None:
            assert torch.all(layer.weight.grad[~layer.mask] == 0), name


def assert_same_classes(original: nn.Module, sparse: nn.Module) -> None:
    """Same module tree; each module is of its original class, or a masked subclass of it."""
    assert type(sparse) is type(original)
    orig = dict(original.named_modules())
    for name, module in sparse.named_modules():
        if isinstance(module, MaskedProjection):
            continue  # the new child holding a packed attention weight
        assert name in orig, name
        if isinstance(module, MaskedMultiheadAttention):
            assert isinstance(module, type(orig[name])), name
        elif is_masked(module):
            # the masked class subclasses the *base* layer class: a subclass that keeps the base forward (e.g.
            # MultiheadAttention's NonDynamicallyQuantizableLinear out_proj) becomes the plain masked class
            base = next(b for b in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d) if isinstance(orig[name], b))
            assert isinstance(module, base), name
        else:
            assert type(module) is type(orig[name]), name


def collect_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught]


class Stop(Exception):
    pass


def run_recipe(tmp_path, name, stop_at=None, resume=None, checkpoint_every=11, batch_size=64):
    data = teacher_student(n_train=512, n_test=128, seed=1)
    torch.manual_seed(0)
    model = build_model("mlp", data.input_shape, data.num_classes)

    def stop(step, updater):
        if step == stop_at:
            raise Stop

    return train_classifier(model, data, SRigLConfig(sparsity=0.9, delta_t=5, grad_accumulation_n=2), epochs=3,
                            batch_size=batch_size, checkpoint_path=tmp_path / name, checkpoint_every=checkpoint_every,
                            resume=resume, on_step=stop, meta={"method": "srigl"})


def make_layer(n_out, n_in, k, index_dtype, has_bias, seed=0):
    """Values, sorted distinct indices [n_out, k] and a bias (or None), with a deterministic generator."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.rand(n_out, n_in, generator=gen).argsort(dim=1)[:, :k].sort(dim=1).values
    values = torch.randn(n_out, k, generator=gen)
    bias = torch.randn(n_out, generator=gen) if has_bias else None
    return values, idx.to(getattr(torch, index_dtype)), bias


def reference(x, values, indices, bias):
    """What a condensed layer computes, by gathering (the kernels' reference)."""
    y = (values * x[..., indices.long()]).sum(-1)
    return y + bias if bias is not None else y


def kernel_calls_writing_over(recording) -> list:
    """A CPU-graph recording's kernel calls whose output is one of their other operands (a dead residual written
    over: ``call_record.may_write_over``)."""
    from srigl_compile.runtime.liveness import extent

    calls = []
    for call in recording.calls:
        tensors = [t for t in call.args if isinstance(t, torch.Tensor)]
        if call.kernel and any(extent(t) == extent(tensors[-1]) for t in tensors[:-1]):
            calls.append(call)
    return calls
