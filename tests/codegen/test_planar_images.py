"""Planar images between direct convolutions (``runtime.conv_geometry``, ``passes/planar_layout.py``): a lowered
convolution whose output only direct convolutions (or a global average pool) read returns a strided view whose
channels start on 16-float boundaries, and the next ones read it as it is; one only max-pools read returns its
output grid uncropped (rows of the padded width). Values never change; outputs anything else reads stay
contiguous; a prepared call is only repeated for an input laid out as the one it was prepared for."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from srigl_compile import SRigLConfig, load_lowered, lower, save_lowered, sparsify
from srigl_compile.codegen.backends import LlvmConfig
from srigl_compile.nn.lowered import LoweredConv
from srigl_compile.nn.pooling import LoweredGlobalAvgPool2d, LoweredMaxPool2d
from srigl_compile.runtime import registry
from srigl_compile.runtime.conv_geometry import (
    aligned_plane,
    column_offsets,
    direct_plan,
    pitched_stride,
    planar_plan,
    planar_stride,
)
from srigl_compile.runtime.registry import get_handle


def planar(x: torch.Tensor, plane: int) -> torch.Tensor:
    """x [B, C, H, W] copied into images whose channels lie ``plane`` floats apart (the gaps hold NaN: a kernel
    that read them into a result would show it)."""
    batch, channels, height, width = x.shape
    buffer = torch.full((batch, channels, plane), float("nan"))
    view = buffer[:, :, :height * width].view(batch, channels, height, width)
    view.copy_(x)
    return view


def test_planar_stride_recognises_planar_images_only():
    x = torch.randn(2, 3, 5, 7)
    assert planar_stride(x) == 35, "contiguous images: their own size"
    view = planar(x, 48)
    assert planar_stride(view) == 48 and planar_stride(view[1:]) == 48
    assert planar_stride(view[:, 1:]) is None, "channels cut out: the batch stride is no longer C x plane"
    assert planar_stride(x[..., :6]) is None and planar_stride(x.transpose(2, 3)) is None
    assert planar_stride(x.to(memory_format=torch.channels_last)) is None
    assert planar_stride(x[0]) is None, "three dims"
    assert planar_stride(torch.as_strided(torch.zeros(96), (1, 2, 5, 7), (96, 48, 7, 1))) == 48
    ends_early = torch.as_strided(torch.zeros(48 + 35), (1, 2, 5, 7), (96, 48, 7, 1))  # (its last pixel, no gap)
    assert planar_stride(ends_early) is None, "the last plane's gap lies past the storage: not safe to read"


def test_pitched_stride_recognises_images_with_row_and_channel_gaps_only():
    x = torch.randn(2, 3, 5, 7)
    assert pitched_stride(x) == (35, 7) and pitched_stride(planar(x, 48)) == (48, 7)
    grid = torch.randn(2, 3, 5 * 9 + 4)  # an output grid: rows 9 floats apart, a tail past the last row
    view = grid[:, :, :45].unflatten(2, (5, 9))[..., :7]
    assert pitched_stride(view) == (49, 9) and pitched_stride(view[1:]) == (49, 9)
    assert pitched_stride(view[:, 1:]) is None, "channels cut out: the batch stride is no longer C x plane"
    assert pitched_stride(x.transpose(2, 3)) is None and pitched_stride(x[..., ::2]) is None
    assert pitched_stride(x.to(memory_format=torch.channels_last)) is None and pitched_stride(x[0]) is None
    assert pitched_stride(torch.as_strided(torch.zeros(40), (1, 1, 5, 7), (40, 40, 8, 1))) == (40, 8)
    assert planar_stride(view) is None, "rows further apart than their width: not planar"


@settings(max_examples=80, deadline=None)
@given(height=st.integers(1, 16), width=st.integers(1, 16), lanes=st.sampled_from([8, 16, 49, 64, 208]),
       extra=st.integers(-40, 40), channels=st.integers(1, 4))
def test_a_planar_plan_reads_inside_its_planes_at_the_channel_stride(height, width, lanes, extra, channels):
    plan = direct_plan(height, width, (1, 1), (0, 0), (1, 1), lanes)
    plane = max(plan.tiles * plan.lanes, plan.positions) + extra
    layout = planar_plan(plan, plane)
    if extra < 0:
        assert layout is None, "the last tile would read past its plane"
        return
    assert layout.reads_in_bounds((1, 1), (1, 1)) and layout.extra == 0 and layout.plane == plane
    columns = torch.arange(channels)[None]
    assert column_offsets(columns, (1, 1), (1, 1), layout, channels).tolist() == [[c * plane for c in range(channels)]]
    assert aligned_plane(plane) % 16 == 0 and 0 <= aligned_plane(plane) - plane < 16


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 1)

    def forward(self, x):
        return F.relu(self.conv(x) + x)


class _Heads(nn.Module):
    """A strided 1x1 convolution whose output the model returns, and a 1x1 one that torch reads (flatten)."""

    def __init__(self) -> None:
        super().__init__()
        self.d, self.head = nn.Conv2d(16, 8, 1, stride=2), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.d(x), self.head(x).flatten(1)


def _net() -> nn.Module:
    """1x1 -> 3x3 -> 1x1 with the residual, then the heads (lower fuses the ReLUs and the add into the kernels)."""
    return nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), _Residual(),
                         _Heads())


def _lowered(seed=0, size=14):
    torch.manual_seed(seed)
    masked = sparsify(_net(), SRigLConfig(sparsity=0.7, distribution="uniform")).eval()
    return masked, lower(masked, example_inputs=(torch.randn(2, 8, size, size),), progress=False)


def _outputs(model, x):
    """Each lowered convolution's output in one forward."""
    seen, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, LoweredConv):
            hooks.append(module.register_forward_hook(lambda m, a, out, n=name: seen.__setitem__(n, out)))
    try:
        with torch.no_grad():
            result = model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return result, seen


