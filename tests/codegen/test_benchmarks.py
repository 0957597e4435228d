"""The benchmark suite's quick mode (CI's smoke test): every variant is checked or explicitly skipped, and the
JSON, markdown report and plots are written. No timing claims.

    python -m pytest -q tests/codegen/test_benchmarks.py
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.tvm

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def test_quick_mode_writes_json_report_and_plots(quick_run):
    for name in ("layers.json", "models.json", "training.json", "report.md", "speedup_vs_sparsity_b1.png"):
        assert (quick_run / name).stat().st_size > 0, name
    assert list(quick_run.glob("speedup_vs_batch_*.png"))
    report = (quick_run / "report.md").read_text()
    assert "## Layers" in report and "## Models" in report and "## Training" in report
    assert "Quick mode" in report


def test_every_layer_variant_is_checked_or_skipped(quick_run):
    data = json.loads((quick_run / "layers.json").read_text())
    assert data["environment"]["command"] and data["environment"]["torch_threads"]
    variants = set()
    for row in data["rows"]:
        variants.add(row["variant"])
        if row["variant"] == "bound":
            continue
        assert "skipped" in row or row["check"]["passed"], row
        assert "skipped" in row or "time_us" in row, row
    assert {"dense", "dense_compile", "csr", "structured", "gather", "tvm_dense", "lowered_llvm",
            "lowered_cuda"} <= variants


def test_lowered_models_match_masked(quick_run):
    rows = json.loads((quick_run / "models.json").read_text())["rows"]
    lowered = [r for r in rows if r["variant"] == "lowered"]
    assert lowered and all(r["check"]["passed"] for r in lowered)
    assert all(0 < r["sparse_share"]["share"] < 1 for r in lowered)
