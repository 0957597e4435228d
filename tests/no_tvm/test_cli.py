"""The srigl-compile commands on tiny settings, the demo's report, and one-line errors for bad arguments."""

import dataclasses
import json
import shlex
import shutil
import statistics
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from srigl_compile.cli import main


@pytest.fixture
def runner():
    return CliRunner()


@pytest.mark.parametrize("command", ["demo", "train", "lower", "bench", "table"])
def test_every_command_has_help_with_an_example(runner, command):
    result = runner.invoke(main, [command, "--help"])
    assert result.exit_code == 0 and "Example: srigl-compile" in result.output


def test_the_executable_calls_itself_by_its_name_and_prints_warnings_as_lines(tmp_path):
    """It restarts as ``python -m srigl_compile`` (OMP_WAIT_POLICY must be set before torch loads), and its help
    and errors named that instead of what the user typed; its warnings showed click's source file and line."""
    import os
    import subprocess
    import sys

    executable = Path(sys.executable).parent / "srigl-compile"
    if not executable.exists():
        pytest.skip("the srigl-compile entry point is not installed beside this Python")
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    result = subprocess.run([str(executable), "train", "--bogus"], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "Try 'srigl-compile train --help'" in result.stderr
    result = subprocess.run([str(executable), "train", "--epochs", "1", "--batch-size", "256", "--out",
                             str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0
    assert "Warning: the masks will never be updated" in result.stderr and "click" not in result.stderr


@pytest.mark.parametrize("args, words", [
    (["train", "--sparsity", "1.5"], "sparsity"),
    (["train", "--model", "alexnet"], "unknown model"),
    (["train", "--data", "cifar10"], "--data-dir"),
    (["train", "--data", "cifar10", "--data-dir", "/no/such/folder"], "does not exist"),
    (["lower", "/no/such/checkpoint.pt", "--out", "x"], "does not exist"),
    (["demo", "--sparsity", "0"], "sparsity"),
    (["demo", "--models", "resnet"], "unknown model"),
    (["bench", "--batches", "one"], "comma-separated"),
    (["train", "--lr", "1e300"], "Invalid value for '--lr': 1e+300 is not in the range"),  # (a torch RuntimeError)
    (["bench", "--batches", "1,-1"], "every batch size must be >= 1"),
    # (bench has no --dense or --too-small: its error names its own flag and the value that works)
    (["bench", "--sparsity", "0.9999"], "Invalid value for --sparsity: 0.9999 leaves the 3072->768 layer no input "
                                        "per neuron (k would be 0): use at most 0.9996"),
    (["train", "--method", "dense", "--sparsity", "0.5", "--dense", "fc"],
     "--sparsity, --dense set how a sparse run sparsifies; --method dense trains every weight"),
    (["table", "--data", "imagenet"], "choose from"),
])
def test_bad_arguments_exit_non_zero_with_one_clear_line(runner, args, words):
    result = runner.invoke(main, args)
    assert result.exit_code != 0
    assert words in result.output
    assert "Traceback" not in result.output


def test_layers_too_small_for_k_are_named_with_the_flags_that_keep_them_dense(runner, tmp_path):
    args = ["train", "--epochs", "1", "--batch-size", "256"]
    result = runner.invoke(main, args + ["--sparsity", "0.99", "--out", str(tmp_path / "a")])
    assert result.exit_code != 0 and "k would be 0" in result.output and "Traceback" not in result.output
    assert "--dense 1" in result.output and "--too-small dense" in result.output
    for flags, field, value in ((["--sparsity", "0.99", "--too-small", "dense"], "too_small", "dense"),
                                (["--sparsity", "0.9", "--dense", "5"], "overrides", {"5": None})):
        out = tmp_path / field
        assert runner.invoke(main, args + flags + ["--out", str(out)]).exit_code == 0
        assert json.loads((out / "metrics.json").read_text())["config"][field] == value


def test_train_checkpoint_resume_and_lower(runner, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", "mlp", "--data", "digits", "--epochs", "2", "--delta-t", "5", "--out", str(out),
            "--checkpoint-every", "10"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy"] > 0.3 and metrics["stats"]["global"]["density"] < 0.15
    assert {key: metrics[key] for key in ("epochs", "batch_size", "lr", "seed")} == {  # (the run, to repeat it)
        "epochs": 2, "batch_size": 64, "lr": 0.05, "seed": 0}
    resumed = runner.invoke(main, args + ["--resume"])  # the finished run resumes to the same result
    assert resumed.exit_code == 0 and json.loads((out / "metrics.json").read_text())["accuracy"] == metrics["accuracy"]
    # Another run's settings: one clear line naming what differs, not a traceback.
    for changed, named in ((["--sparsity", "0.5"], "sparsity 0.9 (now 0.5)"), (["--model", "cnn"], "model 'mlp'"),
                           (["--epochs", "3"], "epochs 2 (now 3)")):
        other = runner.invoke(main, args + changed + ["--resume"])
        assert other.exit_code != 0 and named in other.output and "Traceback" not in other.output, other.output
    pytest.importorskip("tvm")
    lowered = runner.invoke(main, ["lower", str(out / "checkpoint.pt"), "--out", str(tmp_path / "lowered")])
    assert lowered.exit_code == 0, lowered.output
    assert (tmp_path / "lowered" / "manifest.json").exists()
    from srigl_compile import load_lowered
    from srigl_compile.cli.commands import model_from_checkpoint

    trained, meta = model_from_checkpoint(out / "checkpoint.pt")
    x = torch.randn(5, *meta["input_shape"])
    with torch.no_grad():
        torch.testing.assert_close(load_lowered(tmp_path / "lowered")(x), trained(x), rtol=1e-5, atol=1e-5)
    if shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists():  # CUDA builds need no GPU
        cuda = runner.invoke(main, ["lower", str(out / "checkpoint.pt"), "--target", "cuda:sm_90", "--dtype",
                                    "float16", "--out", str(tmp_path / "cuda")])
        assert cuda.exit_code == 0, cuda.output
        assert "(float16)" in cuda.output and list((tmp_path / "cuda" / "kernels").glob("*.fatbin"))


def test_damaged_checkpoints_are_named(runner, tmp_path):
    from srigl_compile.recipes import CHECKPOINT_FORMAT

    for checkpoint, words in (({"format": CHECKPOINT_FORMAT, "model": {}}, "damaged training checkpoint (no ['meta'])"),
                              ({"format": CHECKPOINT_FORMAT, "model": {"0.mask": torch.ones(1)}, "meta": {}},
                               "does not say how to rebuild its model (meta has no ['model', 'seed'")):
        torch.save(checkpoint, tmp_path / "checkpoint.pt")
        result = runner.invoke(main, ["lower", str(tmp_path / "checkpoint.pt"), "--out", str(tmp_path / "x")])
        assert result.exit_code == 1 and words in result.output and "Traceback" not in result.output, result.output


def test_lowering_a_dense_checkpoint_is_refused(runner, tmp_path):
    out = tmp_path / "dense"
    assert runner.invoke(main, ["train", "--method", "dense", "--epochs", "1", "--out", str(out)]).exit_code == 0
    result = runner.invoke(main, ["lower", str(out / "checkpoint.pt"), "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "dense run" in result.output


@pytest.mark.tvm
def test_demo_report_holds_what_it_claims(runner, tmp_path):
    from srigl_compile.cli.report import accuracy_series, neuron_series

    out = tmp_path / "demo"
    result = runner.invoke(main, ["demo", "--epochs", "1", "--models", "mlp", "--hidden", "64", "--delta-t", "10",
                                  "--out", str(out)])
    assert "Traceback" not in result.output, result.output
    for name in ("results.json", "summary.md", "accuracy.png", "loss.png", "layers.png", "latency.png"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert set(results["accuracy"]) == {"mlp/dense", "mlp/static", "mlp/rigl", "mlp/srigl"}
    assert all(0 <= v <= 1 for v in results["accuracy"].values())
    assert [r["batch"] for r in results["latency"]] == [1, 256]
    assert all(r["max_abs_error"] < 1e-4 and r["same_predictions"] for r in results["latency"])
    summary = (out / "summary.md").read_text()
    assert "mlp/srigl" in summary and "![latency.png](latency.png)" in summary
    # Accuracy over training: before training, then after each epoch, ending at the final accuracy.
    for run, (epochs, accuracy) in accuracy_series(results).items():
        assert epochs == [0, 1] and accuracy[-1] == results["accuracy"][run], run
    # gamma_sal 0.95 (the default) ablates neurons: the plotted active-neuron series is not constant, ablations are
    # counted, each layer's k grows as its budget goes to fewer neurons, and the output layer is never ablated.
    series = neuron_series(results, "mlp")
    assert series["1"]["steps"] == [0, 10, 20, 30, 40] and series["1"]["active"][0] == 64
    hidden = [series[layer] for layer in ("1", "3")]
    assert any(len(set(s["active"])) > 1 and sum(s["ablated"]) > 0 and max(s["k"]) > s["k"][0] for s in hidden)
    assert [set(series[layer]["active"]) for layer in set(series) - {"1", "3"}] == [{10}]  # the output layer
    for s in hidden:  # every count follows from the one before: active = before - newly ablated + revived
        assert all(b == a - ab + rv for a, b, ab, rv in zip(s["active"], s["active"][1:], s["ablated"][1:],
                                                            s["revived"][1:]))
    assert [t["met"] for t in results["targets"]] == [r["speedup"] >= 2 for r in results["latency"]] + [
        100 * (results["accuracy"]["mlp/dense"] - results["accuracy"]["mlp/srigl"]) <= 1.5]
    # A target not met fails the run, after the report (a probe saw NOT MET lines and exit status 0).
    missed = sum(not t["met"] for t in results["targets"])
    assert result.exit_code == (1 if missed else 0), result.output
    assert (f"{missed} of the demo's targets not met" in result.output) == bool(missed)
    assert "## Targets" in summary and results["args"]["data"] == "mnist"
    machine = results["machine"]  # what the timings depend on, and how to run them again
    assert {"cpu", "cores", "threads", "python", "torch", "tvm", "srigl_compile", "command", "date"} <= \
        machine.keys() and machine["tvm"] and machine["threads"] >= 1
    # The model as timed (each layer's path chosen by its first calls) was checked too, and says which ran dense.
    assert all(r["max_abs_error_as_timed"] < 1e-3 and isinstance(r["dense_path_layers"], dict)
               for r in results["latency"])
    for row in results["latency"]:  # each figure is the median of interleaved rounds, all of them kept
        assert {name: statistics.median(times) for name, times in row["rounds_us"].items()} == {
            name: row[name] for name in ("dense_us", "srigl_masked_us", "lowered_us", "lowered_graph_us")}
        assert row["graph_speedup"] == row["dense_us"] / row["lowered_graph_us"]
        assert {len(times) for times in row["rounds_us"].values()} == {3}


def test_table_on_tiny_settings(runner, tmp_path, monkeypatch):
    from srigl_compile.cli import table

    monkeypatch.setitem(table.SETTINGS, "digits", dataclasses.replace(table.SETTINGS["digits"], epochs=1, delta_t=5))
    result = runner.invoke(main, ["table", "--data", "digits", "--sparsities", "0.9", "--seeds", "2",
                                  "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "table.json").read_text())
    assert len(rows) == 2 + 5 * 2
    text = (tmp_path / "table.md").read_text()
    assert "SRigL w/ ablation" in text and "RigL: neurons with no inputs" in text and "±" in text
    environment = json.loads((tmp_path / "environment.json").read_text())  # (a probe: rows only, no provenance)
    assert {"cpu", "threads", "torch", "srigl_compile", "command", "date", "minutes"} <= environment.keys()
    # (the process's own command line, as a shell takes it again)
    assert shlex.split(environment["command"])[1:] == sys.argv[1:] and environment["minutes"] > 0


def test_table_states_whether_the_teacher_is_representable(runner, tmp_path, monkeypatch):
    from srigl_compile.cli import table
    from srigl_compile.data import teacher_student

    for name in ("teacher-representable", "teacher-unrepresentable"):
        monkeypatch.setitem(table.SETTINGS, name, dataclasses.replace(table.SETTINGS[name], epochs=2, delta_t=4))
    monkeypatch.setattr(table, "_load", lambda setting, seed: teacher_student(
        n_train=640, n_test=128, seed=seed, fan_in=setting.teacher_fan_in))  # the full 8192 samples take minutes
    result = runner.invoke(main, ["table", "--data", "teacher-representable,teacher-unrepresentable", "--seeds", "1",
                                  "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "table.md").read_text()
    # Student 32-128-10: ERK gives the first layer k = 4 / 2 / 1 at 80 / 90 / 95%; the teachers read 2 or 8 inputs.
    assert "| representable: teacher fan-in (0: 2 / 2: 2) <= student k in every layer? | yes | yes |" in text
    assert "| representable: teacher fan-in (0: 8 / 2: 8) <= student k in every layer? | no | no | no |" in text
    assert "| SRigL k per sparse layer (w/o ablation) | 0: 4 / 2: 49 | 0: 2 / 2: 24 |" in text
    rows = json.loads((tmp_path / "table.json").read_text())
    srigl = [r for r in rows if r["label"] == "SRigL w/ ablation"]
    assert len(srigl) == 5 and all(0 <= r["no_input_fraction"] < 1 for r in srigl)
    assert all(r["no_input_fraction"] == 0 for r in rows if r["label"] == "SRigL w/o ablation")


def test_an_output_folder_that_cannot_be_made_is_an_error_before_training(runner, tmp_path):
    """A probe found the whole run trained, then a traceback from the checkpoint's mkdir."""
    (tmp_path / "file").write_text("not a folder")
    result = runner.invoke(main, ["train", "--epochs", "50", "--out", str(tmp_path / "file" / "run")])
    assert result.exit_code == 2 and "--out" in result.output and "cannot create the output folder" in \
        result.output and "Traceback" not in result.output


def test_lower_checks_its_output_folder_before_compiling(runner, tmp_path, monkeypatch):
    """A probe found lower compiled every kernel (minutes) before its --out failed, with a traceback."""
    out = tmp_path / "run"
    assert runner.invoke(main, ["train", "--epochs", "1", "--batch-size", "256", "--out", str(out)]).exit_code == 0
    import srigl_compile.passes.lower as lower_pass

    monkeypatch.setattr(lower_pass, "lower", lambda *args, **kwargs: pytest.fail("compiled before checking --out"))
    (tmp_path / "file").write_text("not a folder")
    result = runner.invoke(main, ["lower", str(out / "checkpoint.pt"), "--out", str(tmp_path / "file" / "lowered")])
    assert result.exit_code == 2 and "--out" in result.output and "cannot create the output folder" in \
        result.output and "Traceback" not in result.output, result.output


def test_bench_accepts_the_largest_sparsity_it_names():
    from srigl_compile.cli.quick_bench import largest_sparsity

    assert largest_sparsity(0.9) is None and largest_sparsity(0.9996) is None
    assert largest_sparsity(0.9997) == largest_sparsity(0.99999) == 0.9996


@pytest.mark.parametrize("name", [":", ".zoo:mlp", "srigl_compile.zoo:"])
def test_malformed_model_factories_are_one_line_errors(runner, tmp_path, name):
    result = runner.invoke(main, ["train", "--epochs", "1", "--model", name, "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "cannot load model factory" in result.output and "Traceback" not in \
        result.output


def test_a_second_run_into_a_folder_holding_one_asks_to_resume_or_overwrite(runner, tmp_path):
    """A probe found a plain re-run replaced the checkpoint, leaving a model lowered from the old one beside it."""
    out = tmp_path / "run"
    args = ["train", "--epochs", "1", "--batch-size", "256", "--out", str(out)]
    assert runner.invoke(main, args).exit_code == 0
    first = (out / "checkpoint.pt").read_bytes()
    again = runner.invoke(main, args + ["--seed", "1"])
    assert again.exit_code == 2 and "already holds a run" in again.output and "--resume" in again.output and \
        "--overwrite" in again.output and "Traceback" not in again.output, again.output
    assert (out / "checkpoint.pt").read_bytes() == first  # refused before anything was written
    both = runner.invoke(main, args + ["--resume", "--overwrite"])
    assert both.exit_code == 2 and "choose one" in both.output
    assert runner.invoke(main, args + ["--seed", "1", "--overwrite"]).exit_code == 0
    assert (out / "checkpoint.pt").read_bytes() != first
