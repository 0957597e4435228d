"""What the graph rewrites must keep: a block's unread parameters and buffer persistence, in-place updates of
inputs seen through aliases and unreadable sources, norm patterns matched exactly, ablated neurons kept
before a softmax or a BatchNorm without statistics, folded constants over every kernel tap, tied weights
left alone. Each test failed on a mutant the rest of the suite let through (mutation probe, session 43)."""

import copy

import pytest
import torch
import torch.nn as nn

from srigl_compile import SRigLConfig, condense, fold_batchnorm, sparsify
from srigl_compile.nn.forward_signature import takes_one_input, updates_inputs_in_place
from srigl_compile.nn.norms import rms_norm_form
from srigl_compile.passes.traced_parent import traced_parent
from tests.helpers import ablate, assert_same


class _Stateful(nn.Module):
    """A block with a parameter and buffers its forward does not read, one of them non-persistent."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.unused_scale = nn.Parameter(torch.full((4,), 3.0))
        self.register_buffer("steps", torch.tensor(7))
        self.register_buffer("scratch", torch.zeros(4), persistent=False)
        self.label = "block"

    def forward(self, x):
        return torch.relu(self.fc(x))


def test_unread_parameters_and_buffers_are_kept_with_their_persistence():
    """The rewritten block keeps the parameter the forward does not read, and a non-persistent buffer
    stays out of its state dict (a checkpoint of the original loads strictly)."""
    block = _Stateful()
    rewritten = traced_parent(block, torch.fx.symbolic_trace(block).graph)
    assert rewritten.unused_scale is block.unused_scale
    assert dict(rewritten.named_parameters()).keys() == dict(block.named_parameters()).keys()
    assert set(rewritten.state_dict()) == set(block.state_dict())
    rewritten.load_state_dict(block.state_dict(), strict=True)


def test_a_deepcopy_of_the_rewritten_block_keeps_its_plain_attributes():
    """The attributes ride in the GraphModule's preserved attributes, so a deepcopy has them."""
    block = _Stateful()
    rewritten = traced_parent(block, torch.fx.symbolic_trace(block).graph)
    copied = copy.deepcopy(rewritten)
    assert copied.label == "block"
    x = torch.randn(2, 4)
    torch.testing.assert_close(copied(x), block(x))


class _GatedRMSNorm(nn.Module):
    """An RMS norm with an optional gate (Mamba-2 style): at gate=None it computes a plain RMS norm."""

    def __init__(self, width: int = 16, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x, gate=None):
        if gate is not None:
            x = x * torch.sigmoid(gate)
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class _PlainRMSNorm(_GatedRMSNorm):
    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def test_a_forward_with_a_second_optional_argument_does_not_take_one_input():
    """Forward(x, gate=None) is two inputs; a gated norm is not lowered as a plain RMS norm (its gate would
    be dropped)."""
    assert takes_one_input(_PlainRMSNorm()) and not takes_one_input(_GatedRMSNorm())
    assert rms_norm_form(_PlainRMSNorm()) == (1e-6, 0.0)
    assert rms_norm_form(_GatedRMSNorm()) is None


class _AliasThenAdd(nn.Module):
    def forward(self, x):
        identity = x
        identity += 1
        return identity


class _ChainedAlias(nn.Module):
    def forward(self, x):
        a = x
        b = a
        b += 1
        return b


class _OutOfPlace(nn.Module):
    def forward(self, x):
        y = x + 1
        y += 1
        return y


def test_an_augmented_assignment_to_a_name_bound_to_an_input_updates_it():
    """``identity = x; identity += 1`` updates x in place (a tensor's += is in place)."""
    assert updates_inputs_in_place(_AliasThenAdd()) and updates_inputs_in_place(_ChainedAlias())
    assert not updates_inputs_in_place(_OutOfPlace())


def test_a_forward_whose_source_cannot_be_read_counts_as_updating_its_inputs():
    """A class defined where inspect finds no source (exec) is taken as unsafe, not as safe."""
    scope = {"nn": nn}
    exec("class NoSource(nn.Module):\n    def forward(self, x):\n        x += 1\n        return x\n", scope)
    assert updates_inputs_in_place(scope["NoSource"]())


