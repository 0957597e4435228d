"""What train, lower and bench do with their options: the seed reaching the split and the masks, a resume with another
seed, metrics.json's final loss, --no-ablation, sparse-only options with --method dense, lower's correctness check
and its maximum, bench's batches and its ratio; the environment's thread count. Each test failed on a mutant the
rest of the suite let through (mutation probe, session 43)."""

import json

import pytest
import torch
from click.testing import CliRunner

from srigl_compile.cli import main

TINY = ["train", "--epochs", "1", "--batch-size", "256"]


@pytest.fixture
def runner():
    return CliRunner()


def test_resume_with_another_seed_is_refused(runner, tmp_path):
    """--resume compared epochs, batch size and lr, but not the seed. (A sparse run's config holds the seed
    too; a dense run has no config, so only the top-level seed comparison catches it.)"""
    out = tmp_path / "run"
    dense = TINY + ["--method", "dense"]
    assert runner.invoke(main, dense + ["--out", str(out)]).exit_code == 0
    other = runner.invoke(main, dense + ["--out", str(out), "--resume", "--seed", "1"])
    assert other.exit_code != 0 and "seed 0 (now 1)" in other.output and "Traceback" not in other.output


def test_seed_reaches_the_split_and_the_masks(runner, tmp_path, monkeypatch):
    """--seed 1 must split the data and draw the masks by seed 1."""
    import srigl_compile.cli.commands as commands

    seen = []
    real = commands.load_dataset
    monkeypatch.setattr(commands, "load_dataset", lambda *a, **k: seen.append(k.get("seed")) or real(*a, **k))
    out = tmp_path / "run"
    assert runner.invoke(main, TINY + ["--seed", "1", "--out", str(out)]).exit_code == 0
    assert seen == [1]
    assert json.loads((out / "metrics.json").read_text())["config"]["seed"] == 1


def test_metrics_final_loss_is_the_last_step_s(runner, tmp_path, monkeypatch):
    """Metrics.json's final_loss is the loss of the last step."""
    import srigl_compile.recipes as recipes

    results = []
    real = recipes.train_classifier
    monkeypatch.setattr(recipes, "train_classifier", lambda *a, **k: results.append(real(*a, **k)) or results[-1])
    out = tmp_path / "run"
    assert runner.invoke(main, TINY + ["--out", str(out)]).exit_code == 0
    losses = results[0].losses
    assert len(losses) > 1 and losses[0] != losses[-1]
    assert json.loads((out / "metrics.json").read_text())["final_loss"] == losses[-1]


def test_no_ablation_turns_ablation_off(runner, tmp_path):
    """--no-ablation trains without ablation; the default trains with it."""
    for flags, expected in (([], True), (["--no-ablation"], False)):
        out = tmp_path / str(expected)
        assert runner.invoke(main, TINY + flags + ["--out", str(out)]).exit_code == 0
        assert json.loads((out / "metrics.json").read_text())["config"]["ablation"] is expected


@pytest.mark.parametrize("flags", [["--sparsity", "0.5"], ["--no-ablation"], ["--delta-t", "5"]])
def test_one_sparse_option_with_method_dense_is_a_usage_error(runner, tmp_path, flags):
    """A single sparse-only option with --method dense was silently ignored (the old test passed two)."""
    result = runner.invoke(main, ["train", "--method", "dense", *flags, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and f"{flags[0]} set how a sparse run sparsifies" in result.output


def test_lower_reports_the_largest_difference_it_checked(runner, tmp_path, monkeypatch):
    """Lower on llvm checks the lowered model and reports max |lowered - trained| (not skipped, not the
    minimum). The compiler is replaced by the trained model plus a known offset per output."""
    import srigl_compile.passes.lower as lower_pass
    import srigl_compile.serialization as serialization

    class Offset(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model
            self.register_buffer("offset", torch.arange(10.0) * 0.1)

        def forward(self, x):
            return self.model(x) + self.offset

    out = tmp_path / "run"
    assert runner.invoke(main, TINY + ["--out", str(out)]).exit_code == 0
    monkeypatch.setattr(lower_pass, "lower", lambda model, **kwargs: Offset(model))
    monkeypatch.setattr(serialization, "save_lowered", lambda model, folder: None)
    result = runner.invoke(main, ["lower", str(out / "checkpoint.pt"), "--out", str(tmp_path / "lowered")])
    assert result.exit_code == 0, result.output
    assert "max |lowered - trained| = 9.00e-01" in result.output


def test_bench_refuses_a_batch_of_zero(runner):
    """Batch 0 passed the >= 1 check."""
    result = runner.invoke(main, ["bench", "--batches", "0,1"])
    assert result.exit_code == 2 and "every batch size must be >= 1" in result.output


def test_quick_bench_ratio_is_dense_over_lowered(monkeypatch):
    """The 'x dense' column is dense time over lowered time."""
    from srigl_compile.cli import quick_bench

    times = iter([100.0, 50.0, 25.0])  # dense, csr, lowered
    monkeypatch.setattr(quick_bench, "lower", lambda model, **kwargs: model)
    monkeypatch.setattr(quick_bench, "median_us", lambda fn, threads=2, min_run_time=0.3: next(times))
    lines = list(quick_bench.run_quick_bench(0.9, [1], 1))
    assert lines[-1].split() == ["1", "100.0", "50.0", "25.0", "4.00x"]


def test_environment_threads_are_torch_s():
    """Threads is what torch runs with, not the machine's cores."""
    from srigl_compile.environment import environment

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert environment()["threads"] == 1
    finally:
        torch.set_num_threads(before)
