"""The direct (im2col-free) convolution: its read plan, its op, and lowered convolutions that use it."""

import dataclasses
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from srigl_compile import SRigLConfig, load_lowered, lower, save_lowered, sparsify
from srigl_compile.nn.lowered import LoweredConv
from srigl_compile.runtime.conv_geometry import column_offsets, direct_plan, phase_columns, phase_kernel, strided_plan
from tests.helpers import ablate, randomize_bn
from tests.models import ResidualCNN


def grid_conv(x, values, columns, kernel, padding, dilation, lanes):
    """What the offset kernel computes, in plain torch: every grid position reads x_flat[offset + q]."""
    plan = direct_plan(x.shape[2], x.shape[3], kernel, padding, dilation, lanes)
    padded = F.pad(x, (padding[1], padding[1], padding[0], padding[0] + plan.extra)).flatten(1)
    offsets = column_offsets(columns, kernel, dilation, plan, x.shape[1] * kernel[0] * kernel[1]).long()
    q = torch.arange(plan.tiles * lanes)
    assert int(offsets.max()) + len(q) <= padded.shape[1], "a read past the padded image"
    grid = (padded[:, offsets[..., None] + q] * values[None, ..., None]).sum(2)  # [B, n_out, positions]
    return grid[:, :, :plan.positions].unflatten(2, (plan.out_h, plan.pitch))[..., :plan.out_w], plan


@settings(max_examples=60, deadline=None)
@given(height=st.integers(1, 9), width=st.integers(1, 9), kh=st.integers(1, 4), kw=st.integers(1, 4),
       ph=st.integers(0, 2), pw=st.integers(0, 2), dh=st.integers(1, 2), dw=st.integers(1, 2),
       channels=st.integers(1, 3), lanes=st.sampled_from([1, 8, 32, 64]), seed=st.integers(0, 2**16))
def test_offset_plan_reads_inside_the_image_and_equals_conv2d(height, width, kh, kw, ph, pw, dh, dw, channels,
                                                              lanes, seed):
    if height + 2 * ph < dh * (kh - 1) + 1 or width + 2 * pw < dw * (kw - 1) + 1:
        with pytest.raises(ValueError, match="smaller than the kernel"):
            direct_plan(height, width, (kh, kw), (ph, pw), (dh, dw), lanes)
        return
    gen = torch.Generator().manual_seed(seed)
    fan_in, n_out = channels * kh * kw, 3
    k = int(torch.randint(1, fan_in + 1, (), generator=gen))
    columns = torch.rand(n_out, fan_in, generator=gen).argsort(1)[:, :k].sort(1).values
    values = torch.randn(n_out, k, generator=gen, dtype=torch.float64)
    x = torch.randn(2, channels, height, width, generator=gen, dtype=torch.float64)
    got, plan = grid_conv(x, values, columns, (kh, kw), (ph, pw), (dh, dw), lanes)
    weight = torch.zeros(n_out, fan_in, dtype=torch.float64).scatter_(1, columns, values)
    expected = F.conv2d(x, weight.view(n_out, channels, kh, kw), padding=(ph, pw), dilation=(dh, dw))
    torch.testing.assert_close(got, expected)
    assert plan.reads_in_bounds((kh, kw), (dh, dw)) and plan.tiles * lanes >= plan.positions


@settings(max_examples=60, deadline=None)
@given(height=st.integers(1, 12), width=st.integers(1, 12), kh=st.integers(1, 5), kw=st.integers(1, 5),
       sh=st.integers(1, 3), sw=st.integers(1, 3), ph=st.integers(0, 2), pw=st.integers(0, 2), dh=st.integers(1, 2),
       dw=st.integers(1, 2), lanes=st.sampled_from([1, 8, 64]), seed=st.integers(0, 2**16))
