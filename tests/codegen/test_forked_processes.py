"""Lowered models in processes forked after their kernels ran (DataLoader workers, pre-forking servers): TVM's
thread pool does not survive fork, and the child's first parallel kernel used to spin forever."""

import multiprocessing
import os

import pytest
import torch

from srigl_compile import cpu_graph

pytestmark = pytest.mark.tvm


def _child(model, x, graphed, pipe):
    torch.set_num_threads(1)  # (as DataLoader workers do: torch's own pool is not ours to fix)
    with torch.no_grad():
        pipe.send([y.numpy() for y in (model(x), graphed(x), graphed(x))])  # (by value: the child exits)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork only")
def test_a_child_forked_after_the_kernels_ran_computes_the_same_outputs(lowered_mlp):
    _, model = lowered_mlp
    x = torch.randn(64, 32)
    graphed = cpu_graph(model)
    with torch.no_grad():
        want = model(x)  # (the parent's pool runs: two threads)
        torch.testing.assert_close(graphed(x), want, rtol=0, atol=0)
    receive, send = multiprocessing.Pipe(duplex=False)
    child = multiprocessing.get_context("fork").Process(target=_child, args=(model, x, graphed, send))
    child.start()
    child.join(timeout=120)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child did not finish in 120 s (TVM's pool waiting for workers fork did not copy)")
    assert child.exitcode == 0
    results = receive.recv()
    assert len(results) == 3
    for got in results:
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=0, atol=0)
