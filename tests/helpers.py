"""Helpers every test tier shares: comparing a model's outputs with a reference, and BatchNorm statistics that
are not the identity (so that folding or dropping them is visible in the outputs)."""

from __future__ import annotations

import torch
import torch.nn as nn


def assert_same(model: nn.Module, reference: nn.Module, *inputs, tol: float | dict = 1e-5) -> None:
    """``model(*inputs)`` equals ``reference(*inputs)`` within ``tol`` (rtol = atol = tol, or a dict of both), both
    in eval mode and without gradients."""
    tolerances = tol if isinstance(tol, dict) else {"rtol": tol, "atol": tol}
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(*inputs), reference.eval()(*inputs), **tolerances)


def randomize_bn(model: nn.Module) -> nn.Module:
    """Random running statistics and affine parameters in every BatchNorm of ``model`` (in place)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-1, 1)
    return model
