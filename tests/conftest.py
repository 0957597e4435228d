"""Test tiers: tests/no_tvm (torch only), tests/codegen (TVM; CUDA builds need nvcc), tests/gpu (a CUDA GPU).
Markers: `slow` runs with --run-slow; `tvm` needs apache-tvm; `gpu` needs CUDA."""

from __future__ import annotations

import importlib.util

import pytest


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    has_tvm = importlib.util.find_spec("tvm") is not None
    skip_slow = pytest.mark.skip(reason="slow: run with --run-slow")
    skip_tvm = pytest.mark.skip(reason="apache-tvm is not installed (pip install -e '.[tvm]')")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(skip_slow)
        if "tvm" in item.keywords and not has_tvm:
            item.add_marker(skip_tvm)
        if "gpu" in item.keywords and not _has_cuda():
            item.add_marker(pytest.mark.skip(reason="no CUDA GPU on this machine"))


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
