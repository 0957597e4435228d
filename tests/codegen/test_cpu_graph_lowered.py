"""cpu_graph on lowered models: a replay runs the recorded kernel calls and equals the lowered model's eager forward
and the masked model on new inputs (ResNet with fused epilogues, planar and strided convolutions, batch chunks; a
ViT with attention, layer norm and GELU kernels); changed operands record again."""

import pytest
import torch

from srigl_compile import SRigLConfig, cpu_graph, lower, sparsify
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
