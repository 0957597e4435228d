"""Lowering's bad inputs are typed SRigLErrors naming the layer, key or path (the no-TVM ones are in
tests/no_tvm/test_typed_errors.py)."""

import json

import pytest
import torch
import torch.nn as nn

from srigl_compile import (
    CheckpointError,
    LayerError,
    SRigLConfig,
    UnsupportedTargetError,
    lower,
    save_lowered,
    sparsify,
)
from srigl_compile.errors import LoweringError
from srigl_compile.runtime.checks import KernelDeviceError, KernelShapeError
from srigl_compile.runtime.kernel_io import KernelFileError, export_kernels, load_kernels
from srigl_compile.runtime.registry import get_handle

pytestmark = pytest.mark.tvm


@pytest.fixture(scope="module")
def lowered():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 5), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    return lower(sparsify(net, SRigLConfig(sparsity=0.8, seed=1)), progress=False)


@pytest.mark.parametrize("size, layer", [(4, "0"), (6, "2")], ids=["stride-1", "strided"])
def test_an_image_smaller_than_the_kernel_names_the_layer(lowered, size, layer):
    with pytest.raises(KernelShapeError, match=f"lowered LoweredConv '{layer}' needs images at least as large as its "
                                               "kernel") as info:
        lowered(torch.randn(1, 3, size, size))
    assert isinstance(info.value, (LoweringError, ValueError))


def test_lowering_a_lowered_model_says_it_is_lowered_already(lowered):
    with pytest.raises(LayerError, match=r"already lowered \(layers \['0', '2'"):
        lower(lowered, progress=False)


def test_sparsifying_or_pruning_a_lowered_model_says_it_is_lowered_already(lowered):
    """Found by probing: prune() sparsified the dense layers a lowered model kept, and lower() took the mix."""
    from srigl_compile import from_sparse_weights, prune

    for make_sparse in (sparsify, prune):
        with pytest.raises(LayerError, match=r"already condensed or lowered \(layers \['0', '2'"):
            make_sparse(lowered, SRigLConfig(sparsity=0.8))
    with pytest.raises(LayerError, match=r"already condensed or lowered"):
        from_sparse_weights(lowered)


def test_an_unknown_key_in_a_target_dict_is_named_with_the_allowed_ones(lowered):
    from srigl_compile.runtime.cpu_features import host_cpu_name

    for target in ({"kind": "llvm", "bogus": 1}, {"kind": "llvm", "mcpu": host_cpu_name(), "bogus": 1}):
        with pytest.raises(UnsupportedTargetError, match=r"unknown llvm target key\(s\) \['bogus'\].*mcpu.*num-cores"):
            lower(nn.Sequential(nn.Linear(8, 8)), target=target)


def test_save_lowered_and_kernel_folders_onto_a_file_name_the_file(lowered, tmp_path):
    file = tmp_path / "taken"
    file.write_text("a file")
    with pytest.raises(CheckpointError, match=f"{file} is a file, not a folder: save_lowered writes a folder"):
        save_lowered(lowered, file)
    handles = [get_handle(lowered[0].kernel_key)]
    with pytest.raises(KernelFileError, match="is a file, not a folder: export_kernels writes"):
        export_kernels(handles, file / "kernels")
    with pytest.raises(KernelFileError, match="is a file, not a folder: load_kernels reads"):
        load_kernels(file)
    assert file.read_text() == "a file"


@pytest.mark.parametrize("options, words", [
    ({"tune": "no"}, "tune='no' must be True or False"),
    ({"progress": 1}, "progress=1 must be True or False"),
    ({"col_threshold": "8"}, "col_threshold='8' must be None"),
    ({"col_threshold": -1}, "col_threshold=-1 must be None"),
    ({"dtype": "float32"}, "dtype='float32' must be a torch.dtype"),
])
def test_lower_options_of_the_wrong_type_are_refused_before_lowering(options, words):
    """Found by probing: a string flag acted as True, a string threshold failed at the first call."""
    from srigl_compile.codegen.backends import LlvmConfig

    sparse = sparsify(nn.Sequential(nn.Linear(8, 8)), SRigLConfig(sparsity=0.5))
    with pytest.raises(LoweringError, match=words):
        lower(sparse, **options)
    with pytest.raises(LoweringError, match="LlvmConfig.dense_fallback='no' must be True or False"):
        lower(sparse, LlvmConfig(dense_fallback="no"))