def test_phase_images_turn_a_strided_conv_into_a_stride_1_conv(height, width, kh, kw, sh, sw, ph, pw, dh, dw, lanes,
                                                               seed):
    """Padding by ``strided_plan``'s amounts, splitting into phase images and remapping the columns with
    ``phase_columns`` gives F.conv2d at the stride, and the offset kernel's reads stay inside the phase images."""
    kernel, stride, padding, dilation = (kh, kw), (sh, sw), (ph, pw), (dh, dw)
    if height + 2 * ph < dh * (kh - 1) + 1 or width + 2 * pw < dw * (kw - 1) + 1:
        with pytest.raises(ValueError, match="smaller than the kernel"):
            strided_plan(height, width, kernel, stride, padding, dilation, lanes)
        return
    gen = torch.Generator().manual_seed(seed)
    channels, n_out = 2, 3
    x = torch.randn(2, channels, height, width, generator=gen, dtype=torch.float64)
    weight = torch.randn(n_out, channels * kh * kw, generator=gen, dtype=torch.float64)
    expected = F.conv2d(x, weight.view(n_out, channels, kh, kw), stride=stride, padding=padding, dilation=dilation)
    plan, pads = strided_plan(height, width, kernel, stride, padding, dilation, lanes)
    padded = F.pad(x, pads)
    assert padded.shape[2:] == (sh * plan.rows, sw * plan.pitch)
    phases = padded.view(2, channels, plan.rows, sh, plan.pitch, sw).permute(0, 1, 3, 5, 2, 4) \
        .reshape(2, channels * sh * sw, plan.rows, plan.pitch)
    new_kernel = phase_kernel(kernel, stride, dilation)
    columns = phase_columns(torch.arange(channels * kh * kw), kernel, stride, dilation)
    assert len(set(columns.tolist())) == channels * kh * kw, "two taps on one phase column"
    phase_weight = weight.new_zeros(n_out, channels * sh * sw * new_kernel[0] * new_kernel[1])
    phase_weight[:, columns] = weight
    got = F.conv2d(phases, phase_weight.view(n_out, -1, *new_kernel))[:, :, :plan.out_h, :plan.out_w]
    torch.testing.assert_close(got, expected)
    assert plan.reads_in_bounds(new_kernel, (1, 1)) and plan.tiles * lanes >= plan.positions


# (layer, input shape, whether it runs direct)
LAYERS = {
    "3x3 pad 1": (nn.Conv2d(8, 12, 3, padding=1), (9, 7), True),
    "1x1 no bias": (nn.Conv2d(16, 8, 1, bias=False), (5, 5), True),
    "1x1 stride 2": (nn.Conv2d(8, 16, 1, stride=2), (9, 8), True),
    "dilated 3x3": (nn.Conv2d(4, 6, 3, padding=2, dilation=2), (11, 13), True),
    "depthwise": (nn.Conv2d(8, 8, 3, padding=1, groups=8), (6, 6), True),
    "5x3 same, reflect": (nn.Conv2d(4, 6, (5, 3), padding="same", padding_mode="reflect"), (7, 9), True),
    "even kernel same": (nn.Conv2d(4, 6, 4, padding="same"), (6, 5), True),
    "image smaller than a tile": (nn.Conv2d(3, 5, 3, padding=1), (2, 2), True),
    "conv1d": (nn.Conv1d(4, 8, 5, padding=2), (17,), True),
    "3x3 stride 2": (nn.Conv2d(8, 8, 3, stride=2, padding=1), (9, 9), True),
    "7x7 stride 2 stem": (nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False), (20, 17), True),
    "dilated, stride (2, 1)": (nn.Conv2d(4, 6, 3, stride=(2, 1), padding=2, dilation=2), (11, 13), True),
    "grouped stride 2": (nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4), (8, 9), True),
    "stride 3 > kernel 2": (nn.Conv2d(3, 5, 2, stride=3), (8, 10), True),
    "conv1d stride 3": (nn.Conv1d(4, 8, 5, stride=3, padding=2), (23,), True),
    "stride 2, reflect": (nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode="reflect"), (9, 10), True),
    "1x1 stride 2, padded": (nn.Conv2d(4, 6, 1, stride=2, padding=1), (7, 8), True),
}


@pytest.mark.tvm
@pytest.mark.parametrize("name", list(LAYERS))
def test_lowered_convolution_equals_masked(name):
    conv, spatial, direct = LAYERS[name]
    torch.manual_seed(0)
    masked = sparsify(nn.Sequential(conv), SRigLConfig(sparsity=0.7, distribution="uniform"))
    lowered = lower(masked, progress=False)
    assert isinstance(lowered[0], LoweredConv) and lowered[0].direct is direct
    for batch in (1, 3):
        x = torch.randn(batch, conv.in_channels, *spatial)
        with torch.no_grad():
            out = lowered(x)
            torch.testing.assert_close(out, masked.eval()(x), rtol=1e-5, atol=1e-5)
        assert out.is_contiguous() or not direct  # (a .view() downstream must work as after a torch conv)


