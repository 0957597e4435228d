"""Lowered convolutions compute their fused ReLU / residual add in the kernel: same outputs as unfused, bit for bit."""

import pytest
import torch

from srigl_compile import SRigLConfig, load_lowered, lower, save_lowered, sparsify
from srigl_compile.nn.lowered import LoweredConv
from srigl_compile.runtime.registry import get_handle
from srigl_compile.zoo import ResNet
from tests.helpers import randomize_bn

pytestmark = pytest.mark.tvm


@pytest.fixture(scope="module")
def lowered_pair():
    torch.manual_seed(0)
    masked = randomize_bn(sparsify(ResNet(10, blocks=(1, 2), width=8), SRigLConfig(sparsity=0.8))).eval()
    x = torch.randn(2, 3, 32, 32)
    fused = lower(masked, example_inputs=(x,), progress=False)
    plain = lower(masked, example_inputs=(x,), progress=False, fuse_epilogues=False)
    return masked, fused, plain


def test_every_bottleneck_relu_and_residual_add_runs_in_the_kernels(lowered_pair):
    _, fused, plain = lowered_pair
    epilogues = {name: get_handle(m.kernel_key).spec.epilogue for name, m in fused.named_modules()
                 if isinstance(m, LoweredConv) and m.fused_epilogue}
    assert sorted(e for n, e in epilogues.items() if n.endswith("conv3")) == ["add_relu"] * 3
    assert all(epilogues[f"layers.{i}.conv2"] == "relu" for i in range(3))
    assert not any(isinstance(m, LoweredConv) and m.fused_epilogue for m in plain.modules())
    for block in fused.layers:  # only what follows a layer kept dense (too small to sparsify) is left
        for node in [n for n in block.graph.nodes if n.op == "call_function"]:
            source = node.args[0]
            while type(block.get_submodule(source.target)) is torch.nn.Identity:  # a folded BatchNorm
                source = source.args[0]
            assert type(block.get_submodule(source.target)) is torch.nn.Conv2d, f"{node} after {source}"


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (1, 3, 27, 19)])  # the example's size, and one needing crops
def test_fused_outputs_equal_unfused_bit_for_bit_and_the_masked_model(lowered_pair, shape):
    masked, fused, plain = lowered_pair
    x = torch.randn(shape)
    with torch.no_grad():
        got, unfused, reference = fused(x), plain(x), masked(x)
    torch.testing.assert_close(got, unfused, rtol=0, atol=0)
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4)


def test_a_fused_model_saves_loads_and_exports(lowered_pair, tmp_path):
    _, fused, _ = lowered_pair
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = fused(x)
        save_lowered(fused, tmp_path / "model")
        torch.testing.assert_close(load_lowered(tmp_path / "model")(x), want, rtol=0, atol=0)
        program = torch.export.export(fused, (x,), strict=False)
        torch.testing.assert_close(program.module()(x), want, rtol=0, atol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_kernels_compute_the_relu_at_every_batch(bias):
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(96, 128, bias=bias), torch.nn.ReLU(), torch.nn.Linear(128, 64),
                              torch.nn.ReLU(), torch.nn.Linear(64, 10))
    masked = sparsify(net, SRigLConfig(sparsity=0.8, distribution="uniform")).eval()
    fused = lower(masked, progress=False)
    plain = lower(masked, progress=False, fuse_epilogues=False)
    assert [get_handle(fused[i].kernel_key).spec.epilogue for i in (0, 2, 4)] == ["relu", "relu", ""]
    assert all(fused[i].fused_epilogue for i in (0, 2)) and isinstance(fused[1], torch.nn.Identity)
    for rows in (1, 2, 5, 64, 300):  # the row, mid, col and fused-pack kernels
        x = torch.randn(rows, 96)
        with torch.no_grad():
            got = fused(x)
            torch.testing.assert_close(got, plain(x), rtol=0, atol=0)
            torch.testing.assert_close(got, masked(x), rtol=1e-5, atol=1e-5)


