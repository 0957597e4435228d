"""``srigl-compile bench`` end to end: the lowered layer checked against the masked one, one row per batch, and the
machine the figures depend on named beside them. No timing claims (only the ratio's arithmetic)."""

import re

import pytest
import torch
from click.testing import CliRunner

from srigl_compile.cli import main

pytestmark = pytest.mark.tvm


def test_bench_reports_each_batch_with_the_machine_it_ran_on():
    result = CliRunner().invoke(main, ["bench", "--sparsity", "0.95", "--batches", "1,3", "--threads", "1"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("3072->768 at 95% sparsity, 1 threads")
    assert lines[1].startswith("on ") and f"torch {torch.__version__}" in lines[1] and "srigl_compile" in lines[1]
    rows = [line.split() for line in lines if re.match(r"\s*\d+\s", line)]
    assert [row[0] for row in rows] == ["1", "3"]
    for _, dense, _, lowered, ratio in rows:  # dense over lowered, as its column says (printed rounded)
        assert float(ratio.rstrip("x")) == pytest.approx(float(dense) / float(lowered), rel=0.02, abs=0.006)