@pytest.mark.tvm
def test_k_equal_one_and_ablated_filters():
    torch.manual_seed(0)
    masked = sparsify(nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU()),
                      SRigLConfig(sparsity=0.94, distribution="uniform"))
    ablate(masked, {"0": [0, 4]})
    lowered = lower(masked, progress=False)
    assert lowered[0].direct and lowered[0].k == 8 and lowered[0].n_active in (4, 6)  # k = 1 padded to 8
    with torch.no_grad():
        x = torch.randn(2, 2, 5, 5)
        torch.testing.assert_close(lowered(x), masked.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def lowered_cnn():
    torch.manual_seed(0)
    masked = randomize_bn(sparsify(ResidualCNN(), SRigLConfig(sparsity=0.8, seed=2)))
    ablate(masked, {"expand": [0, 3, 9], "stem": [1]})
    return masked.eval(), lower(masked, progress=False)


class DownsamplingCNN(nn.Module):
    """A ResNet-style stem and downsampling block: 7x7/2 stem, 3x3/2 conv, 1x1/2 shortcut, BatchNorm, residual."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 16, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(16)
        self.down, self.bn1 = nn.Conv2d(16, 24, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(24)
        self.shortcut = nn.Conv2d(16, 24, 1, stride=2, bias=False)
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        h = F.relu(self.bn0(self.stem(x)))
        h = F.relu(self.bn1(self.down(h)) + self.shortcut(h))
        return self.head(h.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def downsampling_cnn():
    torch.manual_seed(0)
    masked = randomize_bn(sparsify(DownsamplingCNN(), SRigLConfig(sparsity=0.8, distribution="uniform", seed=1)))
    ablate(masked, {"down": [2, 5]})
    return masked.eval(), lower(masked, progress=False)


@pytest.mark.tvm
def test_downsampling_cnn_runs_every_conv_direct_and_equals_masked(downsampling_cnn, tmp_path):
    masked, lowered = downsampling_cnn
    assert all(m.direct for m in lowered.modules() if isinstance(m, LoweredConv))
    with torch.no_grad():
        for shape in ((1, 3, 32, 32), (3, 3, 29, 31)):
            x = torch.randn(shape)
            torch.testing.assert_close(lowered(x), masked(x), rtol=1e-5, atol=1e-5)
        x = torch.randn(2, 3, 24, 24)
        program = torch.export.export(lowered, (x,))
        torch.testing.assert_close(program.module()(x), masked(x), rtol=1e-5, atol=1e-5)
        save_lowered(lowered, tmp_path / "model")
        assert torch.equal(load_lowered(tmp_path / "model")(x), lowered(x))


def opcheck_conv(layer, stride, image):
    args = (layer.values, layer.indices, layer.bias, layer.kernel_key, list(layer.kernel_size), list(layer.padding),
            list(layer.dilation), list(stride))
    for batch in (1, 2):
        torch.library.opcheck(torch.ops.srigl_compile.tvm_condensed_conv2d.default,
                              (torch.randn(batch, layer.in_channels, *image), *args))


@pytest.mark.tvm
def test_conv_op_passes_opcheck(lowered_cnn):
    _, lowered = lowered_cnn
    layer = next(m for m in lowered.modules() if isinstance(m, LoweredConv) and m.direct and m.kernel_size != (1, 1))
    opcheck_conv(layer, (1, 1), (6, 7))


@pytest.mark.tvm
def test_strided_conv_op_passes_opcheck(downsampling_cnn):
    _, lowered = downsampling_cnn
    opcheck_conv(lowered.down, lowered.down.stride, (7, 8))


@pytest.mark.tvm
def test_cnn_under_fx_export_and_compile(lowered_cnn):
    masked, lowered = lowered_cnn
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = masked(x)
        torch.testing.assert_close(torch.fx.symbolic_trace(lowered)(x), expected, rtol=1e-5, atol=1e-5)
        program = torch.export.export(lowered, (x,))
        targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        assert any("tvm_condensed_conv2d" in t for t in targets)
        torch.testing.assert_close(program.module()(x), expected, rtol=1e-5, atol=1e-5)
        compiled = torch.compile(lowered, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.tvm
def test_direct_kernels_save_and_load_in_a_fresh_process(lowered_cnn, tmp_path):
    _, lowered = lowered_cnn
    save_lowered(lowered, tmp_path / "model")
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.save({"x": x, "y": lowered(x)}, tmp_path / "io.pt")
    code = (f"import torch, srigl_compile as sc; m = sc.load_lowered({str(tmp_path / 'model')!r}); "
            f"d = torch.load({str(tmp_path / 'io.pt')!r}); assert any(getattr(l, 'direct', 0) for l in m.modules()); "
            f"torch.set_grad_enabled(False); assert torch.equal(m(d['x']), d['y'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    with torch.no_grad():
        assert torch.equal(load_lowered(tmp_path / "model")(x), lowered(x))


@pytest.mark.tvm
def test_bad_conv_inputs_are_clear_errors(lowered_cnn):
    from srigl_compile import DeviceError
    from srigl_compile.runtime.conv_op import condensed_conv2d

    _, lowered = lowered_cnn
    layer = next(m for m in lowered.modules() if isinstance(m, LoweredConv) and m.direct)
    args = (layer.values, layer.indices, layer.bias, layer.kernel_key, layer.kernel_size, layer.padding,
            layer.dilation)
    with pytest.raises(DeviceError, match="float32"):
        condensed_conv2d(torch.randn(1, layer.in_channels, 5, 5, dtype=torch.float64), *args)
    with pytest.raises(ValueError, match=f"expects {layer.in_channels} input channels, got {layer.in_channels + 1}"):
        condensed_conv2d(torch.randn(1, layer.in_channels + 1, 5, 5), *args)
    name = next(n for n, m in lowered.named_modules() if m is layer)
    with pytest.raises(ValueError, match=f"lowered LoweredConv '{name}' expects {layer.in_channels} input channels"):
        layer(torch.randn(1, layer.in_channels + 1, 5, 5))
    with pytest.raises(ValueError, match="has_bias"):
        condensed_conv2d(torch.randn(1, layer.in_channels, 5, 5), layer.values, layer.indices,
                         None if layer.bias is not None else torch.zeros(layer.n_active), *args[3:])


def test_column_offsets_bound_int32_by_the_layer_s_width_without_reading_the_columns():
    """The bound comes from ``n_in``, not the columns' values: on meta tensors (no values) it computes, as it must
    inside a CPU graph recording, where reading a value into Python would stop the recording."""
    plan = direct_plan(8, 8, (3, 3), (1, 1), (1, 1), 16)
    on_meta = column_offsets(torch.empty(4, 5, dtype=torch.int16, device="meta"), (3, 3), (1, 1), plan, 18)
    assert on_meta.dtype == torch.int32 and on_meta.shape == (4, 5)
    columns = torch.tensor([[0, 17]])  # channel 0's first tap, channel 1's last: the farthest read of 2 channels
    assert column_offsets(columns, (3, 3), (1, 1), plan, 18).tolist() == [[0, plan.plane + 2 * plan.pitch + 2]]
    huge = dataclasses.replace(plan, plane=2**30)  # a third channel would start at 2**31
    assert column_offsets(columns, (3, 3), (1, 1), huge, 18).tolist() == [[0, 2**30 + 2 * plan.pitch + 2]]
    with pytest.raises(ValueError, match="too large for int32 offsets"):
        column_offsets(columns, (3, 3), (1, 1), huge, 19)  # (19 columns: part of a third channel)


def test_block_rows_orders_operands_as_a_task_reads_them():
    from srigl_compile.runtime.spec import block_rows

    operand = torch.arange(5 * 8).view(5, 8) + 1
    blocked = block_rows(operand, rows=2, k_tile=4)  # 3 row blocks, the last one padded with a zero row
    assert blocked.shape == (3, 2, 2, 4) and blocked.is_contiguous()
    for row in range(6):
        for col in range(8):
            expected = operand[row, col] if row < 5 else 0
            assert blocked[row // 2, col // 4, row % 2, col % 4] == expected


def test_exact_tile_divides_the_grid():
    from srigl_compile.runtime.conv_geometry import exact_tile

    assert [exact_tile(n) for n in (3136, 784, 196, 49, 12544, 16, 9)] == [64, 56, 49, 49, 64, 16, 9]
    assert [exact_tile(n, 16, 208) for n in (3136, 784, 196, 49, 12544, 16)] == [112, 112, 196, 49, 128, 16]
    assert exact_tile(784, 16, 64) == 56 and exact_tile(2 * 67) is None  # (2 or 67 lanes: none fits)
    for positions in range(1, 300):
        for vector, widest in ((8, 64), (16, 208)):
            lanes = exact_tile(positions, vector, widest)
            assert lanes is None or (positions % lanes == 0 and min(32, positions) <= lanes <= widest)


@pytest.mark.tvm
def test_example_inputs_give_1x1_layers_a_tile_fitting_their_grid():
    from srigl_compile.codegen.cpu_target import host_llvm_target
    from srigl_compile.runtime.cpu_features import cpu_features
    from srigl_compile.runtime.registry import get_handle

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(16, 32, 1), nn.ReLU(), nn.Conv2d(32, 24, 1, stride=2, bias=False),
                        nn.Conv2d(24, 8, 3, padding=1))
    masked = sparsify(net, SRigLConfig(sparsity=0.7, distribution="uniform")).eval()
    lowered = lower(masked, example_inputs=(torch.randn(2, 16, 14, 14),), progress=False)
    lanes = [get_handle(m.kernel_key).lanes for m in lowered if isinstance(m, LoweredConv)]
    # AVX-512: one tile of whole 16-lane vectors over planar images (14x14: 208, 7x7: 64); AVX2: a divisor (49)
    wide = "avx512f" in cpu_features(host_llvm_target())
    assert lanes == ([208, 64] if wide else [49, 49]) + [64], "14x14 and its 7x7 subsample; the 3x3: the default"
    assert get_handle(lower(masked, progress=False)[0].kernel_key).lanes == 64, "no example inputs: default tile"
    with torch.no_grad():
        for shape in ((2, 16, 14, 14), (1, 16, 9, 11)):  # the example's size and another one
            x = torch.randn(shape)
            torch.testing.assert_close(lowered(x), masked(x), rtol=1e-5, atol=1e-5)


@pytest.mark.tvm
@pytest.mark.parametrize("conv, shape", [(nn.Conv2d(3, 8, 3, padding=1), (3, 6, 7)),
                                         (nn.Conv2d(4, 6, 3, stride=2, padding=1), (4, 9, 8)),
                                         (nn.Conv1d(4, 8, 5, padding=2), (4, 11))])
def test_unbatched_inputs_work_as_in_torch(conv, shape):
    """torch's convolutions take [C, *spatial] as well as [B, C, *spatial]; condensed and lowered ones too."""
    from srigl_compile import condense

    torch.manual_seed(0)
    masked = sparsify(nn.Sequential(conv), SRigLConfig(sparsity=0.7, distribution="uniform")).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        expected = masked(x)
        assert expected.shape == masked(x.unsqueeze(0)).shape[1:]
        for model in (condense(masked), lower(masked, progress=False)):
            out = model(x)
            assert out.shape == expected.shape
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.tvm
def test_the_op_plans_a_call_once_per_input_layout_and_again_once_the_columns_change(lowered_cnn, monkeypatch):
    """The op (a tracer's call, or ``condensed_conv2d``) keeps each layer's prepared calls: planned once per input
    layout, and again when the columns it derived its offsets from change in place."""
    from srigl_compile.runtime import conv_op

    _, lowered = lowered_cnn
    layer = next(m for m in lowered.modules() if isinstance(m, LoweredConv) and m.direct and m.kernel_size != (1, 1))
    values, columns = layer.values, layer.indices
    assert values.shape == columns.shape and values.shape[-1] >= 2, "blocked [NB, KT, rows, kin], one list a row"
    x = torch.randn(2, layer.in_channels, 6, 7)

    def run(images):
        y = conv_op.condensed_conv2d(images, values, columns, layer.bias, layer.kernel_key, layer.kernel_size,
                                     layer.padding, layer.dilation)
        return layer.scatter(y, dim=1)

    with torch.no_grad():
        want = layer(x)
        planned = []
        prepare = conv_op.prepare_call
        monkeypatch.setattr(conv_op, "prepare_call", lambda *a, **k: planned.append(1) or prepare(*a, **k))
        for _ in range(2):
            torch.testing.assert_close(run(x), want, rtol=0, atol=0)
        assert len(planned) == 1
        for _ in range(2):  # another layout of the same shape: a call of its own
            torch.testing.assert_close(run(x.to(memory_format=torch.channels_last)), want, rtol=0, atol=0)
        assert len(planned) == 2
        swap = [1, 0] + list(range(2, values.shape[-1]))  # two non-zeros of each row trade places, values with them
        try:
            values.copy_(values[..., swap])
            columns.copy_(columns[..., swap])
            torch.testing.assert_close(run(x), want, rtol=1e-5, atol=1e-5)  # (offsets from the new columns)
            assert len(planned) == 3
        finally:
            values.copy_(values[..., swap])
            columns.copy_(columns[..., swap])
        copy = columns.clone()  # another columns tensor: calls of its own, dropped with it
        conv_op.condensed_conv2d(x, values, copy, layer.bias, layer.kernel_key, layer.kernel_size, layer.padding,
                                 layer.dilation)
        number = id(copy)
        assert number in conv_op._PREPARED and len(planned) == 4
        del copy
        assert number not in conv_op._PREPARED
