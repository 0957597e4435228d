"""Save and load lowered models without recompiling.

A saved model is a folder:
    model.pt        the module (torch.save of the whole nn.Module; lowered layers hold only tensors and a key)
    kernels/*.so    every compiled kernel (TVM export_library), one file per shape and layout
    manifest.json   format, versions, kernel keys -> files and their SHA-256

Loading checks the manifest and the hashes, loads the kernel libraries into the op registry, then the module, and
checks that every lowered layer's kernel is there. A missing, corrupt or mismatched file is a CheckpointError.

Example:
    >>> save_lowered(lower(model), "out/lowered")     # doctest: +SKIP
    >>> fast = load_lowered("out/lowered")           # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from .errors import CheckpointError

__all__ = ["save_lowered", "load_lowered"]

FORMAT = "srigl_compile.lowered/1"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _lowered_layers(model: nn.Module):
    from .nn.lowered import LoweredConv, LoweredLinear

    return [(name, m) for name, m in model.named_modules() if isinstance(m, (LoweredLinear, LoweredConv))]


def save_lowered(model: nn.Module, path) -> Path:
    """Write ``model`` (the output of ``lower``) and its compiled kernels to the folder ``path``."""
    from .codegen import op

    path = Path(path)
    (path / "kernels").mkdir(parents=True, exist_ok=True)
    layers = _lowered_layers(model)
    if not layers:
        raise CheckpointError("the model has no lowered layers: call srigl_compile.lower(model) first")
    kernels = {}
    for _, layer in layers:
        key = layer.kernel_key
        if key in kernels or layer.n_active == 0:
            continue
        compiled = op._kernel(key)
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        entry = {"spec": dataclasses.asdict(compiled.spec), "files": {}, "sha256": {}}
        for layout in ("row", "col"):
            file = path / "kernels" / f"{digest}_{layout}.so"
            if hasattr(compiled, "files"):  # loaded from a library already: copy it
                shutil.copyfile(compiled.files[layout], file)
            else:
                compiled.executables[layout].export_library(str(file))
            entry["files"][layout] = file.name
            entry["sha256"][layout] = _sha256(file)
        kernels[key] = entry
    torch.save(model, path / "model.pt")
    manifest = {"format": FORMAT, "torch": torch.__version__, "tvm": _tvm_version(), "kernels": kernels,
                "model_sha256": _sha256(path / "model.pt")}
    (path / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return path


def _tvm_version() -> str:
    from importlib.metadata import version

    return version("apache-tvm")


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no manifest.json: not a folder written by save_lowered") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path / 'manifest.json'} is corrupt ({err})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def _verified(path: Path, name: str, expected: str) -> Path:
    file = path / name
    if not file.exists():
        raise CheckpointError(f"{file} is missing")
    if _sha256(file) != expected:
        raise CheckpointError(f"{file} does not match its SHA-256 in manifest.json: the file is corrupt or replaced")
    return file


def load_lowered(path) -> nn.Module:
    """Load a folder written by ``save_lowered``; no compiler runs."""
    from .codegen._tvm import tvm_modules
    from .codegen.build import KernelSpec, LoadedKernel
    from .codegen.op import register_kernel

    path = Path(path)
    manifest = _read_manifest(path)
    tvm, _, _ = tvm_modules()
    for key, entry in manifest["kernels"].items():
        files = {layout: _verified(path / "kernels", file, entry["sha256"][layout])
                 for layout, file in entry["files"].items()}
        try:
            modules = {layout: tvm.runtime.load_module(str(file)) for layout, file in files.items()}
        except Exception as err:  # TVM raises its own error types for unloadable libraries
            raise CheckpointError(f"cannot load the kernels of {key} from {path / 'kernels'}: {err}") from err
        spec = dict(entry["spec"])
        spec["target"] = tuple(tuple(item) for item in spec["target"])
        register_kernel(key, LoadedKernel(KernelSpec(**spec), modules, files))
    model = torch.load(_verified(path, "model.pt", manifest["model_sha256"]), weights_only=False)
    missing = [name for name, layer in _lowered_layers(model)
               if layer.n_active and layer.kernel_key not in manifest["kernels"]]
    if missing:
        raise CheckpointError(f"layers {missing[:5]} use kernels that are not in {path / 'kernels'}")
    return model