def test_a_kernel_with_an_epilogue_tunes_as_its_plain_shape_and_shares_its_record(tmp_path):
    from srigl_compile.codegen.cpu_target import host_llvm_target
    from srigl_compile.codegen.tuning import select_params
    from srigl_compile.runtime.llvm_params import ColParams
    from srigl_compile.runtime.spec import KernelSpec

    target = host_llvm_target()
    fused = KernelSpec(48, 96, 16, "int16", True, op="conv", epilogue="add_relu")
    space = [ColParams(16, 8, 2, 32), ColParams(32, 4, 1, 64)]
    chosen = select_params(fused, "offset", target, tune=True, cache_dir=tmp_path, space=space, progress=False)
    assert chosen in space
    plain = KernelSpec(48, 96, 16, "int16", True, op="conv")
    assert select_params(plain, "offset", target, tune=False, cache_dir=tmp_path) == chosen


class _GlobalContext(torch.nn.Module):
    """A global-context block's add: the convolution's [B, C, 1, 1] output broadcasts up to the residual's shape,
    which a kernel adding a residual to its output cannot do (a probe found every call failing)."""

    def __init__(self, relu: bool, bias: bool) -> None:
        super().__init__()
        self.conv, self.relu = torch.nn.Conv2d(16, 16, 1, bias=bias), relu

    def forward(self, x):
        y = self.conv(torch.nn.functional.adaptive_avg_pool2d(x, 1)) + x
        return torch.relu(y) if self.relu else y


class _WithContext(torch.nn.Module):
    def __init__(self, relu: bool, bias: bool) -> None:
        super().__init__()
        self.block, self.head = _GlobalContext(relu, bias), torch.nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        return self.head(self.block(x))


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_a_fused_add_that_broadcasts_the_output_up_is_added_after_the_kernel(relu, bias):
    from srigl_compile import cpu_graph

    torch.manual_seed(0)
    masked = sparsify(_WithContext(relu, bias), SRigLConfig(sparsity=0.8, distribution="uniform")).eval()
    x = torch.randn(2, 16, 9, 7)
    lowered = lower(masked, progress=False)
    conv = lowered.block.conv
    assert conv.epilogue == ("add_relu" if relu else "add") and conv.fused_epilogue
    graphed = cpu_graph(lowered)
    with torch.no_grad():
        for inputs in (x, torch.randn(3, 16, 5, 5)):
            want = masked(inputs)
            torch.testing.assert_close(lowered(inputs), want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(graphed(inputs), want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(graphed(inputs), want, rtol=1e-5, atol=1e-5)


def test_a_float64_residual_gives_the_float64_sum_torch_gives():
    """torch adds a float32 output and a float64 residual in float64; the kernel adds in float32 (a probe found
    the lowered layer returning float32 where the masked one returned float64)."""
    torch.manual_seed(0)
    masked = sparsify(ResNet(10, blocks=(1,), width=8), SRigLConfig(sparsity=0.8)).eval()
    lowered = lower(masked, example_inputs=(torch.randn(1, 3, 16, 16),), progress=False)
    conv3 = lowered.layers[0].conv3
    assert conv3.fused_epilogue and "add" in conv3.epilogue
    x = torch.randn(1, conv3.in_channels, 8, 8)
    residual = torch.randn(1, conv3.out_channels, 8, 8, dtype=torch.float64)
    conv3.__dict__.pop("_dense_form", None)  # (the kernel's path only)
    with torch.no_grad():
        got, in_float32 = conv3(x, residual=residual), conv3(x, residual=residual.float())
        again = conv3(x, residual=residual)  # (the float32 call left a prepared repeat call at this shape)
    assert got.dtype == again.dtype == torch.float64 and in_float32.dtype == torch.float32
    torch.testing.assert_close(got, in_float32.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(again, got, rtol=0, atol=0)


def test_lower_names_the_modules_whose_hooks_it_drops():
    """A probe found hooks on replaced, folded and fused modules silently gone (a feature extractor's)."""
    import warnings

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Tanh())
    masked = sparsify(net, SRigLConfig(sparsity=0.8, distribution="uniform")).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (none without hooks)
        lower(masked, progress=False)
    fired = []
    for index, module in enumerate(masked):
        module.register_forward_hook(lambda m, args, out, index=index: fired.append(index))
    with pytest.warns(UserWarning, match=r"forward hooks on \['0', '1', '2', '3'\] do not run in the lowered model"):
        lowered = lower(masked, progress=False)
    with torch.no_grad():
        lowered(torch.randn(1, 8, 5, 5))
    assert fired == [4]  # (the Tanh, left as it was, keeps its hook)
