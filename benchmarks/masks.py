"""Constant-fan-in masks for the layer benchmark: uniform random (sparsify) or trained (a short SRigL run).

    python benchmarks/run.py --only layers         # runs it (layers.py drives this module)
    from masks import masked_layer
    model, info = masked_layer(spec, 0.9, "trained")     # nn.Sequential holding one masked layer, eval mode

"uniform": ``sparsify`` with the uniform distribution: every neuron gets k random inputs.
"trained": the layer, a ReLU and a 16-wide head (so the layer is not the output layer, which is never ablated)
are sparsified and trained with SRigL for ``TRAIN_STEPS`` steps on a teacher-student task (a dense random copy of
the same net labels Gaussian inputs), with a mask update every ``DELTA_T`` steps: the indices are those SRigL
picked by weight magnitude and gradient, and neurons may be ablated, as in a real run.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from layer_specs import LayerSpec

from srigl_compile import SRigLConfig, SRigLUpdater, sparsify

MASK_KINDS = ("uniform", "trained")
TRAIN_STEPS, DELTA_T = 40, 10  # mask updates at steps 10, 20, 30 (t_end_fraction 0.75)
HEAD = 16


def _student(spec: LayerSpec) -> nn.Sequential:
    head = nn.Conv2d(spec.n_out, HEAD, 1) if spec.is_conv else nn.Linear(spec.n_out, HEAD)
    return nn.Sequential(spec.make(), nn.ReLU(), head)


def _train(model: nn.Sequential, teacher: nn.Module, spec: LayerSpec, config: SRigLConfig, steps: int) -> dict:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    updater = SRigLUpdater(model, opt, config, total_steps=steps)
    generator = torch.Generator().manual_seed(config.seed + 7)
    batch = 8 if spec.is_conv else 64  # a conv step at batch 64 would take most of a second
    losses, updates = [], 0
    for _ in range(steps):
        x = spec.input(batch, generator)
        with torch.no_grad():
            target = teacher(x)
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        updates += int(updater.step())
        losses.append(loss.item())
    updater.close()
    return {"steps": steps, "mask_updates": updates, "loss_first": losses[0], "loss_last": losses[-1]}


def masked_layer(spec: LayerSpec, sparsity: float, kind: str, seed: int = 0,
                 steps: int = TRAIN_STEPS) -> tuple[nn.Sequential, dict]:
    """(nn.Sequential(masked layer) in eval mode, facts about the mask: kind, k, active neurons, training)."""
    torch.manual_seed(seed)
    config = SRigLConfig(sparsity=sparsity, distribution="uniform", seed=seed,
                         delta_t=min(DELTA_T, max(1, steps // 4)))
    if kind == "uniform":
        model = sparsify(nn.Sequential(spec.make()), config)
        info = {}
    elif kind == "trained":
        student = _student(spec)
        teacher = copy.deepcopy(student).eval()
        for p in teacher.parameters():  # a different random net, so there is something to learn
            nn.init.normal_(p, std=(2.0 / max(p[0].numel(), 1)) ** 0.5)
        model = sparsify(student, config)
        info = _train(model, teacher, spec, config, steps)
        model = nn.Sequential(model[0])
    else:
        raise ValueError(f"unknown mask kind {kind!r}; choose one of {MASK_KINDS}")
    layer = model[0]
    rows = layer.mask.reshape(layer.mask.shape[0], -1).sum(1)
    info.update(mask=kind, k=int(rows.max()), active=int((rows > 0).sum()), n_out=int(rows.numel()))
    return model.eval(), info
