"""lower() folds eval BatchNorms into the layers before them (fold_batchnorm=True, the default), or keeps them."""

import pytest
import torch
import torch.nn as nn

from srigl_compile import SRigLConfig, lower, sparsify
from srigl_compile.nn.lowered import LoweredConv, LoweredLinear
from tests.helpers import ablate, assert_same, batchnorm_names, randomize_bn
from tests.models import FoldNet, ResidualCNN, masked_foldnet

pytestmark = pytest.mark.tvm


@pytest.fixture(scope="module")
def masked_cnn():
    torch.manual_seed(0)
    masked = randomize_bn(sparsify(ResidualCNN(), SRigLConfig(sparsity=0.8, seed=2)))
    return ablate(masked, {"expand": [0, 3, 9], "stem": [1], "project": [4]}, {("project", 4): 0.5})


def test_lowered_cnn_has_no_batchnorm_left_and_equals_the_masked_model(masked_cnn):
    lowered = lower(masked_cnn, progress=False)
    assert type(lowered) is ResidualCNN and batchnorm_names(lowered) == []
    assert all(isinstance(getattr(lowered, f"bn{i}"), nn.Identity) for i in range(4))
    assert isinstance(lowered.expand, LoweredConv) and lowered.expand.compact
    assert lowered.project.n_active == 16, "full width, one ablated neuron run as a zero row with its folded bias"
    for batch in (1, 3):
        assert_same(lowered, masked_cnn, torch.randn(batch, 3, 8, 8))


def test_fold_batchnorm_false_keeps_them(masked_cnn):
    lowered = lower(masked_cnn, progress=False, fold_batchnorm=False)
    assert batchnorm_names(lowered) == ["bn0", "bn1", "bn2", "bn3"]
    assert_same(lowered, masked_cnn, torch.randn(2, 3, 8, 8))


def test_lowered_foldnet_keeps_the_unfoldable_batchnorms():
    masked = masked_foldnet()
    lowered = lower(masked, progress=False)
    assert type(lowered) is FoldNet and batchnorm_names(lowered) == ["branch_norm", "shared_norm"]
    assert isinstance(lowered.fc, LoweredLinear)
    assert isinstance(lowered.stem, LoweredConv), "the dense stem too, as a layer of full fan-in (its BN folded)"
    for batch in (1, 4):
        assert_same(lowered, masked, torch.randn(batch, 3, 8, 8))
