"""BatchNorm recalibration's dry run (``keep=False``, which ``prune`` runs on an in-place model before pruning
it) checks the calibration only: every BatchNorm buffer is left as it was. Failed on a mutant the rest of the
suite let through (mutation probe, session 44)."""

import torch
import torch.nn as nn

from srigl_compile.passes.calibration import recalibrate_batchnorm_


def test_a_dry_run_recalibration_leaves_every_batchnorm_buffer_as_it_was():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.BatchNorm1d(8))
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.num_batches_tracked.fill_(12)
    before = {name: buffer.clone() for name, buffer in net.named_buffers()}
    calibration = [torch.randn(8, 16) + 5, torch.randn(8, 16)]
    assert recalibrate_batchnorm_(net, calibration, keep=False) == 2
    for name, buffer in net.named_buffers():
        torch.testing.assert_close(buffer, before[name], rtol=0, atol=0, msg=name)
    assert net[1].momentum == 0.1 and net.training
    assert recalibrate_batchnorm_(net, calibration, keep=True) == 2  # (kept: the statistics are the inputs')
    with torch.no_grad():
        h = net[0](torch.cat(calibration))
    torch.testing.assert_close(net[1].running_mean, h.mean(0), rtol=1e-5, atol=1e-5)
