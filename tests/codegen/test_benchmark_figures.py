"""What the benchmark suite computes before it reports: medians, microseconds, the whole command, failed checks
failing, ratios as dense over the variant and the fastest other, layers run in batch chunks timed whole.
Each test failed on a mutant the rest of the suite let through (mutation probe, session 43)."""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from types import SimpleNamespace

import common  # noqa: E402
import pytest

pytestmark = pytest.mark.tvm


def test_summarize_reports_the_median_and_quartiles():
    """The median, not the mean."""
    summary = common.summarize([1.0, 2.0, 3.0, 10.0])
    assert summary["median"] == 2.5 and summary["p25"] <= 2.5 <= summary["p75"] and summary["n"] == 4


def test_measure_reports_microseconds():
    """A 2 ms call measures about 2000 us."""
    result = common.measure(lambda: time.sleep(0.002), common.TimerConfig(threads=1, min_run_time=0.05))
    assert 1500 < result["median"] < 50_000 and result["n"] >= 3


def test_environment_records_the_whole_command(monkeypatch):
    """Every argument of the command is recorded."""
    monkeypatch.setattr(sys, "argv", ["benchmarks/run.py", "--quick", "--out", "x"])
    assert common.environment()["command"].endswith("run.py --quick --out x")


def test_check_fails_outputs_that_differ():
    """A variant whose output differs from the reference does not pass its check."""
    import layers

    result = layers.check(torch.zeros(2, 3), torch.ones(2, 3))
    assert result["passed"] is False and result["max_abs_err"] == 1.0


def test_speedup_vs_dense_is_dense_over_the_variant():
    """4x faster than dense is speedup_vs_dense 4."""
    import layers

    rows = [{"variant": "dense", "device": "cpu", "time_us": {"median": 100.0}},
            {"variant": "lowered_llvm", "device": "cpu", "time_us": {"median": 25.0}}]
    layers.add_speedups(rows)
    assert [r["speedup_vs_dense"] for r in rows] == [1.0, 4.0]


def timed(median):
    return {"time_us": {"median": median, "p25": median, "p75": median}}


def test_report_ratios_are_over_dense_and_over_the_best_other():
    """'vs best other' is the fastest other variant over lowered."""
    import report

    cells = report.ratio_cells({"dense": timed(100.0), "csr": timed(50.0), "tvm_dense": timed(80.0),
                                "lowered_llvm": timed(25.0)})
    assert cells == "4.00x | 2.00x | 0%"


def test_checks_summary_counts_a_failed_comparison():
    """A check that compared and failed (no exception) counts as failed."""
    import report

    rows = [{"layer": "l", "mask": "m", "sparsity": 0.9, "batch": 1, "variant": "csr",
             "check": {"passed": False, "max_abs_err": 1.0}},
            {"layer": "l", "mask": "m", "sparsity": 0.9, "batch": 1, "variant": "dense",
             "check": {"passed": True, "max_abs_err": 0.0}}]
    lines = report.checks_summary(rows)
    assert lines[0].startswith("Checks: 1 of 2 variant runs matched") and lines[1].startswith("- FAILED: l m 90%")


class InChunks(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return torch.cat([self.inner(x[:2]), self.inner(x[2:])])


def test_a_layer_s_time_per_forward_is_every_call_s(monkeypatch):
    """Two calls of 1 s each are 2 s of the forward (the median call times the calls)."""
    pytest.importorskip("tvm")
    import layer_efficiency

    from srigl_compile import SRigLConfig, lower, sparsify
    from srigl_compile.nn.lowered import LoweredLinear
    from srigl_compile.nn.settle import settle

    torch.manual_seed(0)
    masked = sparsify(torch.nn.Sequential(torch.nn.Linear(16, 8)), SRigLConfig(sparsity=0.5, distribution="uniform"))
    model = InChunks(lower(masked.eval(), progress=False))
    x = torch.randn(4, 16)
    settle(model, x)
    names = [name for name, m in model.named_modules() if isinstance(m, LoweredLinear)]
    assert len(names) == 1
    ticks = iter(range(10_000))
    monkeypatch.setattr(layer_efficiency, "time", SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    monkeypatch.setattr(layer_efficiency, "sgemm_peak_gflops", lambda: 100.0)
    table = layer_efficiency.layer_efficiency(model, x, forwards=1)
    (row,) = table["layers"]
    assert row["calls"] == 2 and row["ms"] == 2000.0
