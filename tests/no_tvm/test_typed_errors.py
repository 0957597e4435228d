"""Bad input is a typed error naming the option, path or key, never a traceback (no TVM needed here).

The lowering errors (targets, lowered layers, save_lowered) are in tests/codegen/test_typed_errors_lowered.py.
"""

import pytest
from click.testing import CliRunner

from srigl_compile import CheckpointError, ConfigError, load_lowered
from srigl_compile.cli import main
from srigl_compile.zoo import build_model


@pytest.mark.parametrize("option, value", [
    ("--batch-size", "0"), ("--batch-size", "-5"), ("--epochs", "0"), ("--checkpoint-every", "-1"),
    ("--lr", "nan"), ("--lr", "-1"), ("--lr", "inf"), ("--lr", "0"), ("--delta-t", "0"),
    ("--grad-accumulation-n", "0"), ("--sparsity", "0"), ("--sparsity", "1"), ("--sparsity", "nan"),
    ("--alpha", "0"), ("--t-end-fraction", "1.5"), ("--gamma-sal", "-1"), ("--seed", "-1"),
])
def test_train_numeric_options_are_usage_errors_naming_the_option(option, value):
    result = CliRunner().invoke(main, ["train", option, value, "--out", "unused"])
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}'" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("args, option", [
    (["demo", "--epochs", "0"], "--epochs"), (["demo", "--sparsity", "inf"], "--sparsity"),
    (["bench", "--threads", "0"], "--threads"), (["bench", "--sparsity", "-0.5"], "--sparsity"),
])
def test_other_commands_check_their_numeric_options_too(args, option):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output, result.output


def test_checkpoint_every_0_still_means_only_at_the_end():
    context = main.commands["train"].make_context("train", ["--checkpoint-every", "0", "--lr", "1e-3"])
    assert context.params["checkpoint_every"] == 0 and context.params["lr"] == 1e-3


@pytest.mark.parametrize("factory, words", [
    ("os:getcwd", "os:getcwd(input_shape, num_classes) failed"),
    ("os:sep", "os:sep is a str, not a function"),
])
def test_a_model_factory_of_the_wrong_kind_is_a_config_error(factory, words, tmp_path):
    with pytest.raises(ConfigError, match="factory is called as factory\\(input_shape, num_classes\\)") as info:
        build_model(factory, (1, 8, 8), 10)
    assert words in str(info.value)
    result = CliRunner().invoke(main, ["train", "--model", factory, "--out", str(tmp_path)])
    assert result.exit_code == 1 and words in result.output and "Traceback" not in result.output


def test_load_lowered_of_a_file_names_it(tmp_path):
    file = tmp_path / "model.pt"
    file.write_bytes(b"not a folder")
    for path in (file, file / "inside"):
        with pytest.raises(CheckpointError, match=f"{file} is a file, not a folder: load_lowered reads"):
            load_lowered(path)
