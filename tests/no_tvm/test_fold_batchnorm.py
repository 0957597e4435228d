"""fold_batchnorm: eval BatchNorms after condensed / dense layers fold into them exactly; the others stay."""

import logging

import pytest
import torch
import torch.nn as nn

from srigl_compile import SRigLConfig, condense, sparsify
from srigl_compile.nn.condensed import CondensedConv, CondensedLinear
from srigl_compile.passes.fold_batchnorm import fold_batchnorm, plan_folds
from srigl_compile.passes.graph_capture import capture_graph
from tests import helpers
from tests.helpers import ablate, batchnorm_names, randomize_bn
from tests.models import FoldNet, masked_foldnet

TIGHT = {"rtol": 1e-10, "atol": 1e-10}  # float64 models: the fold only reorders a few roundings


def assert_same(folded, reference, *inputs, tol=TIGHT):
    helpers.assert_same(folded, reference, *inputs, tol=tol)  # float64 models: this module's tight default


FOLDED = [("stem", "bn_stem"), ("expand", "bn_expand"), ("project", "bn_project"), ("fc", "bn_fc")]


def condensed_float64(masked, **kwargs):
    """(masked, condensed) in float64. Condensed from float32: shrink folds a bias-less layer's constant as
    float32 zeros, which a float64 BatchNorm rejects."""
    condensed = condense(masked, **kwargs).double()
    return masked.double(), condensed


@pytest.mark.parametrize("shrink", [True, False])
def test_cnn_folds_what_the_contract_allows_and_keeps_outputs(shrink):
    masked, condensed = condensed_float64(masked_foldnet(), shrink=shrink)
    assert sorted(plan_folds(condensed, capture_graph(condensed))) == sorted(FOLDED)
    folded = fold_batchnorm(condensed)
    assert type(folded) is FoldNet and batchnorm_names(condensed) == batchnorm_names(masked), "input untouched"
    assert batchnorm_names(folded) == ["branch_norm", "shared_norm"]
    for _, bn in FOLDED:
        assert isinstance(getattr(folded, bn), nn.Identity), bn
    assert type(folded.stem) is nn.Conv2d and isinstance(folded.expand, CondensedConv)
    assert folded.expand.compact == shrink and folded.expand.n_active == 29
    assert not folded.project.compact and folded.project.n_active == 15, "ablated neurons of a full-width layer"
    # (fc's output is [batch, features], so its BatchNorm1d is per feature and shrink goes through it too)
    assert isinstance(folded.fc, CondensedLinear) and folded.fc.compact == shrink and folded.fc.n_active == 22
    assert folded.head.fan_in == (22 if shrink else 24)
    assert folded.expand.bias is not None and folded.expand.bias.shape == (29,), "a bias is created"
    for batch in (1, 3):
        x = torch.randn(batch, 3, 8, 8, dtype=torch.float64)
        assert_same(folded, condensed, x)
        assert_same(folded, masked, x, tol={"rtol": 1e-6, "atol": 1e-6})  # shrink's constants were float32


def test_ablated_neurons_of_full_width_layers_output_the_normalised_bias():
    masked, condensed = condensed_float64(masked_foldnet())
    folded = fold_batchnorm(condensed)
    bn = masked.bn_project
    normalised = (masked.project.bias[2] - bn.running_mean[2]) / torch.sqrt(bn.running_var[2] + bn.eps)
    expected = normalised * bn.weight[2] + bn.bias[2]
    assert 2 not in folded.project.active.tolist()
    torch.testing.assert_close(folded.project.full_bias[2], expected.detach(), **TIGHT)


def test_float32_model_folds_within_float_rounding():
    condensed = condense(masked_foldnet())
    folded = fold_batchnorm(condensed)
    assert folded.fc.values.dtype == torch.float32 and folded.fc.bias.dtype == torch.float32
    assert_same(folded, condensed, torch.randn(4, 3, 8, 8), tol={"rtol": 1e-5, "atol": 1e-5})


def test_conv1d_and_linear_after_flatten():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 6, 16, bias=False), nn.BatchNorm1d(16, affine=False), nn.ReLU(),
                        nn.Dropout(0.1), nn.Linear(16, 12), nn.BatchNorm1d(12), nn.Linear(12, 3))
    masked = ablate(randomize_bn(sparsify(net, SRigLConfig(sparsity=0.7, seed=1))), {"0": [2], "4": [0, 5], "8": [3]})
    _, condensed = condensed_float64(masked)
    folded = fold_batchnorm(condensed)
    assert batchnorm_names(folded) == [], "Linear -> BN -> ReLU -> Dropout -> Linear keeps [batch, features]"
    assert isinstance(folded[0], CondensedConv) and isinstance(folded[8], CondensedLinear)
    assert_same(folded, condensed, torch.randn(5, 4, 6, dtype=torch.float64))