@pytest.mark.tvm
def test_outputs_only_direct_convolutions_read_are_planar_and_the_rest_contiguous():
    masked, lowered = _lowered()
    assert {n: m.planar_output for n, m in lowered.named_modules() if isinstance(m, LoweredConv)} == {
        "0": True, "2": True, "4.conv": True, "5.d": False, "5.head": False}
    for batch, size in ((2, 14), (1, 14), (3, 7), (2, 8)):  # 14x14 and 7x7: not whole vectors; 8x8: 64 floats
        x = torch.randn(batch, 8, size, size)
        (y, h), seen = _outputs(lowered, x)
        with torch.no_grad():
            want_y, want_h = masked(x)
        torch.testing.assert_close(y, want_y, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(h, want_h, rtol=1e-4, atol=1e-4)
        for name in ("0", "2", "4.conv"):
            plane = planar_stride(seen[name])  # (a 1x1 layer's: its grid, whole tiles of the example's width)
            assert plane % 16 == 0 and plane >= size * size and (size != 14 or plane == 208), (name, plane)
            assert seen[name].is_contiguous() == (size * size % 16 == 0), name
        assert seen["5.d"].is_contiguous() and seen["5.head"].is_contiguous(), "read by the caller / by torch"
        assert y.is_contiguous() and h.is_contiguous()


class _ViewsItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.next = nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 16, 1)

    def forward(self, x):
        y = self.conv(x)
        return self.next(y) + y.view(y.shape[0], 16, -1).mean(-1)[..., None, None]  # .view needs contiguous


@pytest.mark.tvm
def test_an_output_torch_also_reads_stays_contiguous_so_view_keeps_working():
    torch.manual_seed(1)
    masked = sparsify(_ViewsItsInput(), SRigLConfig(sparsity=0.7, distribution="uniform")).eval()
    lowered = lower(masked, example_inputs=(torch.randn(1, 8, 14, 14),), progress=False)
    assert not lowered.conv.planar_output
    x = torch.randn(2, 8, 14, 14)
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), masked(x), rtol=1e-4, atol=1e-4)