class _EpsOutsideSmall(_PlainRMSNorm):
    """X / (rms(x) + eps) with a small eps: equal to the RMS norm within 1e-6 at unit scale, far off at |x| ~
    sqrt(eps)."""

    def forward(self, x):
        return self.weight * x / (x.pow(2).mean(-1, keepdim=True).sqrt() + self.eps)


def test_a_norm_with_eps_outside_the_square_root_is_not_taken_for_an_rms_norm_at_a_small_eps():
    """Only the probe at the scale sqrt(eps) tells these apart when eps is 1e-6."""
    assert rms_norm_form(_EpsOutsideSmall(16, eps=1e-6)) is None
    assert rms_norm_form(_PlainRMSNorm(16, eps=1e-6)) == (1e-6, 0.0)


def test_a_layer_norm_over_two_dimensions_is_not_lowered():
    """The layer-norm kernel normalises the last dimension only; a LayerNorm over (4, 16) keeps torch's."""
    from srigl_compile.nn.norms import LoweredLayerNorm, can_lower_layer_norm

    assert can_lower_layer_norm(nn.LayerNorm(16)) and not can_lower_layer_norm(nn.LayerNorm((4, 16)))
    with pytest.raises(ValueError, match="last dimension only"):
        LoweredLayerNorm(nn.LayerNorm((4, 16)), "any-key")


def test_a_softmax_after_a_layer_keeps_its_ablated_neurons():
    """Softmax mixes features, so an ablated neuron's constant does not stay its own: the producer keeps its
    full width and the condensed model equals the masked one."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.Softmax(dim=-1), nn.Linear(64, 10))
    masked = sparsify(net, SRigLConfig(sparsity=0.8, distribution="uniform", seed=1))
    ablate(masked, {"0": [1, 5, 7]}, {("0", 5): -0.5, ("0", 7): 0.7})
    condensed = condense(masked.eval())
    assert not condensed[0].compact
    assert_same(condensed, masked, torch.randn(6, 32))


def test_a_batchnorm_without_running_statistics_stops_the_walk():
    """A BatchNorm that normalises with batch statistics even in eval mode is no per-channel affine map:
    ablated neurons before it stay, and condense works and equals the masked model."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16, track_running_stats=False), nn.ReLU(),
                        nn.Conv2d(16, 8, 1))
    masked = sparsify(net, SRigLConfig(sparsity=0.6, distribution="uniform", seed=1))
    ablate(masked, {"0": [2, 9]})
    condensed = condense(masked.eval())
    assert not condensed[0].compact and condensed[1].num_features == 16
    assert_same(condensed, masked, torch.randn(4, 3, 8, 8))


def test_a_constant_folded_into_an_unpadded_3x3_consumer_counts_every_kernel_tap():
    """An ablated neuron's constant relu(bias) > 0 reaches all 9 taps of an unpadded 3x3 consumer: the fold
    adds the sum of the taps' weights times it to the consumer's bias."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3))
    # the consumer is kept dense (filter_fn), so its inputs go through passes/layer_edits.py's DenseEdits
    masked = sparsify(net, SRigLConfig(sparsity=0.6, distribution="uniform", seed=1),
                      filter_fn=lambda module, name: name != "2")
    ablate(masked, {"0": [2, 9]}, {("0", 2): 0.8, ("0", 9): 0.5})
    condensed = condense(masked.eval())
    assert condensed[0].compact and type(condensed[2]) is nn.Conv2d and condensed[2].in_channels == 14
    assert_same(condensed, masked, torch.randn(4, 3, 10, 10))


class _TiedPair(nn.Module):
    """Two convolutions sharing one weight; only the first feeds a BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.bn(self.a(x)) + self.b(x)


def test_folding_a_batchnorm_leaves_a_weight_tied_to_another_layer_as_it_was():
    """The fold gives the layer new parameters instead of scaling the shared weight in place."""
    torch.manual_seed(0)
    net = _TiedPair()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
        net.bn.weight.uniform_(0.5, 2)
    net.eval()
    shared = net.b.weight.detach().clone()
    folded = fold_batchnorm(net)
    assert type(folded.bn) is nn.Identity
    torch.testing.assert_close(folded.b.weight, shared, rtol=0, atol=0)
    assert_same(folded, net, torch.randn(2, 3, 6, 6))
