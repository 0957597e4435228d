"""Save and load compiled kernels, so a lowered model loads without recompiling.

``export_kernels(handles, folder)`` writes one shared library per handle (TVM ``export_library``; row and col
kernels together, or a convolution's direct kernel) and ``manifest.json`` (format, TVM version, each handle's
shape, target, variants, file and SHA-256). CUDA handles also write their CUDA source (``.cu``) and its nvcc
fatbin (``.fatbin``): the library holds the source, and the fatbin is what the GPU machine loads instead of
compiling it. ``load_kernels(folder)`` checks all of it, loads the CPU libraries with ``tvm.runtime.load_module``
(CUDA ones on first use, on a GPU) and registers the handles under their keys. A missing, corrupt or mismatched
file is a ``KernelFileError``. Loading needs only the TVM runtime.

Example:
    >>> export_kernels([handle], "model.kernels")        # doctest: +SKIP
    >>> handles = load_kernels("model.kernels")          # doctest: +SKIP
    >>> handles[handle.key](x, values, indices, bias)    # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from ..errors import CheckpointError, LoweringError
from ._tvm_compat import import_tvm_runtime
from .cpu_target import host_cpu_name
from .conv_op import ConvKernelHandle
from .kernel_op import KernelHandle, register_handle
from .rules import ColParams, RowParams

__all__ = ["export_kernels", "load_kernels", "as_folder", "KernelFileError", "FORMAT"]

log = logging.getLogger(__name__)

FORMAT = "srigl_compile.kernels/3"  # 3: the row kernel takes its indices as 64-bit words
_FIELDS = ("key", "n_out", "n_in", "k", "k_pad", "index_dtype", "has_bias", "target")
_CUDA_FIELDS = ("dtype",)


class KernelFileError(CheckpointError):
    """A kernel folder is missing, corrupt, from another format, or does not match its manifest."""


def as_folder(path: str | os.PathLike, what: str, error: type[CheckpointError] = KernelFileError) -> Path:
    """``path`` as a folder to read or write: a file at it (or at a parent) is ``error`` saying ``what`` the path
    must be, rather than the NotADirectoryError / FileExistsError of the first file operation."""
    folder = Path(path)
    blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise error(f"{blocking} is a file, not a folder: {what}; pass a folder path")
    return folder


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_kernels(handles: Iterable, path: str | os.PathLike) -> Path:
    """Write the handles' libraries (and CUDA sources and fatbins) and ``manifest.json`` into the folder ``path``;
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
        entry.update(device=handle.device_type, file=file.name, sha256=_sha256(file))
        if getattr(handle, "kind", None) == "conv":
            entry.update(kind="conv", params=dataclasses.asdict(handle.params))
        elif handle.device_type == "cuda":
            entry.update(variants=handle.variants.to_dict(), dispatch=handle.dispatch.to_dict())
        else:
            entry.update(row_params=dataclasses.asdict(handle.row_params),
                         col_params=dataclasses.asdict(handle.col_params))
        if handle.device_type == "cuda":
            (folder / f"{stem}.cu").write_text(handle.source)
            (folder / f"{stem}.fatbin").write_bytes(handle.fatbin)
            entry.update({name: getattr(handle, name) for name in _CUDA_FIELDS}, fatbin_archs=handle.fatbin_archs,
                         source=f"{stem}.cu", source_sha256=_sha256(folder / f"{stem}.cu"),
                         fatbin=f"{stem}.fatbin", fatbin_sha256=_sha256(folder / f"{stem}.fatbin"))
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
    return manifest


def _checked_file(folder: Path, name: str, expected: str) -> Path:
    file = folder / name
    if not file.is_file():
        raise KernelFileError(f"kernel file {file} is missing")
    if _sha256(file) != expected:
        raise KernelFileError(f"kernel file {file} does not match its manifest (corrupt or replaced)")
    return file


def _load_one(folder: Path, entry: dict):
    try:
        fields = {name: entry[name] for name in _FIELDS}
        device = entry.get("device", "cpu")
        file = _checked_file(folder, entry["file"], entry["sha256"])
        if device == "cuda":
            return _load_cuda(folder, entry, fields, file)
        conv = entry.get("kind") == "conv"
        variants = {"params": ColParams(**entry["params"])} if conv else \
            {"row_params": RowParams(**entry["row_params"]), "col_params": ColParams(**entry["col_params"])}
    except (KeyError, TypeError) as err:
        raise KernelFileError(f"malformed manifest entry in {folder}: {err}") from err
    here = _host_cpu_or_none()
    if here is not None and fields["target"].get("mcpu") != here:
        log.warning("kernels in %s were compiled for %s, this CPU is %s", folder, fields["target"].get("mcpu"), here)
    try:
        module = import_tvm_runtime().runtime.load_module(str(file))
        handle = (ConvKernelHandle if conv else KernelHandle)(**fields, **variants, module=module,
                                                              library_path=str(file))
    except Exception as err:  # TVM raises its own error types for bad libraries and missing symbols
        raise KernelFileError(f"cannot load kernel {fields['key']} from {file}: {err}") from err
    return handle


def _host_cpu_or_none() -> str | None:
    try:
        return host_cpu_name()
    except (LoweringError, AttributeError):  # the runtime-only TVM has no LLVM to ask
        return None


def _load_cuda(folder: Path, entry: dict, fields: dict, file: Path):
    """A CUDA handle whose library is loaded on first use (on a GPU); its fatbin is registered for the loader."""
    from .cuda_build import CudaKernelHandle
    from .cuda_records import CudaDispatch, CudaVariants

    if "variants" not in entry:  # (the single row / col kernels of earlier versions)
        raise KernelFileError(f"CUDA kernel {fields['key']} in {folder} was saved by an earlier srigl_compile "
                              "(one row and one col kernel, no dispatch): lower the model again and save it")
    source = _checked_file(folder, entry["source"], entry["source_sha256"]).read_text()
    fatbin = _checked_file(folder, entry["fatbin"], entry["fatbin_sha256"]).read_bytes()
    return CudaKernelHandle(**fields, **{name: entry[name] for name in _CUDA_FIELDS},
                            fatbin_archs=tuple(entry["fatbin_archs"]),
                            variants=CudaVariants.from_dict(entry["variants"]), dispatch=CudaDispatch.from_dict(entry["dispatch"]), source=source, fatbin=fatbin,
                            library_path=str(file))


def load_kernels(path: str | os.PathLike) -> dict[str, KernelHandle]:
    """Load every kernel of an ``export_kernels`` folder and register it; returns {key: handle}.

    Raises:
        KernelFileError: missing/corrupt manifest or library, another format, or a library lacking a kernel.
    """
    folder = as_folder(path, "load_kernels reads the folder export_kernels wrote")
    manifest = _read_manifest(folder)
    handles = {key: _load_one(folder, entry) for key, entry in manifest.get("kernels", {}).items()}
    for handle in handles.values():
        register_handle(handle)
    return handles