@pytest.mark.tvm
@pytest.mark.parametrize("layer", ["2", "5.d", "5.head"])
def test_a_repeated_call_is_prepared_again_for_an_input_laid_out_otherwise(layer):
    """The same shape as planar, contiguous and channels-last images in turn (twice each, so that the second call
    of a layout is a repeated one): every call equals the masked layer's."""
    masked, lowered = _lowered(seed=2)
    x = torch.randn(2, 16, 14, 14)
    layouts = [planar(x, 208), x, x.to(memory_format=torch.channels_last), planar(x, 224)]
    with torch.no_grad():
        want = masked.get_submodule(layer)(x)
        if layer == "2":
            want = F.relu(want)  # (the lowered layer computes the ReLU after it)
        for images in layouts + layouts:
            got = lowered.get_submodule(layer)(images)
            assert not got.isnan().any(), "read the gaps between planes into a result"
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.tvm
def test_planar_outputs_survive_save_and_load_and_older_libraries_stay_contiguous(tmp_path):
    masked, lowered = _lowered(seed=3)
    x = torch.randn(2, 8, 14, 14)
    with torch.no_grad():
        want = masked(x)
    save_lowered(lowered, tmp_path / "model")
    loaded = load_lowered(tmp_path / "model")
    (y, h), seen = _outputs(loaded, x)
    torch.testing.assert_close((y, h), want, rtol=1e-4, atol=1e-4)
    assert planar_stride(seen["0"]) == 208 and not seen["0"].is_contiguous()
    # a library saved before its pad and crop took strided images (no "strided_glue" in its manifest)
    path = tmp_path / "model" / "kernels" / "manifest.json"
    manifest = json.loads(path.read_text())
    assert all(entry.pop("strided_glue") for entry in manifest["kernels"].values())
    path.write_text(json.dumps(manifest))
    top = tmp_path / "model" / "manifest.json"  # (such a save predates the kernels' manifest hash as well)
    top.write_text(json.dumps({key: value for key, value in json.loads(top.read_text()).items()
                               if key != "kernels_sha256"}))
    # here, beside the same kernels with that glue: the loaded model runs them
    (y, h), seen = _outputs(load_lowered(tmp_path / "model"), x)
    torch.testing.assert_close((y, h), want, rtol=1e-4, atol=1e-4)
    assert planar_stride(seen["0"]) == 208 and not seen["0"].is_contiguous()
    saved = {key: registry._HANDLES.pop(key) for key in manifest["kernels"]}
    try:  # as in a process that has only the older library: registered under keys of its own
        older = load_lowered(tmp_path / "model")
        (y, h), seen = _outputs(older, x)
        keys = {m.kernel_key for m in older.modules() if isinstance(m, LoweredConv)}
        assert keys == {f"{key}#legacy" for key in manifest["kernels"]}
        assert not any(get_handle(key).planar_glue for key in keys)
    finally:
        registry._HANDLES.update(saved)
    torch.testing.assert_close((y, h), want, rtol=1e-4, atol=1e-4)
    assert all(out.is_contiguous() for out in seen.values()), "no strided pad / crop: contiguous everywhere"


class _Pools(nn.Module):
    """A padded 3x3 convolution read by two max-pools only (pitched; one pool alone would run with it, band by
    band: ``test_conv_pool.py``), one read by a max-pool and by torch (contiguous), and a 1x1 convolution read by a
    global average pool only (planar)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.relu, self.pool = nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        self.pool_b = nn.MaxPool2d(1, 2)  # (the same output size: a subsample)
        self.side, self.side_pool = nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(2)
        self.head, self.gap = nn.Conv2d(16, 32, 1), nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        side = self.side(x)
        pooled = self.side_pool(side) + side[:, :, 1::2, 1::2].tanh()
        stem = self.relu(self.stem(x))
        return self.gap(self.head(self.pool(stem) + self.pool_b(stem))).flatten(1), pooled


@pytest.mark.tvm
def test_an_output_only_max_pools_read_is_the_uncropped_grid_and_one_only_a_global_pool_reads_is_planar(tmp_path):
    torch.manual_seed(4)
    masked = sparsify(_Pools(), SRigLConfig(sparsity=0.6, distribution="uniform")).eval()
    lowered = lower(masked, example_inputs=(torch.randn(1, 3, 14, 14),), progress=False)
    assert isinstance(lowered.pool, LoweredMaxPool2d) and isinstance(lowered.gap, LoweredGlobalAvgPool2d)
    layouts = {n: (m.planar_output, m.pitched_output) for n, m in lowered.named_modules() if isinstance(m, LoweredConv)}
    assert layouts == {"stem": (True, True), "side": (False, False), "head": (True, False)}
    for model in (lowered, _saved_and_loaded(lowered, tmp_path)):
        for batch, size in ((1, 14), (2, 9)):
            x = torch.randn(batch, 3, size, size)
            out, seen = _outputs(model, x)
            with torch.no_grad():
                torch.testing.assert_close(out, masked(x), rtol=1e-4, atol=1e-4)
            plane, pitch = pitched_stride(seen["stem"])
            assert pitch == size + 2 and plane >= size * pitch, "the kernel's grid: rows of the padded width"
            assert seen["side"].is_contiguous(), "torch reads it too"
            assert planar_stride(seen["head"]) % 16 == 0 and not seen["head"].is_contiguous()


def _saved_and_loaded(lowered: nn.Module, folder) -> nn.Module:
    save_lowered(lowered, folder / "model")
    return load_lowered(folder / "model")


@pytest.mark.tvm
def test_a_max_pool_from_an_older_library_reads_a_contiguous_copy(monkeypatch):
    """A library saved before its max-pool took strided images (``pitched_pool`` False): the pool copies the grid
    view contiguous first, and the values stay torch's."""
    torch.manual_seed(5)
    masked = sparsify(_Pools(), SRigLConfig(sparsity=0.6, distribution="uniform")).eval()
    lowered = lower(masked, example_inputs=(torch.randn(1, 3, 14, 14),), progress=False)
    grid = torch.randn(2, 16, 12 * 15 + 5)
    view = grid[:, :, :180].unflatten(2, (12, 15))[..., :13]  # rows 15 floats apart
    expected = F.max_pool2d(view, 3, 2, 1)
    handle, strides = get_handle(lowered.pool.kernel_key), []
    pool_fn = handle.max_pool_fn
    monkeypatch.setattr(handle, "max_pool_fn", lambda x, *rest: strides.append(x.stride()) or pool_fn(x, *rest))
    assert torch.equal(lowered.pool(view), expected)
    monkeypatch.setattr(handle, "pitched_pool", False)
    assert torch.equal(lowered.pool(view), expected)
    assert strides == [(185, 15, 1), (156, 13, 1)], "the grid as it is, then a contiguous copy"


