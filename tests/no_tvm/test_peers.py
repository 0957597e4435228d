"""The model benchmark's peers (benchmarks/peers.py): ONNX Runtime and OpenVINO on the dense model and the masked
model, checked against torch. The runtimes are an optional extra (pip install -e '.[peers]'): the tests that run
them skip without it; the masks baked into a dense copy and the "not installed" note are tested either way."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import peers
from common import TimerConfig

from srigl_compile import SRigLConfig, sparsify
from srigl_compile.nn.masked import is_masked
from srigl_compile.zoo import SmallViT

BASE = {"model": "tiny_vit", "batch": 2, "resolution": 16}
TIMER = TimerConfig(threads=1, min_run_time=0.01, min_samples=1)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    dense = SmallViT((3, 16, 16), 10, patch=4, dim=32, depth=1, heads=2, mlp_dim=64).eval()
    masked = sparsify(dense, SRigLConfig(sparsity=0.9, distribution="uniform"),
                      example_inputs=(torch.randn(2, 3, 16, 16),)).eval()
    return dense, masked


def test_baked_masks_are_a_plain_copy_of_the_masked_model(models):
    dense, masked = models
    baked = peers.bake_masks(masked, dense)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(baked(x), masked(x))
    assert not any(is_masked(m) for m in baked.modules())
    zeros = sum(int((m.weight == 0).sum()) for m in baked.modules() if isinstance(m, torch.nn.Linear))
    assert zeros > 0.8 * sum(m.weight.numel() for m in baked.modules() if isinstance(m, torch.nn.Linear))


def test_a_runtime_not_installed_is_a_note_not_an_error(monkeypatch, tmp_path):
    monkeypatch.setattr(peers, "missing", lambda *m: f"{', '.join(m)} not installed: {peers.INSTALL}")
    rows = peers.peer_rows({"dense": "not exported", "masked": "not exported"}, torch.randn(2, 3, 16, 16),
                           {}, BASE, TIMER, tmp_path, child=False)
    assert [r["variant"] for r in rows] == [p.variant for p in peers.PEERS]
    assert all("not installed: pip install" in r["skipped"] and "time_us" not in r for r in rows)
    assert peers.fastest_dense_f32(rows) is None
    assert peers.fastest_dense_reduced(rows) is None


def test_fastest_dense_reduced_takes_only_timed_dense_rows_in_a_reduced_precision():
    def row(variant, precision, ms, passed=True):
        peer = peers.VARIANTS[variant]
        return {"variant": variant, "peer": {"runtime": peer.runtime, "source": peer.source, "precision": precision},
                **({"time_us": {"median": ms * 1e3}} if passed else {})}

    rows = [row("openvino_f32_dense", "f32", 1.0), row("openvino_default_masked", "bf16", 2.0),
            row("onnxruntime_dense", "f32", 0.5), row("openvino_default_dense", "bf16", 7.0)]
    assert peers.fastest_dense_reduced(rows) == ("openvino_default_dense", 7000.0)
    assert peers.fastest_dense_reduced(rows[:3]) is None  # f32 and the masked model's rows never count
    # a default precision that compiled to f32 (a CPU without bf16) is no reduced precision; a failed check no time
    assert peers.fastest_dense_reduced(rows[:3] + [row("openvino_default_dense", "f32", 7.0)]) is None
    assert peers.fastest_dense_reduced(rows[:3] + [row("openvino_default_dense", "bf16", 7.0, False)]) is None


def test_peers_match_torch_and_record_their_settings(models, tmp_path):
    for module in ("onnxruntime", "openvino", "onnx", "onnxscript"):
        pytest.importorskip(module)
    dense, masked = models
    x = torch.randn(2, 3, 16, 16)
    sources = peers.export_sources({"dense": dense, "masked": peers.bake_masks(masked, dense)},
                                   torch.randn(3, 3, 16, 16), tmp_path)  # another batch: the batch is dynamic
    assert all(isinstance(path, Path) for path in sources.values()), sources
    with torch.no_grad():
        expected = {"dense": dense(x), "masked": masked(x)}
    rows = peers.peer_rows(sources, x, expected, BASE, TIMER, tmp_path, dense_us=1000.0, child=False)
    assert {r["variant"] for r in rows} == set(peers.VARIANTS)
    for row in rows:
        assert row["check"]["passed"], row
        assert row["time_us"]["median"] > 0 and row["speedup_vs_dense"] > 0
        info = row["peer"]
        assert info["version"] and info["threads"] == 1 and info["source"] in ("dense", "masked")
        if row["variant"].startswith(("onnxruntime", "openvino_f32")):
            assert info["precision"] == "f32" and row["check"]["max_rel_err"] < 1e-4
        else:  # OpenVINO's own choice for this CPU: bf16 where it has AMX or AVX512-BF16
            assert info["precision"] in ("f32", "bf16", "f16")
            assert info["settings"]["compiled"]["INFERENCE_PRECISION_HINT"] == info["precision"]
    variant, _ = peers.fastest_dense_f32(rows)
    assert variant in ("onnxruntime_dense", "openvino_f32_dense")
