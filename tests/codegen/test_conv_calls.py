"""What a lowered convolution keeps from call to call: each layer's offsets per image size, the scratch buffers of
its temporaries, recycled result buffers, and its last prepared call; none may leak into a result still held."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from srigl_compile import SRigLConfig, lower, sparsify
from srigl_compile.codegen.backends.llvm import LlvmConfig
from srigl_compile.nn.lowered import LoweredConv


@pytest.mark.tvm
def test_offsets_are_cached_per_layer_even_when_many_layers_share_a_kernel(monkeypatch):
    from srigl_compile.runtime import llvm_conv

    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Conv2d(8, 8, 3, padding=1) for _ in range(20)])  # one shape: one shared handle
    masked = sparsify(net, SRigLConfig(sparsity=0.7, distribution="uniform")).eval()
    lowered = lower(masked, progress=False)
    assert len({m.kernel_key for m in lowered}) == 1
    calls = []
    real = llvm_conv.column_offsets
    monkeypatch.setattr(llvm_conv, "column_offsets", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        lowered(x)
        assert len(calls) == 20, "each layer computes its offsets once for this size"
        torch.testing.assert_close(lowered(x), masked(x), rtol=1e-4, atol=1e-4)
    assert len(calls) == 20, "the second forward reuses all 20 layers' offsets"


@pytest.mark.tvm
@pytest.mark.parametrize("kernel, padding, stride", [(1, 0, 1), (3, 1, 1), (3, 1, 2)])
def test_results_are_not_views_of_the_reused_scratch_buffers(kernel, padding, stride):
    """The pad, phase-split and uncropped output buffers are reused from call to call; a result must survive the
    next call. One image of one output channel (1x1: no padding columns, a ragged last tile) is the case where a
    cropped result is contiguous already."""
    from srigl_compile.runtime.scratch import scratch_bytes

    torch.manual_seed(0)
    masked = sparsify(nn.Sequential(nn.Conv2d(3, 1, kernel, stride=stride, padding=padding)),
                      SRigLConfig(sparsity=0.5, distribution="uniform"))
    lowered = lower(masked, progress=False)
    assert lowered[0].direct
    first_x, second_x = torch.randn(1, 3, 9, 7), torch.randn(1, 3, 9, 7)
    with torch.no_grad():
        first = lowered(first_x)
        kept = first.clone()
        lowered(second_x)
        assert scratch_bytes() > 0
        torch.testing.assert_close(first, kept, rtol=0, atol=0)
        torch.testing.assert_close(first, masked.eval()(first_x), rtol=1e-5, atol=1e-5)

@pytest.mark.tvm
def test_recycled_results_are_never_shared_with_a_result_still_held(monkeypatch):
    """Convolution (cropped and not), max-pool and linear results come from recycled buffers once nothing holds
    them: a forward's output kept by the caller survives the next forwards; once dropped, its memory is reused."""
    from srigl_compile.runtime import scratch as scratch_module

    scratch_module.release_scratch()
    monkeypatch.setattr(scratch_module, "RECYCLE_FROM_BYTES", 0)
    torch.manual_seed(0)
    masked = sparsify(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                    nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8 * 5 * 5, 16)),
                      SRigLConfig(sparsity=0.5, distribution="uniform")).eval()
    lowered = lower(masked, progress=False)
    xs = [torch.randn(70, 3, 10, 10) for _ in range(3)]  # 70 rows: the Linear's 64-row tiles and a tail
    with torch.no_grad():
        expected = [masked(x) for x in xs]
        first, second = lowered(xs[0]), lowered(xs[1])
        assert first.data_ptr() != second.data_ptr()
        for out, want in ((first, expected[0]), (second, expected[1])):
            torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
        ptr = first.data_ptr()
        del first
        third = lowered(xs[2])
        torch.testing.assert_close(third, expected[2], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(second, expected[1], rtol=1e-4, atol=1e-4)
        assert third.data_ptr() == ptr  # the dropped result's buffer served again


@pytest.mark.tvm
@pytest.mark.parametrize("first, then", [(torch.inference_mode, torch.no_grad), (torch.no_grad, torch.inference_mode)])
def test_scratch_buffers_serve_inference_mode_and_no_grad_alike(first, then, monkeypatch):
    """A scratch buffer first made under inference_mode must still take in-place writes under no_grad (an
    inference tensor would not), and the other way round: tiles, phase images and padded images."""
    from srigl_compile.runtime import scratch as scratch_module

    scratch_module.release_scratch()
    monkeypatch.setattr(scratch_module, "MMAPPED_BYTES", 0)  # pad into scratch at this size too
    monkeypatch.setattr(scratch_module, "RECYCLE_FROM_BYTES", 0)  # and recycle every result
    torch.manual_seed(0)
    masked = sparsify(nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Conv2d(8, 8, 3, padding=1),
                                    nn.Flatten(), nn.Linear(8 * 8 * 8, 16)),
                      SRigLConfig(sparsity=0.5, distribution="uniform")).eval()
    lowered = lower(masked, progress=False)
    x = torch.randn(70, 3, 16, 16)  # 70 rows: the Linear runs on 64-row tiles
    with first():
        a = lowered(x)
    with then():
        b = lowered(x)
    with torch.no_grad():
        expected = masked(x)
    torch.testing.assert_close(a, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.tvm
def test_repeated_calls_reuse_the_prepared_call_only_while_shapes_and_operands_stay_the_same():
    """A lowered convolution keeps its last eager call (plan, padding, offsets) for the next input of that shape:
    outputs stay those of the masked model across new values, new sizes, residuals and operands replaced or
    modified in place (the offsets come from the indices), and the typed errors still come."""
    import copy

    from srigl_compile.errors import InferenceOnlyError

    def lowered_block(seed):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1, stride=2))
        masked = sparsify(net, SRigLConfig(sparsity=0.6, distribution="uniform", ablation=False)).eval()
        return masked, lower(masked, progress=False)

    masked, lowered = lowered_block(0)
    other_masked, other = lowered_block(1)
    first = lowered[0]
    assert first.kernel_key == other[0].kernel_key and lowered[2].direct
    with torch.no_grad():
        for shape in [(2, 6, 9, 11), (2, 6, 9, 11), (1, 6, 5, 7), (2, 6, 9, 11)]:
            x = torch.randn(shape)
            torch.testing.assert_close(lowered(x), masked(x), rtol=1e-5, atol=1e-5)
        assert first._repeat is not None and lowered[2]._repeat.subsample == (2, 2)
        repeat = first._repeat
        for name in ("values", "indices", "bias"):  # same shapes and kernel: another layer's operands, in place
            getattr(first, name).copy_(getattr(other[0], name))
        x = torch.randn(2, 6, 9, 11)
        want = torch.relu(other_masked[0](x))  # (the lowered layer computes the ReLU after it)
        assert first.epilogue == "relu"
        torch.testing.assert_close(lowered[0](x), want, rtol=1e-5, atol=1e-5)
        assert first._repeat is not repeat, "indices changed in place: prepared again"
        first.indices = other[0].indices.clone()  # a replaced buffer: prepared again
        torch.testing.assert_close(lowered[0](x), want, rtol=1e-5, atol=1e-5)
        clone = copy.deepcopy(lowered)  # the prepared call is not part of the layer's state
        assert "_repeat" not in clone[0].__dict__
        torch.testing.assert_close(clone(x), lowered(x), rtol=0, atol=0)
    with pytest.raises(InferenceOnlyError):
        lowered(x.requires_grad_())


