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


def test_quick_mode(tmp_path):
    """One test, so that pytest-xdist runs the quick mode once, not once per worker (~90 s alone on 2 cores, ~150 s
    with ``--dense-compiled``'s inductor compiles)."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    command = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--bf16-values", "--dense-compiled",
               "--out", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    check_outputs(tmp_path)
    check_layer_rows(tmp_path)
    check_model_rows(tmp_path)
    check_decoder_rows(tmp_path)


def check_outputs(folder):
    for name in ("layers.json", "models.json", "training.json", "decoder.json", "report.md",
                 "speedup_vs_sparsity_b1.png"):
        assert (folder / name).stat().st_size > 0, name
    assert list(folder.glob("speedup_vs_batch_*.png"))
    report = (folder / "report.md").read_text()
    assert "## Layers" in report and "## Models" in report and "## Training" in report and "## Decoder" in report
    assert "Quick mode" in report and "Kernel efficiency" in report


def check_layer_rows(folder):
    """Every layer variant either passed its check against the dense reference and was timed, or says why not."""
    data = json.loads((folder / "layers.json").read_text())
    assert data["environment"]["command"] and data["environment"]["threads"]
    variants = set()
    for row in data["rows"]:
        variants.add(row["variant"])
        if row["variant"] == "bound":
            continue
        assert "skipped" in row or row["check"]["passed"], row
        assert "skipped" in row or "time_us" in row, row
    assert {"dense", "dense_compile", "csr", "structured", "gather", "tvm_dense", "lowered_llvm",
            "lowered_cuda"} <= variants


def check_model_rows(folder):
    rows = json.loads((folder / "models.json").read_text())["rows"]
    lowered = [r for r in rows if r["variant"] == "lowered"]
    assert lowered and all(r["check"]["passed"] for r in lowered)
    assert all(0 < r["sparse_share"]["share"] < 1 for r in lowered)
    for r in lowered:  # each lowered layer's time and GFLOP/s inside the forward, against the sgemm peak
        e = r["kernel_efficiency"]
        assert e["layers"] and e["sgemm_peak_gflops"] > 0 and e["forward_ms"] > 0
        assert all(0 < layer["ms"] < e["forward_ms"] and layer["gflops"] > 0 for layer in e["layers"])
        assert len({layer["layer"] for layer in e["layers"]}) == len(e["layers"]) and e["useful_gflop"] > 0
    # --bf16-values: the same masked models lowered with bfloat16 values, checked within bf16's tolerance and timed
    bf16 = [r for r in rows if r["variant"] == "lowered_bf16"]
    assert [(r["model"], r["batch"]) for r in bf16] == [(r["model"], r["batch"]) for r in lowered]
    assert all(r["check"]["passed"] and 0 < r["check"]["max_rel_err_vs_masked"] < r["check"]["tolerance_rel"]
               and r["time_us"]["median"] > 0 for r in bf16)
    # the lowered model under cpu_graph: checked against the masked model, timed, compared with the best dense
    graphed = [r for r in rows if r["variant"] == "lowered_graph"]
    assert [(r["model"], r["batch"]) for r in graphed] == [(r["model"], r["batch"]) for r in lowered]
    assert all(r["check"]["passed"] and r["time_us"]["median"] > 0 and r["speedup_vs_best_dense"] > 0
               and r["held_bytes"] > 0 for r in graphed)
    # dense is also timed in its own processes, under each other thread setting; the best of all is the baseline
    variants = {r["variant"] for r in rows}
    assert {"dense@default_omp", "dense@gomp_spin_20k"} <= variants
    # --dense-compiled: and under torch.compile there (kept only when it matches the eager dense model)
    assert {"dense_compiled@default_omp", "dense_compiled@gomp_spin_20k"} <= variants
    for r in lowered:
        assert r["best_dense"]["setting"] in ("passive", "default_omp", "gomp_spin_20k")
        dense_times = [d["time_us"]["median"] for d in rows if d["variant"].startswith("dense")
                       and d["model"] == r["model"] and d["batch"] == r["batch"] and "time_us" in d]
        assert r["best_dense"]["median_us"] == min(dense_times)


def check_decoder_rows(folder):
    """The Wanda-pruned decoder: dense, pruned and lowered timed (eagerly, with a static cache, replayed); every
    lowered variant generated the pruned tokens."""
    rows = json.loads((folder / "decoder.json").read_text())["rows"]
    lowered = {"lowered", "lowered_static", "lowered_graph"}
    assert {r["variant"] for r in rows} == {"dense", "pruned"} | lowered
    assert all(r["check"]["passed"] and r["sparse_layers"] > 0 for r in rows if r["variant"] in lowered)
    assert all(r["tokens_per_s"] > 0 for r in rows)
