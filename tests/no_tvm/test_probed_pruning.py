"""What a probe of the prune -> fine-tune -> lower path on vision-style models found (2026-12-06, session 41):
a failing BatchNorm recalibration left an in-place model pruned with its statistics reset; layers pruned by
torch.nn.utils.prune failed inside torch's deepcopy; a frozen layer was blamed on the optimizer."""

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as torch_prune

from srigl_compile import ConfigError, LayerError, SRigLConfig, SRigLUpdater, from_sparse_weights, prune, sparsify
from srigl_compile.nn.masked import is_masked
from tests.models import bn_mlp

UNIFORM = SRigLConfig(sparsity=0.5, distribution="uniform")




@pytest.mark.parametrize("criterion, calibration, match", [
    ("magnitude", [torch.randn(4, 16), torch.randn(4, 9)], r"calibration input #2 does not fit the model"),
    ("wanda", [torch.randn(4, 16), torch.randn(1, 16)], r"calibration input #2 holds one value per channel for a "
                                                       r"BatchNorm.*drop_last=True"),
], ids=["input-the-model-cannot-take", "one-sample-batch"])
def test_a_failing_recalibration_leaves_an_in_place_model_as_it_was(criterion, calibration, match):
    net = bn_mlp()
    before = {name: tensor.clone() for name, tensor in net.state_dict().items()}
    with pytest.raises(ConfigError, match=match):
        prune(net, UNIFORM, criterion, calibration=calibration, recalibrate_batchnorm=True, inplace=True)
    assert not any(is_masked(m) for m in net.modules()) and not net.training
    assert net.state_dict().keys() == before.keys()
    assert all(torch.equal(net.state_dict()[name], tensor) for name, tensor in before.items())


def test_a_model_that_is_no_module_is_a_type_error_before_the_recalibration_check():
    with pytest.raises(TypeError, match="prune expects an nn.Module, not str"):
        prune("model", UNIFORM, calibration=[torch.randn(2, 16)], recalibrate_batchnorm=True, inplace=True)


def test_a_recalibration_that_works_still_updates_the_statistics_in_place():
    net = bn_mlp()
    pruned = prune(net, UNIFORM, "magnitude", calibration=[torch.randn(8, 16) for _ in range(2)],
                   recalibrate_batchnorm=True, inplace=True)
    assert pruned is net and is_masked(net[0]) and not torch.allclose(net[1].running_var, torch.full((32,), 4.0))


def _torch_pruned() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    torch_prune.ln_structured(net[0], "weight", amount=0.5, n=1, dim=1)  # (16 of 32 inputs in every row)
    return net


@pytest.mark.parametrize("call", [
    lambda net: from_sparse_weights(net), lambda net: from_sparse_weights(net, inplace=True),
    lambda net: prune(net, UNIFORM), lambda net: sparsify(net, UNIFORM)], ids=["import", "import-in-place",
                                                                               "prune", "sparsify"])
def test_layers_pruned_by_torch_and_not_made_permanent_are_named(call):
    """torch's deepcopy error came instead, or (in place) "no layer has zero weights" and a warning pointing to
    parametrize.remove_parametrizations, which raises for these layers."""
    with pytest.raises(LayerError, match=r"layers \['0'\] are pruned by torch.nn.utils.prune.*prune.remove"):
        call(_torch_pruned())
    net = _torch_pruned()
    torch_prune.remove(net[0], "weight")  # (the fix the error names)
    assert int(from_sparse_weights(net)[0].mask.sum(1).unique()) == 16


def test_a_frozen_layer_is_named_before_the_optimizer_it_is_missing_from():
    """An optimizer built from the trainable parameters lacks the frozen weights too: the error blamed it."""
    net = sparsify(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), UNIFORM)
    net[0].weight.requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(LayerError, match=r"sparse layers \['0'\] have frozen weights"):
        SRigLUpdater(net, optimizer, UNIFORM, total_steps=10)