class _ResidualBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return F.relu(self.conv(x) + x)


@pytest.mark.tvm
def test_a_repeated_call_with_a_residual_needs_one_of_the_same_shape():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _ResidualBlock())
    masked = sparsify(model, SRigLConfig(sparsity=0.7, distribution="uniform")).eval()
    # no dense forms: the calls below are compared bit for bit, and a trial may hand one residual shape to torch's
    # dense convolution (another summation order) and not the other
    lowered = lower(masked, LlvmConfig(dense_fallback=False, progress=False))
    fused = [m for m in lowered.modules() if isinstance(m, LoweredConv) and "add" in m.epilogue]
    assert fused, "the block's residual add is fused"
    with torch.no_grad():
        for batch in (2, 2, 3, 2):
            x = torch.randn(batch, 3, 16, 16)
            torch.testing.assert_close(lowered(x), masked(x), rtol=1e-4, atol=1e-4)
        layer = fused[0]
        assert layer._repeat.residual_shape is not None
        x = torch.randn(*layer._repeat.x_shape)
        residual = torch.randn(layer._repeat.residual_shape)
        want = layer(x, residual=residual)
        torch.testing.assert_close(layer(x, residual=residual[:1]), layer(x, residual=residual[:1].expand_as(residual)),
                                   rtol=0, atol=0)  # a broadcast residual takes the full path
        torch.testing.assert_close(layer(x, residual=residual), want, rtol=0, atol=0)


@pytest.mark.tvm
@pytest.mark.parametrize("layout", ["contiguous", "planar", "broadcast", "channels_last"])
def test_a_cropped_convolution_adds_a_residual_of_any_layout(layout):
    """A 3x3 convolution's residual is placed in its padded output grid by the library's pad (images of the
    output's shape: contiguous or planar) or torch's copy (anything else); either way the output is the masked
    convolution's plus the residual, which stays as it was."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _ResidualBlock())
    masked = sparsify(model, SRigLConfig(sparsity=0.7, distribution="uniform")).eval()
    lowered = lower(masked, LlvmConfig(dense_fallback=False, progress=False))
    layer = lowered[1].conv
    assert isinstance(layer, LoweredConv) and layer.epilogue == "add_relu"
    x = torch.randn(2, 8, 9, 11)
    residual = torch.randn(2, 8, 9, 11)
    if layout == "planar":  # images 9 x 11 = 99 floats, 104 apart
        residual = torch.randn(2 * 8 * 104).as_strided((2, 8, 9, 11), (8 * 104, 104, 11, 1))
    elif layout == "broadcast":
        residual = residual[:1]
    elif layout == "channels_last":
        residual = residual.to(memory_format=torch.channels_last)
    before = residual.clone()
    with torch.no_grad():
        expected = F.relu(masked[1].conv(x) + residual)
        torch.testing.assert_close(layer(x, residual=residual), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(residual, before)
