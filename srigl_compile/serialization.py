"""Save and load lowered models without recompiling.

A saved model is a folder:
    model.pt        the module (torch.save of the whole nn.Module; lowered layers hold only tensors and a key)
    kernels/        every compiled kernel library with its manifest and SHA-256s (``runtime.kernel_io``)
    manifest.json   format, versions, the SHA-256s of the model file and of the kernels' manifest, the kernel keys

Loading checks the manifests and hashes, registers the kernel libraries, then loads the module and checks that
every lowered layer's kernel is there. A missing, corrupt or mismatched file is a CheckpointError.

Example:
    >>> save_lowered(lower(model), "out/lowered")     # doctest: +SKIP
    >>> fast = load_lowered("out/lowered")           # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from .errors import CheckpointError
from .runtime.kernel_files import sha256

__all__ = ["save_lowered", "load_lowered"]

FORMAT = "srigl_compile.lowered/2"
# the attributes by which a lowered model's modules name their kernels' handles (``runtime.registry``)
KEY_ATTRIBUTES = ("kernel_key", "attention_key")


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _lowered_layers(model: nn.Module):
    from .nn.lowered import LoweredConv, LoweredLinear

    return [(name, m) for name, m in model.named_modules() if isinstance(m, (LoweredLinear, LoweredConv))]


def save_lowered(model: nn.Module, path) -> Path:
    """Write ``model`` (the output of ``lower``) and its compiled kernels to the folder ``path`` (replacing a model
    saved there before; a folder holding a ``kernels`` directory not written by save_lowered is a CheckpointError).
    """
    from importlib.metadata import version

    from .runtime.kernel_io import as_folder, export_kernels
    from .runtime.registry import get_handle

    if not isinstance(model, nn.Module):
        raise TypeError(f"save_lowered expects the nn.Module lower() returned, not {type(model).__name__}")
    path = as_folder(path, "save_lowered writes a folder (model.pt, manifest.json, kernels/)", CheckpointError)
    keys = sorted({layer.kernel_key for _, layer in _lowered_layers(model) if layer.n_active})
    if not _lowered_layers(model):
        raise CheckpointError("the model has no lowered layers: call srigl_compile.lower(model) first")
    if path.is_dir() and any(path.iterdir()):
        _read_manifest(path)  # (a folder with files is replaced only if save_lowered wrote it)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written beside, then swapped in: a save that fails (an attribute pickle refuses) leaves the last one whole.
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.saving-", dir=path.parent))
    except OSError as err:
        raise CheckpointError(f"cannot write the folder {path}: {err.strerror or err}; choose another path") from None
    staging.chmod(0o777 & ~_umask())  # (mkdtemp's 0700 would become the saved folder's mode)
    try:
        export_kernels([get_handle(key) for key in keys], staging / "kernels")
        torch.save(model, staging / "model.pt")
        manifest = {"format": FORMAT, "torch": torch.__version__, "tvm": version("apache-tvm"), "kernels": keys,
                    "model_sha256": sha256(staging / "model.pt"),
                    "kernels_sha256": sha256(staging / "kernels" / "manifest.json")}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if path.exists():
        replaced = staging.with_name(staging.name.replace(".saving-", ".replaced-"))
        path.rename(replaced)
        staging.rename(path)
        shutil.rmtree(replaced, ignore_errors=True)
    else:
        staging.rename(path)
    return path


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no manifest.json: not a folder written by save_lowered") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path / 'manifest.json'} is corrupt ({err})") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path / 'manifest.json'} is corrupt (a {type(manifest).__name__}, not an object)")
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown format {manifest.get('format')!r}, expected {FORMAT!r}")
    missing = [key for key in ("kernels", "model_sha256") if key not in manifest]
    if missing:
        raise CheckpointError(f"{path / 'manifest.json'} is corrupt (no {missing}): save the model again")
    return manifest


def load_lowered(path) -> nn.Module:
    """Load a folder written by ``save_lowered``; no compiler runs."""
    from .runtime.kernel_io import as_folder, load_kernels

    path = as_folder(path, "load_lowered reads the folder save_lowered wrote", CheckpointError)
    manifest = _read_manifest(path)
    kernels = path / "kernels" / "manifest.json"
    if "kernels_sha256" in manifest and (not kernels.exists() or sha256(kernels) != manifest["kernels_sha256"]):
        raise CheckpointError(f"{kernels} is missing or does not match manifest.json: edited or replaced (its "
                              "entries tell how each library is called); save the model again")
    loaded = load_kernels(path / "kernels")
    model_file = path / "model.pt"
    if not model_file.exists() or sha256(model_file) != manifest["model_sha256"]:
        raise CheckpointError(f"{model_file} is missing or does not match manifest.json: corrupt or replaced")
    with torch.inference_mode(False):  # (tensors made in inference mode have no version counter: see _Condensed)
        model = torch.load(model_file, weights_only=False)
    missing = [name for name, layer in _lowered_layers(model) if layer.n_active and layer.kernel_key not in loaded]
    if missing:
        raise CheckpointError(f"layers {missing[:5]} use kernels that are not in {path / 'kernels'}")
    renamed = {saved: handle.key for saved, handle in loaded.items() if handle.key != saved}
    for module in model.modules() if renamed else ():  # (registered beside this process's other variant)
        for name in KEY_ATTRIBUTES:
            if getattr(module, name, None) in renamed:
                setattr(module, name, renamed[getattr(module, name)])
    return model
