"""load_lowered gives a model whose tensors are normal ones whether or not it is called under
``torch.inference_mode()`` (its parameters can be updated in place afterwards and the outputs follow), and
save_lowered saves a model holding a layer with no active neuron (no kernel of its own). Each test failed on a
mutant the rest of the suite let through (mutation probe, session 44)."""

import pytest
import torch
import torch.nn as nn

from srigl_compile import SRigLConfig, load_lowered, lower, save_lowered, sparsify
from tests.helpers import ablate

pytestmark = pytest.mark.tvm


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    masked = sparsify(nn.Sequential(nn.Linear(32, 48), nn.LayerNorm(48), nn.ReLU(), nn.Linear(48, 8)),
                      SRigLConfig(sparsity=0.8, seed=1)).eval()
    folder = save_lowered(lower(masked, progress=False), tmp_path_factory.mktemp("saved") / "model")
    return masked, folder


@pytest.mark.parametrize("inference_mode", [False, True])
def test_a_loaded_model_holds_no_inference_tensors_and_takes_in_place_updates(saved, inference_mode):
    masked, folder = saved
    with torch.inference_mode(inference_mode):
        loaded = load_lowered(folder)
    inference = [name for name, t in [*loaded.named_parameters(), *loaded.named_buffers()] if t.is_inference()]
    assert inference == []
    x = torch.randn(5, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), masked(x), rtol=1e-5, atol=1e-5)
        loaded[1].weight.mul_(2.0)  # (the norm's weight: a normal parameter, updated in place)
        loaded[1].bias.add_(0.5)
        want = nn.functional.layer_norm(masked[0](x), (48,), 2 * masked[1].weight, masked[1].bias + 0.5)
        torch.testing.assert_close(loaded[:2](x), want, rtol=1e-5, atol=1e-5)


def test_a_model_with_a_layer_whose_every_neuron_is_ablated_saves_and_loads(tmp_path):
    """A full-width layer (before a softmax) with every neuron ablated has no kernel (its outputs are its
    biases): it has no kernel to save, and the model saves, loads and computes the masked model's outputs."""
    torch.manual_seed(0)
    masked = sparsify(nn.Sequential(nn.Linear(16, 12), nn.Softmax(-1), nn.Linear(12, 24), nn.ReLU(),
                                    nn.Linear(24, 4)), SRigLConfig(sparsity=0.5, distribution="uniform", seed=1)).eval()
    ablate(masked, {"2": list(range(24))}, {("2", 3): 0.5, ("2", 7): -0.2})
    lowered = lower(masked, progress=False)
    assert lowered[2].n_active == 0 and lowered[0].n_active and lowered[4].n_active
    loaded = load_lowered(save_lowered(lowered, tmp_path / "model"))
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), masked(x), rtol=1e-5, atol=1e-5)
