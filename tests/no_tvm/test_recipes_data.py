"""The training loop's checkpoints resume bit-exactly; data loaders and the zoo work on generated files."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from srigl_compile import CheckpointError, ConfigError, SRigLConfig
from srigl_compile.data import DataError, load_cifar, load_dataset, teacher_student
from srigl_compile.recipes import load_checkpoint, train_classifier
from srigl_compile.zoo import MODELS, build_model
from tests.helpers import Stop
from tests.helpers import run_recipe as run


def test_interrupted_run_resumes_bit_exactly(tmp_path):
    full = run(tmp_path, "full.pt")
    with pytest.raises(Stop):
        run(tmp_path, "cut.pt", stop_at=14)  # checkpoint at step 11, mid-epoch and inside a gradient window
    resumed = run(tmp_path, "cut.pt", resume=load_checkpoint(tmp_path / "cut.pt"))
    for (name, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert resumed.losses == full.losses and resumed.accuracy == full.accuracy


def test_bad_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a srigl_compile"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"format": "srigl_compile.train/1", "meta": {"method": "srigl"}, "model": {"w": torch.ones(1)}},
               tmp_path / "nomask.pt")
    with pytest.raises(CheckpointError, match="no masks"):
        load_checkpoint(tmp_path / "nomask.pt")


def write_cifar(folder, num_classes, n=20):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    batch = lambda: {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),  # noqa: E731
                     (b"labels" if num_classes == 10 else b"fine_labels"): list(rng.integers(0, num_classes, n))}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if num_classes == 10 else ["train", "test"]
    for name in names:
        with open(folder / name, "wb") as f:
            pickle.dump(batch(), f)


@pytest.mark.parametrize("num_classes, folder", [(10, "cifar-10-batches-py"), (100, "cifar-100-python")])
def test_cifar_loader_reads_the_python_pickle_format(tmp_path, num_classes, folder):
    write_cifar(tmp_path / folder, num_classes)
    data = load_cifar(tmp_path, num_classes)  # the parent folder works too
    train_batches = 5 if num_classes == 10 else 1
    assert data.x_train.shape == (20 * train_batches, 3, 32, 32) and data.x_test.shape == (20, 3, 32, 32)
    assert 0 <= data.x_train.min() and data.x_train.max() <= 1 and data.num_classes == num_classes
    assert data.y_train.dtype == torch.int64 and int(data.y_train.max()) < num_classes


def test_cifar_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_cifar(tmp_path / "nowhere")
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(DataError, match="missing CIFAR file"):
        load_cifar(tmp_path)
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("cifar10")
    with pytest.raises(DataError, match="unknown data set"):
        load_dataset("imagenet")


def test_teacher_labels_are_learnable_and_deterministic():
    a, b = teacher_student(n_train=256, n_test=64, seed=3), teacher_student(n_train=256, n_test=64, seed=3)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert len(a.y_train.unique()) > 3


@pytest.mark.parametrize("name", sorted(MODELS))
def test_zoo_models_run_on_cifar_shapes(name):
    model = build_model(name, (3, 32, 32), 10)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_imagenet_resnets_have_torchvision_s_parameter_counts():
    from srigl_compile.zoo import ResNet

    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert count(ResNet(blocks=(2, 2, 2, 2), basic=True)) == 11_689_512  # torchvision resnet18
    assert count(build_model("resnet34", (3, 224, 224), 1000)) == 21_797_672
    assert count(build_model("resnet50", (3, 224, 224), 1000)) == 25_557_032


def tiny_factory(input_shape, num_classes):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(np.prod(input_shape)), num_classes))


def not_a_model(input_shape, num_classes):
    return "model"


def test_factory_loading():
    model = build_model("tests.no_tvm.test_recipes_data:tiny_factory", (1, 8, 8), 10)
    assert model[1].in_features == 64 and model[1].out_features == 10
    with pytest.raises(ConfigError, match="not an nn.Module"):
        build_model("tests.no_tvm.test_recipes_data:not_a_model", (3,), 4)
    with pytest.raises(ConfigError, match="unknown model"):
        build_model("alexnet", (3, 32, 32), 10)
    with pytest.raises(ConfigError, match="cannot load"):
        build_model("no_such_module:f", (3, 32, 32), 10)


@pytest.mark.parametrize("checkpoint_every", [None, 1])
def test_a_non_finite_run_stops_without_a_checkpoint_of_it(tmp_path, checkpoint_every):
    """lr=nan: step 1 turns the weights to NaN. Checkpointing every step, the checkpoint of step 1 is refused;
    otherwise the loss of step 2 stops the run. Either way nothing non-finite is written."""
    from srigl_compile import TrainingError

    data = teacher_student(n_train=256, n_test=64, seed=1)
    torch.manual_seed(0)
    model = build_model("mlp", data.input_shape, data.num_classes)
    match = r"parameters \['1.weight'.* not finite at step 1" if checkpoint_every else \
        r"loss is nan at step 2 .*Lower the learning rate \(lr=nan\)"
    with pytest.raises(TrainingError, match=match):
        train_classifier(model, data, SRigLConfig(sparsity=0.9, delta_t=2), epochs=1, lr=float("nan"),
                         checkpoint_path=tmp_path / "run.pt", checkpoint_every=checkpoint_every)
    assert not (tmp_path / "run.pt").exists()


def test_a_checkpoint_is_written_under_a_name_of_its_own_first(tmp_path, monkeypatch):
    """Two runs writing one folder collided on a fixed checkpoint.tmp (a probe: one died with FileNotFoundError);
    the temporary name carries the process id, and nothing of it is left."""
    import os

    seen = []
    original = torch.save

    def spy(obj, path, *args, **kwargs):
        seen.append(Path(path).name)
        return original(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", spy)
    run(tmp_path, "run.pt")
    assert seen and all(name == f".run.pt.{os.getpid()}.tmp" for name in seen)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]


def test_image_models_and_data_folders_that_do_not_fit_the_data_are_named():
    """A probe found a convolution net on vector data failing at the first batch with torch's shape error, and a
    data folder given for a data set that reads none ignored."""
    with pytest.raises(ConfigError, match=r"model 'cnn' takes images .* shape \(32,\): choose image data"):
        build_model("cnn", (32,), 4)
    assert build_model("mlp", (32,), 4) is not None
    with pytest.raises(DataError, match="digits reads no folder"):
        load_dataset("digits", data_dir="/tmp")
