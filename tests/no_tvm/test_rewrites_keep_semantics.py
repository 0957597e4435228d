"""What a probe of unseen architectures found the graph rewrites of ``lower`` change: each case runs the pass and
checks the model against itself, bit for bit or as the masked model. Fusion: a Sequential's activation fused while
the forward also read the layer's own output; a block's ``x += ...`` on its input lost by its trace; ``y + y``
taken as a residual; a rewritten block losing its class, attributes and uncalled submodules. Shrinking: a Linear
reading a convolution's last dimension given the convolution's channels."""

import copy
import pickle

import torch
import torch.nn as nn
import torch.nn.functional as F

from srigl_compile import SRigLConfig, condense, sparsify
from srigl_compile.nn.condensed import CondensedConv
from tests.fusion import condensed, fused_unchanged
from tests.helpers import ablate, assert_same


class _FeatureExtractor(nn.Module):
    """Loops over its Sequential and keeps the first convolution's pre-activation features (a perceptual loss)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1),
                                      nn.ReLU())

    def forward(self, x):
        kept = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i == 0:
                kept.append(x)
        return x.mean() + kept[0]


def test_a_sequential_layer_whose_own_output_is_read_keeps_its_activation_in_torch():
    """Fused, the kept features came back ReLU'd (7.2 off)."""
    fuse, fused = fused_unchanged(condensed(_FeatureExtractor()), torch.randn(2, 3, 8, 8))
    assert "features.0" not in fuse.fused and type(fused.features[1]) is nn.ReLU
    assert fuse.fused == {"features.2": "relu"}, "the second convolution's output is read by its ReLU alone"


class _UpdatesItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        identity = x
        identity += self.conv(x)  # (on the caller's tensor, through a name bound to it)
        return F.relu(x)


class _ReadsAfter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block = nn.Conv2d(3, 8, 3, padding=1), _UpdatesItsInput()

    def forward(self, x):
        h = self.stem(x)
        return self.block(h) + h  # (h was updated by the block)


def test_a_block_updating_its_input_in_place_is_not_rewritten():
    """Its trace records ``x += ...`` out of place: the caller's tensor kept its old values (8.0 off)."""
    fuse, fused = fused_unchanged(condensed(_ReadsAfter()), torch.randn(2, 3, 6, 6))
    assert type(fused.block) is _UpdatesItsInput and "block.conv" not in fuse.fused


class _RebindsItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = x.contiguous()  # (the input itself: it is contiguous already)
        x += self.conv(x)
        return F.relu(x)


