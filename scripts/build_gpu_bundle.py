"""Build what the GPU machine needs into .gpu_bundle/ (git-ignored): it has Python 3.12, torch and a GPU, but no
TVM compiler and no network.

    python scripts/build_gpu_bundle.py                      # here, on any machine with TVM, nvcc and PyPI access
    bash .gpu_bundle/run.sh python -m pytest -q tests/gpu   # there (the device tool: carry [".gpu_bundle"])
    bash .gpu_bundle/run.sh python benchmarks/bench_layer_cuda.py --out "$OUT"

Contents:
    tvm/         the runtime-only TVM package: this install's ``tvm`` without the 259 MB compiler library and the
                 sources/headers (``TVM_USE_RUNTIME_LIB=1`` makes it load only ``libtvm_runtime.so``)
    wheels/      apache-tvm-ffi (for the target Python) and the pure-Python packages srigl_compile and pytest need
    kernels/     every CUDA kernel the GPU tests and the GPU benchmarks use, prebuilt for sm_90 (library, CUDA
                 source, nvcc fatbin, manifest), so lower() finds them and compiles nothing there
    run.sh       installs the wheels into .gpu_bundle/site (once), sets the environment and runs its arguments

srigl_compile itself comes from the repository (run.sh puts it on the path). What runs a lowered model there is
the package ``srigl_compile.runtime``: the build imports every module of it under the bundle's runtime-only TVM
(``check_runtime_package``), so a module that needs the compiler fails here, not on the GPU machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# What the runtime does not need: the compiler library alone is 259 MB of the 305 MB package.
RUNTIME_EXCLUDES = ("libtvm_compiler.so", "3rdparty", "src", "include", "web", "lib64", "__pycache__", "*.pyc")
# apache-tvm-ffi is binary (per Python version); the rest are pure Python. numpy comes with torch there.
WHEELS = ("apache-tvm-ffi==0.1.14.post1", "ml_dtypes", "typing_extensions", "networkx", "tqdm", "click", "pytest",
          "pluggy", "iniconfig", "packaging")

RUN_SH = """#!/usr/bin/env bash
# Run a command with srigl_compile, the runtime-only TVM and the prebuilt CUDA kernels (see build_gpu_bundle.py).
set -euo pipefail
BUNDLE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python3}"
if [ ! -f "$BUNDLE/site/.installed" ]; then
    "$PY" -m pip install --quiet --no-index --no-deps --target "$BUNDLE/site" "$BUNDLE"/wheels/*.whl
    touch "$BUNDLE/site/.installed"
fi
export PYTHONPATH="$BUNDLE/site:$BUNDLE:$(dirname "$BUNDLE")${PYTHONPATH:+:$PYTHONPATH}"
export TVM_USE_RUNTIME_LIB=1
export SRIGL_CUDA_KERNELS="$BUNDLE/kernels"
exec "$@"
"""


def copy_runtime_tvm(out: Path) -> None:
    import tvm

    source = Path(tvm.__file__).resolve().parent
    shutil.rmtree(out / "tvm", ignore_errors=True)
    shutil.copytree(source, out / "tvm", ignore=shutil.ignore_patterns(*RUNTIME_EXCLUDES))


def download_wheels(out: Path, python_version: str) -> None:
    folder = out / "wheels"
    shutil.rmtree(folder, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", python_version, "--platform", "manylinux2014_x86_64",
                    "--platform", "manylinux_2_28_x86_64", "--dest", str(folder), *WHEELS], check=True)


def build_kernels(out: Path) -> int:
    """Lower the GPU tests' models and the GPU benchmarks' layers and models for sm_90; export every CUDA kernel
    built."""
    import bench_layer_cuda
    import bench_models_cuda

    from srigl_compile import lower
    from srigl_compile.nn.lowered import LoweredConv, LoweredLinear
    from srigl_compile.runtime.kernel_io import export_kernels
    from srigl_compile.runtime.registry import get_handle
    from tests.gpu.cases import DTYPES, TARGET, cases

    handles = bench_layer_cuda.build_handles()  # the benchmark's default layers and sparsities
    handles += bench_models_cuda.build_handles()  # one block of each whole model (the others share its kernels)
    for masked, _ in cases().values():
        for dtype in DTYPES:
            handles += [get_handle(m.kernel_key) for m in lower(masked, target=TARGET, dtype=dtype).modules()
                        if isinstance(m, (LoweredLinear, LoweredConv)) and m.n_active]
    shutil.rmtree(out / "kernels", ignore_errors=True)
    export_kernels(handles, out / "kernels")
    import cuda_variants

    shutil.rmtree(out / "variants", ignore_errors=True)
    cuda_variants.build(out / "variants")  # every schedule variant of the GPU timing run
    return len({h.key for h in handles})


def check_runtime_package(out: Path) -> None:
    """Import every module of ``srigl_compile.runtime`` (found by walking the package, not listed) with the
    bundle's runtime-only TVM and load the bundle's kernels with it; none of it may need the compile side."""
    code = ("import importlib, pkgutil, sys\n"
            "import srigl_compile.runtime as runtime\n"
            "for module in pkgutil.walk_packages(runtime.__path__, 'srigl_compile.runtime.'):\n"
            "    importlib.import_module(module.name)\n"
            "from srigl_compile.runtime.kernel_io import load_kernels\n"
            f"assert load_kernels({str(out / 'kernels')!r})\n"
            "compile_side = [m for m in sys.modules if m.startswith('srigl_compile.codegen.')]\n"
            "assert not compile_side, f'the runtime imported {compile_side}'\n")
    env = {**os.environ, "PYTHONPATH": f"{out}{os.pathsep}{ROOT}", "TVM_USE_RUNTIME_LIB": "1"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu_bundle")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python")
    parser.add_argument("--skip-wheels", action="store_true", help="keep the wheels already in the bundle")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    copy_runtime_tvm(args.out)
    if not args.skip_wheels:
        download_wheels(args.out, args.python_version)
    count = build_kernels(args.out)
    check_runtime_package(args.out)
    (args.out / "run.sh").write_text(RUN_SH)
    (args.out / "run.sh").chmod(0o755)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file()) / 2**20
    print(f"{args.out}: runtime-only TVM, {len(list((args.out / 'wheels').glob('*.whl')))} wheels, {count} CUDA "
          f"kernels; {size:.1f} MiB (the device tool carries at most 64 MiB)")


if __name__ == "__main__":
    main()
