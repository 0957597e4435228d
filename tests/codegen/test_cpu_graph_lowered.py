"""cpu_graph on lowered models: a replay runs the recorded kernel calls and equals the lowered model's eager forward
and the masked model on new inputs (ResNet with fused epilogues, planar and strided convolutions, batch chunks; a
ViT with attention, layer norm and GELU kernels); changed operands record again."""

import pytest
import torch

from srigl_compile import SRigLConfig, cpu_graph, lower, sparsify
from srigl_compile.codegen.backends.llvm import LlvmConfig
from srigl_compile.nn.lowered import LoweredConv, LoweredLinear
from srigl_compile.zoo import ResNet, SmallViT
from tests.helpers import randomize_bn

pytestmark = pytest.mark.tvm


def _models(name):
    torch.manual_seed(0)
    if name == "resnet":
        net, x = ResNet(10, blocks=(1, 2), width=8), torch.randn(2, 3, 32, 32)
        masked = randomize_bn(sparsify(net, SRigLConfig(sparsity=0.8))).eval()
    else:
        net, x = SmallViT((3, 16, 16), 10), torch.randn(2, 3, 16, 16)
        masked = sparsify(net, SRigLConfig(sparsity=0.8, distribution="uniform"), example_inputs=(x,)).eval()
    return masked, lower(masked, example_inputs=(x,), progress=False), x


@pytest.mark.parametrize("name", ["resnet", "vit"])
@pytest.mark.parametrize("batch", [1, 3])
def test_replays_run_the_kernels_and_equal_the_eager_forward(name, batch):
    masked, lowered, x = _models(name)
    graphed = cpu_graph(lowered)
    shape = (batch, *x.shape[1:])
    with torch.inference_mode():
        for seed in range(3):
            x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
            got = graphed(x)
            torch.testing.assert_close(got, lowered(x), rtol=0, atol=0)
            torch.testing.assert_close(got, masked(x), rtol=1e-4, atol=1e-4)
    (entry,) = graphed._entries.values()
    kernels = [call for call in entry.recording.calls if type(call.fn).__module__.startswith("tvm")]
    layers = [m for m in lowered.modules() if isinstance(m, (LoweredConv, LoweredLinear))]
    assert len(kernels) >= len(layers) and graphed.replays == 3


def test_changed_operands_record_again():
    masked, lowered, x = _models("resnet")
    graphed = cpu_graph(lowered)
    with torch.no_grad():
        graphed(x)
        layer = next(m for m in lowered.modules() if isinstance(m, LoweredConv) and m.direct)
        layer.values.mul_(-1.0)  # read by the kernel as it is
        torch.testing.assert_close(graphed(x), lowered(x), rtol=0, atol=0)
        layer.indices.copy_(layer.indices.flip(-1))  # other columns: the layer's offsets are derived anew
        torch.testing.assert_close(graphed(x), lowered(x), rtol=0, atol=0)
    assert graphed.replays == 3


class _Block(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(width, width, 1)

    def forward(self, x):
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + x)


class _Net(torch.nn.Module):
    """A stem and a block whose last 1x1 convolution adds the block's input; ``keep`` says what else uses it."""

    def __init__(self, keep, width=16):
        super().__init__()
        self.stem, self.block, self.keep = torch.nn.Conv2d(3, width, 3, padding=1), _Block(width), keep

    def forward(self, x):
        h = self.stem(x)
        y = self.block(h)
        if self.keep == "output":
            return y, h
        return y * h if self.keep == "read" else y


def _writes_over(recording):
    """The recorded kernel calls whose output is one of their other operands."""
    from srigl_compile.runtime.liveness import extent

    calls = []
    for call in recording.calls:
        tensors = [t for t in call.args if isinstance(t, torch.Tensor)]
        if call.kernel and any(extent(t) == extent(tensors[-1]) for t in tensors[:-1]):
            calls.append(call)
    return calls


@pytest.mark.parametrize("keep", ["none", "output", "read"])
def test_a_residual_never_read_again_is_written_over(keep):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    masked = sparsify(_Net(keep), SRigLConfig(sparsity=0.7, distribution="uniform")).eval()
    # (kernels only: a layer this small could run its dense form instead)
    lowered = lower(masked, LlvmConfig(dense_fallback=False, progress=False), example_inputs=(x,))
    assert lowered.block.conv2.epilogue == "add_relu"  # (the add is the kernel's: the case under test)
    graphed = cpu_graph(lowered)
    with torch.inference_mode():
        for seed in range(3):
            x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
            before = x.clone()
            torch.testing.assert_close(graphed(x), lowered(x), rtol=0, atol=0)
            assert torch.equal(x, before)
    (entry,) = graphed._entries.values()
    assert len(entry.recording.residuals) == 1  # the one kernel with a residual asked
    # only where nothing reads the block's input after the add does the kernel write over it
    assert len(_writes_over(entry.recording)) == (1 if keep == "none" else 0)


@pytest.mark.parametrize("name", ["resnet", "vit"])
def test_model_blocks_write_over_their_inputs(name):
    """ResNet blocks whose residual is their input; a ViT's attention and MLP outputs (the residual stream)."""
    masked, _, x = _models(name)
    # (kernels only: layers this small could run their dense forms instead)
    lowered = lower(masked, LlvmConfig(dense_fallback=False, progress=False), example_inputs=(x,))
    graphed = cpu_graph(lowered)
    # the ViT's 17 tokens an image in whole tiles of rows (64 images): outputs laid out as their residuals
    shape = (64, *x.shape[1:]) if name == "vit" else x.shape
    with torch.inference_mode():
        for seed in range(2):
            x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(graphed(x), lowered(x), rtol=0, atol=0)
    (entry,) = graphed._entries.values()
    assert len(_writes_over(entry.recording)) >= 2