def _lowered_layers(lowered: nn.Module, x: torch.Tensor) -> list[tuple[LoweredConv, tuple, dict, torch.Tensor]]:
    """Each lowered convolution of one forward, with the arguments it got and what it returned."""
    calls, hooks = [], []
    for module in lowered.modules():
        if isinstance(module, LoweredConv):
            hooks.append(module.register_forward_hook(
                lambda m, args, kwargs, out: calls.append((m, args, kwargs, out)), with_kwargs=True))
    try:
        with torch.no_grad():
            lowered(x)
    finally:
        for hook in hooks:
            hook.remove()
    return calls


@pytest.mark.tvm
def test_traced_calls_return_the_layouts_eager_calls_do():
    """The op's fake implementation plans a call as the real one does: a tracer sees the strides each lowered
    convolution returns (planar, pitched, contiguous), and an inductor-compiled model, whose generated code checks
    every output's size and strides, equals the eager one bit for bit."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.manual_seed(6)
    config = SRigLConfig(sparsity=0.75, distribution="uniform")
    models = [sparsify(model, config).eval() for model in (_net(), _Pools())]
    inputs = [torch.randn(2, 8, 14, 14), torch.randn(1, 3, 14, 14)]
    exact = [(0, 1), (0,)]  # the outputs only the kernels compute (_Pools' second adds inductor's tanh)
    residuals = 0
    for masked, x, exact_outputs in zip(models, inputs, exact):
        # (kernels only: a layer this dense could run its dense form eagerly, which sums in another order)
        lowered = lower(masked, LlvmConfig(dense_fallback=False, progress=False), example_inputs=(x,))
        calls = _lowered_layers(lowered, x)
        assert any(not out.is_contiguous() for *_, out in calls), "the models have planar and pitched outputs"
        residuals += sum("residual" in kwargs for _, _, kwargs, _ in calls)
        for layer, args, kwargs, out in calls:
            with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
                fake = layer(*map(mode.from_tensor, args), **{k: mode.from_tensor(v) for k, v in kwargs.items()})
            assert (fake.shape, fake.stride()) == (out.shape, out.stride()), layer.layer_name
        compiled = torch.compile(lowered)
        with torch.no_grad():
            for _ in range(2):
                got, want = compiled(x), lowered(x)
                for i, (have, expected) in enumerate(zip(got, want, strict=True)):
                    tolerance = 0.0 if i in exact_outputs else 1e-6
                    torch.testing.assert_close(have, expected, rtol=tolerance, atol=tolerance)
    assert residuals, "a residual added in a kernel was among the calls"


def test_planar_stride_counts_the_storage_offset_of_a_view():
    storage = torch.zeros(10 + 96)
    fits = torch.as_strided(storage, (1, 2, 5, 7), (96, 48, 7, 1), 10)  # (offset + 2 planes == the storage)
    assert planar_stride(fits) == 48
    short = torch.zeros(10 + 96 - 5)  # every pixel inside, but the last plane's gap runs 5 floats past the end
    ends_early = torch.as_strided(short, (1, 2, 5, 7), (96, 48, 7, 1), 10)
    assert planar_stride(ends_early) is None, "the last plane's gap lies past the storage: not safe to read"
    assert planar_stride(short[10:].as_strided((1, 2, 5, 7), (96, 48, 7, 1))) is None  # (the same, via a slice)