def test_a_failed_save_leaves_the_last_save_whole(lowered, tmp_path):
    """Found by probing: a pickling error deleted the folder's kernels and left half a model.pt."""
    from srigl_compile import load_lowered

    folder = tmp_path / "model"
    save_lowered(lowered, folder)
    lowered.unpicklable = lambda: 0
    try:
        with pytest.raises(AttributeError, match="pickle"):
            save_lowered(lowered, folder)
    finally:
        del lowered.unpicklable
    x = torch.randn(1, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(load_lowered(folder)(x), lowered(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # (no staging folder left behind)
    save_lowered(lowered, folder)  # (a save_lowered folder is replaced)


def test_save_lowered_refuses_folders_it_did_not_write_and_corrupt_manifests(lowered, tmp_path):
    from srigl_compile import load_lowered
    from srigl_compile.serialization import FORMAT

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "model.pt").write_text("the user's own file")
    with pytest.raises(CheckpointError, match="has no manifest.json: not a folder written by save_lowered"):
        save_lowered(lowered, mine)
    assert (mine / "model.pt").read_text() == "the user's own file"
    with pytest.raises(TypeError, match="save_lowered expects the nn.Module lower\\(\\) returned, not str"):
        save_lowered("model", tmp_path / "x")
    saved = save_lowered(lowered, tmp_path / "saved")
    for manifest, words in (([1, 2], "a list, not an object"),
                            ({"format": FORMAT}, "no \\['kernels', 'model_sha256'\\]")):
        (saved / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(CheckpointError, match=words):
            load_lowered(saved)


def _with_column(lowered_model, layer: str, value: int) -> dict:
    state = {key: tensor.clone() for key, tensor in lowered_model.state_dict().items()}
    state[f"{layer}.indices"].view(-1)[0] = value
    return state


def _conv_net():
    return nn.Sequential(nn.Conv2d(3, 8, 5), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _linear_net():
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))


@pytest.mark.parametrize("net, layer, shape", [(_conv_net, "0", (1, 3, 12, 12)), (_conv_net, "2", (2, 3, 12, 12)),
                                               (_linear_net, "0", (1, 32)), (_linear_net, "0", (64, 32))],
                         ids=["conv", "strided", "linear-row", "linear-tiled"])
@pytest.mark.parametrize("column", [30000, -5])
def test_indices_outside_the_kernel_s_columns_are_refused_before_loading_or_at_the_next_call(net, layer, shape,
                                                                                                column):
    """The kernels read the columns unchecked: a state dict with one out of range read past the input (linear) or
    crashed the process (conv) after load_state_dict (a probe, 2026-12-06). The model's load_state_dict refuses it
    before copying anything; what reaches a layer another way (its own load_state_dict, a write in place) is refused
    at the layer's next call."""
    torch.manual_seed(0)
    model = lower(sparsify(net(), SRigLConfig(sparsity=0.8, seed=1)), progress=False)
    good = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    x = torch.randn(*shape)
    with torch.no_grad():
        want = model(x)  # (warm: the layers' prepared calls exist)
        bad = _with_column(model, layer, column)
        for key in bad:  # (every other tensor differs too: a partial load would show)
            if key != f"{layer}.indices" and bad[key].is_floating_point():
                bad[key] += 1
        with pytest.raises(LayerError, match=rf"load_state_dict refused, nothing loaded: lowered Lowered\w+ "
                                             rf"'{layer}': the state dict's {layer}.indices hold columns in "
                                             r"\[-?\d+, \d+\], outside the kernel's \[0, \d+\)"):
            model.load_state_dict(bad)
        assert all(torch.equal(tensor, good[key]) for key, tensor in model.state_dict().items())
        torch.testing.assert_close(model(x), want)
        target = dict(model.named_modules())[layer]
        target.load_state_dict({key.removeprefix(f"{layer}."): tensor for key, tensor in bad.items()
                                if key.startswith(f"{layer}.")})  # (the layer's own load: no model-wide check)
        with pytest.raises(LayerError, match=rf"lowered Lowered\w+ '{layer}': its indices hold columns in "
                                             r"\[-?\d+, \d+\], outside the kernel's \[0, \d+\)"):
            model(x)
        model.load_state_dict(good)
        torch.testing.assert_close(model(x), want)
        target.indices.view(-1)[1] = column  # (in place, as well)
        with pytest.raises(LayerError, match="outside the kernel's"):
            model(x)


@pytest.mark.parametrize("net, shape", [(_conv_net, (1, 3, 12, 12)), (_linear_net, (1, 32))], ids=["conv", "linear"])
def test_a_model_moved_to_meta_names_the_device_at_its_call(net, shape):
    """A raw "Cannot pack tensors on meta" with C++ frames before (runtime probe)."""
    model = lower(sparsify(net(), SRigLConfig(sparsity=0.8, seed=1)), progress=False).to("meta")
    with torch.no_grad(), pytest.raises(KernelDeviceError, match=r"lowered Lowered\w+ '0': its operands are on "
                                                                 r"the meta device \(moved by .to\('meta'\)\)"):
        model(torch.randn(*shape))


def test_a_saved_folder_has_the_umask_s_mode(lowered, tmp_path):
    """A probe found it 0700 (mkdtemp's), where the folder around it and its kernels/ had the umask's."""
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    save_lowered(lowered, tmp_path / "saved")
    assert stat.S_IMODE((tmp_path / "saved").stat().st_mode) == 0o777 & ~umask
