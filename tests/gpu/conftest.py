"""GPU tests: on a machine with only the TVM runtime (the GPU machine), the kernels come prebuilt from the bundle
that ``scripts/build_gpu_bundle.py`` writes; ``SRIGL_CUDA_KERNELS`` names its kernel folder."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def prebuilt_cuda_kernels():
    folder = os.environ.get("SRIGL_CUDA_KERNELS")
    if folder:
        from srigl_compile.runtime.kernel_io import load_kernels

        load_kernels(folder)
