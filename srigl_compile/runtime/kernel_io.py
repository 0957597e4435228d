"""Save and load compiled kernels, so a lowered model loads without recompiling.

``export_kernels(handles, folder)`` writes one shared library per handle (TVM ``export_library``; a linear shape's
kernels together, or a convolution's direct kernel) and ``manifest.json`` (format, TVM version, each handle's
shape, target, variants, file and SHA-256); each handle adds its own fields and files (``manifest_entry``: CUDA
handles write their CUDA source and nvcc fatbin, which the GPU machine loads instead of compiling the source).
``load_kernels(folder)`` checks all of it, builds each handle with the type its entry names (``HANDLE_TYPES``, by
device and kind), and registers it (``registry.register_loaded``: beside this process's other variant of a shape,
under a key of its own). A missing, corrupt or mismatched file is a ``KernelFileError``. Loading needs only the
TVM runtime.

Example:
    >>> export_kernels([handle], "model.kernels")        # doctest: +SKIP
    >>> handles = load_kernels("model.kernels")          # doctest: +SKIP
    >>> handles[handle.key](x, values, indices, bias)    # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from .cuda_linear import CudaLinearHandle
from .kernel_files import KernelFileError, as_folder, checked_file, sha256
from .llvm_conv import LlvmConvHandle
from .llvm_linear import LlvmLinearHandle
from .registry import register_loaded
from .spec import KernelSpec
from .tvm_runtime import import_tvm_runtime

__all__ = ["export_kernels", "load_kernels", "as_folder", "KernelFileError", "FORMAT", "HANDLE_TYPES"]

FORMAT = "srigl_compile.kernels/4"  # 4: the tiled linear kernels read blocked weights (3: index words)
_FIELDS = ("key", "n_out", "n_in", "k", "k_pad", "index_dtype", "has_bias", "target")  # every entry has these
# (device, kind) of a manifest entry -> the handle type that loads it; a new target's handle goes here
HANDLE_TYPES = {(handle.device_type, handle.kind): handle
                for handle in (LlvmLinearHandle, LlvmConvHandle, CudaLinearHandle)}


def export_kernels(handles: Iterable, path: str | os.PathLike) -> Path:
    """Write the handles' libraries (and their extra files) and ``manifest.json`` into the folder ``path``;
    returns the manifest path."""
    tvm = import_tvm_runtime()
    folder = as_folder(path, "export_kernels writes a folder of libraries and manifest.json")
    folder.mkdir(parents=True, exist_ok=True)
    entries = {}
    for handle in handles:
        if handle.key in entries:
            continue
        stem = hashlib.sha256(handle.key.encode()).hexdigest()[:16]
        file = folder / f"{stem}.so"
        if handle.library_path is not None:  # loaded from disk: a loaded library cannot be exported again
            if Path(handle.library_path).resolve() != file.resolve():
                shutil.copyfile(handle.library_path, file)
        else:
            handle.module.export_library(str(file))
        entry = {name: getattr(handle, name) for name in _FIELDS}
        entry.update(device=handle.device_type, file=file.name, sha256=sha256(file))
        if handle.spec.epilogue:
            entry["epilogue"] = handle.spec.epilogue
        if handle.spec.dtype:
            entry.setdefault("dtype", handle.spec.dtype)
        entry.update(handle.manifest_entry(folder, stem))
        entries[handle.key] = entry
    manifest = {"format": FORMAT, "tvm": str(tvm.__version__), "kernels": entries}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return folder / "manifest.json"


def _read_manifest(folder: Path) -> dict:
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except FileNotFoundError:
        raise KernelFileError(f"{folder} has no manifest.json: write it with export_kernels(handles, path)") from None
    except (OSError, ValueError) as err:
        raise KernelFileError(f"{folder / 'manifest.json'} is unreadable or corrupt ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise KernelFileError(f"{folder / 'manifest.json'} is not a {FORMAT} manifest "
                              f"(format {manifest.get('format') if isinstance(manifest, dict) else None!r})")
    if not isinstance(manifest.get("kernels", {}), dict):
        raise KernelFileError(f"{folder / 'manifest.json'} is corrupt: its kernels are a "
                              f"{type(manifest['kernels']).__name__}, not an object keyed by kernel")
    return manifest


def _spec(entry: dict, kind: str) -> KernelSpec:
    """The entry's KernelSpec (a CUDA entry names its dtype; a convolution's key ends in its own tile width)."""
    base_key = entry["key"].split("#")[0]  # (a shape's second variant in one process: "<key>#2")
    lanes = entry["params"]["lanes"] if kind == "conv" and base_key.endswith(f"_l{entry['params']['lanes']}") \
        else None
    spec = KernelSpec(entry["n_out"], entry["n_in"], entry["k"], entry["index_dtype"], entry["has_bias"],
                      entry.get("dtype"), kind, lanes, entry.get("epilogue", ""))
    if spec.k_pad != entry["k_pad"]:
        raise KernelFileError(f"manifest entry {entry['key']} has k_pad {entry['k_pad']}, not {spec.k_pad} for k "
                              f"{entry['k']}: written by another version, or edited")
    return spec


def _load_one(folder: Path, entry: dict):
    try:
        missing = [name for name in _FIELDS if name not in entry]
        if missing:
            raise KeyError(missing[0])
        kind = entry.get("kind", "linear")
        handle_type = HANDLE_TYPES[(entry.get("device", "cpu"), kind)]
        library = checked_file(folder, entry["file"], entry["sha256"])
        return handle_type.from_manifest(folder, entry, _spec(entry, kind), library)
    except (KeyError, TypeError) as err:
        raise KernelFileError(f"malformed manifest entry in {folder}: {err}") from err


def load_kernels(path: str | os.PathLike) -> dict:
    """Load every kernel of an ``export_kernels`` folder and register it (``registry.register_loaded``); returns
    {key in the folder: the handle registered for it}, whose key differs where this process already holds another
    variant of the same shape under the saved key.

    Raises:
        KernelFileError: missing/corrupt manifest or library, another format, or a library lacking a kernel.
    """
    folder = as_folder(path, "load_kernels reads the folder export_kernels wrote")
    manifest = _read_manifest(folder)
    handles = {key: _load_one(folder, entry) for key, entry in manifest.get("kernels", {}).items()}
    return {key: register_loaded(handle) for key, handle in handles.items()}
