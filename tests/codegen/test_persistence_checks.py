"""What save_lowered / load_lowered and the kernel registry check: the model file's hash, every layer's kernel
in the folder, no copy left beside a save over a save, edited or null kernel entries, other formats, attention
layers renamed beside another variant, capabilities counting only present functions. Each test failed on a
mutant the rest of the suite let through (mutation probe, session 43)."""

import json
import types

import pytest
import torch
import torch.nn as nn

from srigl_compile import SRigLConfig, load_lowered, lower, save_lowered, sparsify
from srigl_compile.errors import CheckpointError
from srigl_compile.nn.condensed_attention import CondensedMultiheadAttention
from srigl_compile.runtime import registry
from srigl_compile.runtime.handle import HandleBase
from srigl_compile.runtime.kernel_files import KernelFileError
from srigl_compile.runtime.kernel_io import load_kernels
from srigl_compile.runtime.spec import KernelSpec
from tests.models import lowered_attention_encoder

pytestmark = pytest.mark.tvm


@pytest.fixture(scope="module")
def lowered():
    torch.manual_seed(0)
    return lower(sparsify(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)),
                          SRigLConfig(sparsity=0.8, seed=1)), progress=False)


def test_a_replaced_model_file_is_a_checkpoint_error(lowered, tmp_path):
    """model.pt replaced by another pickle (here the same model with other weights) must not load silently."""
    folder = save_lowered(lowered, tmp_path / "model")
    other = {key: tensor * 2 if tensor.is_floating_point() else tensor for key, tensor in lowered.state_dict().items()}
    import copy
    edited = copy.deepcopy(lowered)
    edited.load_state_dict(other)
    torch.save(edited, folder / "model.pt")
    with pytest.raises(CheckpointError, match="model.pt is missing or does not match manifest.json"):
        load_lowered(folder)


def test_a_layer_whose_kernel_the_folder_lacks_is_a_checkpoint_error(lowered, tmp_path):
    """A kernels/ folder missing one layer's kernel (a save from before kernels_sha256, whose entries nothing
    hashes) must be refused at load, not run with whatever this process happens to hold."""
    folder = save_lowered(lowered, tmp_path / "model")
    kernels = folder / "kernels" / "manifest.json"
    manifest = json.loads(kernels.read_text())
    manifest["kernels"].pop(lowered[0].kernel_key)
    kernels.write_text(json.dumps(manifest))
    top = json.loads((folder / "manifest.json").read_text())
    top.pop("kernels_sha256")
    (folder / "manifest.json").write_text(json.dumps(top))
    with pytest.raises(CheckpointError, match=r"layers \['0'\] use kernels that are not in"):
        load_lowered(folder)


def test_saving_over_a_saved_model_leaves_no_folder_beside_it(lowered, tmp_path):
    save_lowered(lowered, tmp_path / "model")
    save_lowered(lowered, tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def _edit_json(path, edit) -> None:
    """Rewrite the JSON file at ``path`` with ``edit`` applied to its contents (as a hand edit would)."""
    contents = json.loads(path.read_text())
    edit(contents)
    path.write_text(json.dumps(contents))


def test_a_kernel_entry_with_an_edited_k_pad_is_a_kernel_file_error(lowered, tmp_path):
    folder = save_lowered(lowered, tmp_path / "model") / "kernels"

    def pad_more(manifest):
        manifest["kernels"][lowered[0].kernel_key]["k_pad"] += 8

    _edit_json(folder / "manifest.json", pad_more)
    with pytest.raises(KernelFileError, match="k_pad"):
        load_kernels(folder)


def test_a_kernel_entry_with_a_null_file_is_a_kernel_file_error(lowered, tmp_path):
    folder = save_lowered(lowered, tmp_path / "model") / "kernels"
    _edit_json(folder / "manifest.json", lambda m: m["kernels"][lowered[0].kernel_key].update(file=None))
    with pytest.raises(KernelFileError, match="malformed manifest entry"):
        load_kernels(folder)


def test_a_manifest_of_another_lowered_format_is_refused(lowered, tmp_path):
    folder = save_lowered(lowered, tmp_path / "model")
    _edit_json(folder / "manifest.json", lambda m: m.update(format="srigl_compile.lowered/1"))
    with pytest.raises(CheckpointError, match="unknown format 'srigl_compile.lowered/1'"):
        load_lowered(folder)


def test_a_kernel_folder_of_another_format_is_a_kernel_file_error(lowered, tmp_path):
    """Format 3 libraries read index words, format 4 blocked weights: an older folder must not load."""
    folder = save_lowered(lowered, tmp_path / "model") / "kernels"
    _edit_json(folder / "manifest.json", lambda m: m.update(format="srigl_compile.kernels/3"))
    with pytest.raises(KernelFileError, match="is not a srigl_compile.kernels/4 manifest"):
        load_kernels(folder)


def test_attention_keys_are_renamed_when_loaded_beside_another_variant(tmp_path):
    masked, lowered, x = lowered_attention_encoder(True)
    save_lowered(lowered, tmp_path / "model")
    saved = {m.attention_key for m in lowered.modules() if isinstance(m, CondensedMultiheadAttention)}
    assert saved and all(saved)
    before = dict(registry._HANDLES)
    try:
        for key in saved:  # another variant of the shape holds the saved key in this process (a stand-in here)
            registry._HANDLES[key] = types.SimpleNamespace(key=key)
        loaded = load_lowered(tmp_path / "model")
        keys = {m.attention_key for m in loaded.modules() if isinstance(m, CondensedMultiheadAttention)}
        assert keys.isdisjoint(saved)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), masked(x), rtol=1e-5, atol=1e-5)
    finally:
        registry._HANDLES.clear()
        registry._HANDLES.update(before)


def test_capabilities_count_only_the_functions_a_library_has():
    """A library saved before some glue existed loads with that ``*_fn`` None: it cannot run it, so a handle that
    has it must count as more capable (``registry.register_loaded`` keeps the more capable one)."""
    older = HandleBase("k", KernelSpec(8, 16, 4, "int16", True), {})
    newer = HandleBase("k", KernelSpec(8, 16, 4, "int16", True), {})
    older.kernel_fn, older.glue_fn = print, None
    newer.kernel_fn, newer.glue_fn = print, print
    assert older.capabilities() == {"kernel_fn"}
    assert newer.capabilities() > older.capabilities()


def test_a_shapes_third_and_fourth_variants_are_key_3_and_key_4():
    """Further variants of one shape are key#2, key#3, ... as registry.py documents (the keys lowered layers,
    manifests and error messages carry), not key#2#3."""
    key = "probe_o8_i16_k4_int16_b@kind=llvm"
    before = dict(registry._HANDLES)
    try:
        for taken in (key, f"{key}#2"):  # two other variants of the shape already hold these keys
            registry._HANDLES[taken] = types.SimpleNamespace(key=taken)
        assert registry.variant_key(key, lambda handle: False) == (f"{key}#3", None)
        registry._HANDLES[f"{key}#3"] = third = types.SimpleNamespace(key=f"{key}#3")
        assert registry.variant_key(key, lambda handle: False) == (f"{key}#4", None)
        assert registry.variant_key(key, lambda handle: handle is third) == (f"{key}#3", third)
    finally:
        registry._HANDLES.clear()
        registry._HANDLES.update(before)