class _CallsRebinds(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = _RebindsItsInput()

    def forward(self, x):
        h = x * 1.5
        return self.block(h) + h


def test_a_block_adding_in_place_to_a_name_that_held_its_input_is_not_rewritten_even_rebound():
    """A probe found ``x = x.contiguous(); x += conv(x)`` fused (0.085 off): a rebinding may hand back the input
    itself, so any += on a name that ever held an input keeps the block as it is."""
    fuse, fused = fused_unchanged(condensed(_CallsRebinds()), torch.randn(2, 8, 6, 6))
    assert type(fused.block) is _RebindsItsInput and fuse.fused == {}


class _Doubles(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return F.relu(y + y)


class _CallsDoubles(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = _Doubles()

    def forward(self, x):
        return self.block(x)


def test_a_value_added_to_itself_is_no_residual():
    """The layer's own output was taken as its residual, and erasing its node raised inside fx."""
    fuse, fused = fused_unchanged(condensed(_CallsDoubles()), torch.randn(2, 4, 6, 6))
    assert fuse.fused == {} and type(fused.block) is _Doubles  # (the add reads the layer twice: no chain to fuse)


class _Described(nn.Module):
    """A block with more than its forward: a plain attribute, a head only a method calls, an unread buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.aux_head = nn.Conv2d(16, 4, 1)
        self.register_buffer("calls", torch.zeros(()))
        self.out_channels = 16

    def forward(self, x):
        return F.relu(self.conv(x))

    def aux(self, y):
        return self.aux_head(y).mean((2, 3))


class _ReadsAttributes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = _Described()

    def forward(self, x):
        y = self.block(x)
        return y.reshape(y.shape[0], self.block.out_channels, -1).mean(-1) + self.block.aux(y).sum()


class _Slotted(nn.Module):
    __slots__ = ("scale",)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.scale = 2.0

    def forward(self, x):
        return F.relu(self.conv(x))

    def described(self) -> str:
        return f"scale {self.scale}"


def test_a_rewritten_block_keeps_the_values_of_its_slots():
    """A probe found ``__slots__`` values (not in ``vars``) gone from the rewritten block."""
    from srigl_compile.passes.traced_parent import traced_parent

    block = _Slotted()
    rewritten = traced_parent(block, torch.fx.symbolic_trace(block).graph)
    assert isinstance(rewritten, _Slotted) and rewritten.scale == 2.0 and rewritten.described() == "scale 2.0"
    loaded = pickle.loads(pickle.dumps(rewritten))
    assert isinstance(loaded, _Slotted) and loaded.described() == "scale 2.0"


def test_a_rewritten_block_keeps_its_class_attributes_methods_and_submodules():
    """The rewritten block was a GraphModule that only bore the class's name: the model's forward failed on
    ``self.block.out_channels``."""
    model = condensed(_ReadsAttributes())
    names = set(model.state_dict())
    fuse, fused = fused_unchanged(model, torch.randn(2, 8, 5, 5))
    assert fuse.fused == {"block.conv": "relu"}
    block = fused.block
    assert isinstance(block, torch.fx.GraphModule) and isinstance(block, _Described)
    assert block.out_channels == 16 and isinstance(block.aux_head, CondensedConv) and set(fused.state_dict()) == names
    copied = copy.deepcopy(fused)
    assert isinstance(copied.block, _Described) and copied.block.out_channels == 16
    assert copied.block.aux_head is not block.aux_head and copied.block.conv.epilogue == "relu"
    x = torch.randn(3, 8, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(copied(x), fused(x), rtol=0, atol=0)
    # A pickle (save_lowered, torch.save) kept the attributes but gave back a plain GraphModule: the model's
    # forward then failed on self.block.aux (a probe, session 42).
    loaded = pickle.loads(pickle.dumps(fused))
    assert isinstance(loaded.block, _Described) and isinstance(loaded.block, torch.fx.GraphModule)
    assert loaded.block.out_channels == 16 and loaded.block.conv.epilogue == "relu"
    assert set(loaded.state_dict()) == names
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), fused(x), rtol=0, atol=0)
    again = pickle.loads(pickle.dumps(loaded))  # (what a load gives back pickles as its class again)
    assert isinstance(again.block, _Described) and again.block.out_channels == 16


def test_a_rewritten_block_whose_class_pickle_cannot_name_pickles_as_fx_gives_it():
    from srigl_compile.passes.traced_parent import traced_parent

    class Local(_Slotted):  # (a class inside a function: pickle cannot import it by name)
        pass

    block = Local()
    rewritten = traced_parent(block, torch.fx.symbolic_trace(block).graph)
    assert isinstance(rewritten, Local)
    loaded = pickle.loads(pickle.dumps(rewritten))
    assert isinstance(loaded, torch.fx.GraphModule)
    assert not isinstance(loaded, _Slotted) and loaded.scale == 2.0
    x = torch.randn(1, 8, 4, 4)
    torch.testing.assert_close(loaded(x), block(x), rtol=0, atol=0)


class _ConvThenTimeMix(nn.Module):
    def __init__(self, length: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 16, 3, padding=1)
        self.time_mix = nn.Linear(length, length)  # (over the last dimension: time, not the channels)
        self.head = nn.Linear(length, 5)

    def forward(self, x):
        return self.head(self.time_mix(F.relu(self.conv(x))).mean(1))


class _LinearThenConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)  # (over the last dimension of [B, 16, 16])
        self.conv = nn.Conv1d(16, 4, 1)  # (over dimension 1)

    def forward(self, x):
        return self.conv(F.gelu(self.fc(x)))


def test_ablated_neurons_are_not_cut_from_a_consumer_reading_another_dimension():
    """With the length equal to the channels left (12) the output was 1.05 off, silently; with 16, every call
    failed naming the Linear. The mirror case (a Linear's neurons into a convolution's channels) failed too."""
    for model, producer, x in ((_ConvThenTimeMix(12), "conv", torch.randn(2, 4, 12)),
                               (_ConvThenTimeMix(16), "conv", torch.randn(2, 4, 16)),
                               (_LinearThenConv(), "fc", torch.randn(2, 16, 16))):
        torch.manual_seed(0)
        masked = sparsify(model, SRigLConfig(sparsity=0.7, distribution="uniform"))
        with torch.no_grad():
            getattr(masked, producer).bias.fill_(0.5)  # (the ablated neurons' constant output)
        ablate(masked, {producer: [1, 5, 9, 13]})
        masked.eval()
        shrunk = condense(masked)
        assert not getattr(shrunk, producer).compact, f"{type(model).__name__}: {producer} keeps its width"
        assert_same(shrunk, masked, x)
