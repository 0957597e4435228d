"""The logged warning that torch's OpenMP threads will spin between ops (``runtime.tvm_runtime.check_wait_policy``):
given where neither variable is set, and only there."""

import logging

import pytest
import torch

from srigl_compile.runtime.tvm_runtime import check_wait_policy


@pytest.mark.parametrize(("environment", "threads", "warned"), [
    ({}, 2, True),
    ({"OMP_WAIT_POLICY": "PASSIVE"}, 2, False),
    ({"OMP_WAIT_POLICY": "ACTIVE"}, 2, False),  # (the user chose)
    ({"GOMP_SPINCOUNT": "20000"}, 2, False),
    ({}, 1, False),  # (no worker thread to spin)
])
def test_the_wait_policy_warning_names_the_variable_where_threads_spin(monkeypatch, caplog, environment, threads,
                                                                        warned):
    if "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch is not built on OpenMP here")
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    with caplog.at_level(logging.WARNING, logger="srigl_compile.runtime.tvm_runtime"):
        check_wait_policy.__wrapped__()
    said = [r.getMessage() for r in caplog.records if "OMP_WAIT_POLICY" in r.getMessage()]
    assert bool(said) is warned
    if warned:
        assert "OMP_WAIT_POLICY=PASSIVE" in said[0] and "setting either silences this" in said[0]