class Reshaped(nn.Module):
    """A Linear after a 2-d view/reshape or flatten folds; after one that may keep more dims it must not."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.fc, self.bn = nn.Linear(8, 8), nn.BatchNorm1d(8)

    def forward(self, x):  # x: [B, 2, 4] or [B, 8, 8]
        h = {"view": lambda: x.view(x.size(0), -1), "reshape": lambda: x.reshape(-1, 8),
             "flatten": lambda: x.flatten(1), "torch.flatten": lambda: torch.flatten(x, 1),
             "as is": lambda: x, "flatten from 2": lambda: x.flatten(2)}[self.how]()
        return self.bn(self.fc(h))


@pytest.mark.parametrize("how, folds", [("view", True), ("reshape", True), ("flatten", True),
                                        ("torch.flatten", True), ("as is", False), ("flatten from 2", False)])
def test_batchnorm1d_after_linear_folds_only_on_batch_by_features(how, folds):
    torch.manual_seed(0)
    net = randomize_bn(Reshaped(how)).double().eval()
    folded = fold_batchnorm(net)
    assert isinstance(folded.bn, nn.Identity) == folds
    x = torch.randn(3, 2, 4, dtype=torch.float64) if folds else torch.randn(3, 8, 8, dtype=torch.float64)
    assert_same(folded, net, x)  # [3, 8, 8]: BatchNorm1d normalises dim 1, not the Linear's features


class Untraceable(nn.Module):
    """symbolic_trace fails on the shape check; torch.export captures it from example inputs."""

    def __init__(self, features=8):
        super().__init__()
        self.fc, self.bn = nn.Linear(features, features), nn.BatchNorm1d(features)
        self.conv, self.conv_norm = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.shared_norm = nn.BatchNorm2d(8, affine=False)

    def forward(self, x, v):
        if x.dim() != 4:
            raise ValueError("images are [B, C, H, W]")
        h = self.conv_norm(self.conv(x))
        return self.shared_norm(h) + self.shared_norm(h * 2), self.bn(self.fc(v))


@pytest.mark.parametrize("v_shape, fc_folds", [((3, 8), True), ((3, 8, 8), False)])
def test_torch_export_graphs_fold_by_module_stack_and_recorded_shapes(v_shape, fc_folds):
    torch.manual_seed(0)
    net = Untraceable()
    example = (torch.randn(2, 3, 6, 6), torch.randn(v_shape))
    masked = randomize_bn(sparsify(net, SRigLConfig(sparsity=0.6), example_inputs=example))
    _, condensed = condensed_float64(masked, example_inputs=example)
    example = tuple(t.double() for t in example)
    folded = fold_batchnorm(condensed, example_inputs=example)
    expected = ["shared_norm"] + ([] if fc_folds else ["bn"])
    assert batchnorm_names(folded) == sorted(expected)
    assert isinstance(folded.conv_norm, nn.Identity) and isinstance(folded.conv, CondensedConv)
    assert_same(folded, condensed, *example)


def test_untraceable_model_without_example_inputs_warns_and_stays_correct(caplog):
    torch.manual_seed(0)
    net = randomize_bn(Untraceable()).eval()
    with caplog.at_level(logging.WARNING, logger="srigl_compile.passes.fold_batchnorm"):
        folded = fold_batchnorm(net)
    assert "BatchNorm layers stay unfolded" in caplog.text and "symbolic_trace failed" in caplog.text
    assert batchnorm_names(folded) == batchnorm_names(net)
    assert_same(folded, net, torch.randn(2, 3, 6, 6), torch.randn(3, 8), tol={"rtol": 0, "atol": 0})


class NotFoldable(nn.Module):
    """A conv + BatchNorm pair that looks foldable but is not, for the reason named by ``case``."""

    def __init__(self, case):
        super().__init__()
        self.case = case
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm2d(6, track_running_stats=case != "batch statistics")
        if case == "two names":
            self.alias = self.bn  # symbolic_trace names the call "bn"; replacing "bn" would leave "alias"

    def forward(self, x):
        if self.case == "two names":
            return self.alias(self.conv(x))
        c = self.conv(x)
        y = self.bn(c)
        if self.case == "conv called twice":
            return y + self.conv(x)
        if self.case == "conv output used twice":
            return y + c
        if self.case == "weight read by hand":
            return y * self.bn.weight.sum()
        return y


@pytest.mark.parametrize("case", ["batch statistics", "two names", "conv called twice", "weight read by hand",
                                  "conv output used twice"])
def test_unfoldable_pairs_are_left_alone(case):
    torch.manual_seed(0)
    net = NotFoldable(case).double().eval()
    if case != "batch statistics":
        randomize_bn(net)
    assert plan_folds(net, capture_graph(net)) == []
    folded = fold_batchnorm(net)
    assert isinstance(folded.bn, nn.BatchNorm2d)
    assert_same(folded, net, torch.randn(2, 3, 7, 7, dtype=torch.float64))


def test_dense_layers_fold_like_torch_fusion():
    torch.manual_seed(0)
    net = randomize_bn(nn.Sequential(nn.Flatten(), nn.Linear(12, 6, bias=False), nn.BatchNorm1d(6, affine=False),
                                     nn.Linear(6, 4), nn.BatchNorm1d(4))).eval()
    folded = fold_batchnorm(net)
    assert batchnorm_names(folded) == [] and folded[1].bias is not None
    fused = torch.nn.utils.fusion.fuse_linear_bn_eval(net[3], net[4])
    torch.testing.assert_close(folded[3].weight, fused.weight)
    torch.testing.assert_close(folded[3].bias, fused.bias)
    assert_same(folded, net, torch.randn(5, 3, 4), tol={"rtol": 1e-5, "atol": 1e-5})
