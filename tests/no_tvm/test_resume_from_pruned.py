"""Runs that start from a pruned model (ablated neurons, another k than sparsify's) checkpoint and resume: the
load checks a checkpoint's masks against where the run started (``training.run_start``), not sparsify's masks."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from srigl_compile import CheckpointError, SRigLConfig, SRigLUpdater, from_sparse_weights, prune


def pruned_model(config):
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    with torch.no_grad():
        dense[0].weight[:64] *= 0.01  # small neurons: prune's ablation removes them
    return prune(dense, config, "magnitude", ablation=True)


def train(model, config, steps, seed=1):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    updater = SRigLUpdater(model, optimizer, config, total_steps=100)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(torch.randn(32, 64, generator=generator)),
                        torch.randint(0, 10, (32,), generator=generator)).backward()
        optimizer.step()
        updater.step()
    return optimizer, updater


@pytest.mark.parametrize("method, ablation, steps", [
    ("static", True, 5), ("rigl", True, 25), ("set", True, 25), ("srigl", False, 5), ("srigl", False, 25),
    ("srigl", True, 25)], ids=["static", "rigl", "set", "srigl-no-ablation-before-update",
                               "srigl-no-ablation-after-update", "srigl"])
def test_a_pruned_runs_checkpoint_loads_back_into_a_rebuilt_run(method, ablation, steps):
    """A probe found every method but SRigL with ablation refused its own checkpoint as corrupt (static: "never
    ablates"; RigL/SET: "keeps the initial n_out x k0")."""
    config = SRigLConfig(sparsity=0.9, delta_t=20, method=method, ablation=ablation)
    model = pruned_model(config)
    assert int((model[0].mask.sum(1) == 0).sum()) > 0  # (the run starts with ablated neurons)
    _, updater = train(model, config, steps)
    state = updater.state_dict()
    assert state["start"]["0"][1] > 0
    updater.load_state_dict(copy.deepcopy(state))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the rebuilt updater takes the layers over from the first)
        _, rebuilt = train(pruned_model(config), config, 0)
    rebuilt.load_state_dict(copy.deepcopy(state))
    assert rebuilt.state_dict()["start"] == state["start"]
    for name in state["masks"]:
        assert torch.equal(rebuilt.layers[name].mask, state["masks"][name])


def test_a_run_from_sparse_weights_resumes_bit_for_bit():
    config = SRigLConfig(sparsity=0.9, delta_t=10, method="srigl", ablation=False)
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    with torch.no_grad():
        weight = dense[0].weight
        keep = weight.abs().topk(6, dim=1).indices
        weight.copy_(torch.zeros_like(weight).scatter(1, keep, weight.gather(1, keep)))
        weight[:20] = 0  # ablated neurons, k = 6 below sparsify's budget share
    model = from_sparse_weights(dense, config)
    reference = copy.deepcopy(model)
    optimizer, updater = train(model, config, 5)
    state = {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(optimizer.state_dict()),
             "updater": updater.state_dict()}
    optimizer_2, updater_2 = train(reference, config, 0)
    reference.load_state_dict(state["model"])
    optimizer_2.load_state_dict(state["optimizer"])
    updater_2.load_state_dict(state["updater"])
    generator_state = torch.Generator().manual_seed(1)
    for _ in range(5):  # (the inputs the first run drew next)
        torch.randn(32, 64, generator=generator_state), torch.randint(0, 10, (32,), generator=generator_state)
    for run_model, run_optimizer, run_updater in ((model, optimizer, updater), (reference, optimizer_2, updater_2)):
        generator = torch.Generator().set_state(generator_state.get_state())
        for _ in range(20):  # (over the first mask update, at step 10, and the next)
            run_optimizer.zero_grad()
            F.cross_entropy(run_model(torch.randn(32, 64, generator=generator)),
                            torch.randint(0, 10, (32,), generator=generator)).backward()
            run_optimizer.step()
            run_updater.step()
    for a, b in zip(model.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)


def test_a_static_run_from_a_pruned_model_still_refuses_masks_it_never_had():
    config = SRigLConfig(sparsity=0.9, delta_t=20, method="static")
    _, updater = train(pruned_model(config), config, 3)
    state = updater.state_dict()
    mask = state["masks"]["0"].clone()
    active = (mask.sum(1) > 0).nonzero().flatten()
    mask[active[0]] = False  # one more ablated neuron
    bad = {**state, "masks": {**state["masks"], "0": mask}}
    with pytest.raises(CheckpointError, match="static without ablation never ablates"):
        updater.load_state_dict(bad)


@pytest.mark.parametrize("start, match", [
    ({"0": [1, 2], "2": [860, 0, 86]}, "three ints"),
    ({"0": [960, 64, 5]}, "must map every sparse layer"),
    ({"0": [961, 64, 5], "2": [860, 0, 86]}, "not constant fan-in"),
    ({"0": [10**9, 0, 5], "2": [860, 0, 86]}, "does not fit the layer"),
])
def test_a_damaged_start_record_is_refused(start, match):
    config = SRigLConfig(sparsity=0.9, delta_t=20, method="static")
    _, updater = train(pruned_model(config), config, 3)
    state = updater.state_dict()
    assert state["start"] == {"0": [960, 64, 5], "2": [860, 0, 86]}
    with pytest.raises(CheckpointError, match=match):
        updater.load_state_dict({**state, "start": start})


def test_a_checkpoint_without_a_start_record_checks_against_sparsifys_masks():
    """Checkpoints written before the record: their runs started from sparsify's masks."""
    config = SRigLConfig(sparsity=0.9, delta_t=20, method="static")
    _, updater = train(pruned_model(config), config, 3)
    state = updater.state_dict()
    del state["start"]
    with pytest.raises(CheckpointError, match="static without ablation never ablates"):
        updater.load_state_dict(state)
