"""Data-parallel training on 2 CPU ranks (gloo): identical masks and weights on every rank after every update."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from . import ddp_runs

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

RUNS = list(ddp_runs.RUNS)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.start_processes(ddp_runs.worker, args=(2, str(out), RUNS), nprocs=2, join=True, start_method="spawn")
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys()
    return [name for name in a if not torch.equal(a[name], b[name])]


@pytest.mark.parametrize("run", [name for name in RUNS if name != "cnn-unsynchronised"])
def test_masks_and_weights_are_identical_on_every_rank_after_every_update(ranks, run):
    first, second = ranks[0][run], ranks[1][run]
    assert len(first) == len(second) == 3
    for update, (a, b) in enumerate(zip(first, second)):
        assert not differing(a, b), f"update {update + 1}: ranks differ in {differing(a, b)}"
    # the masks did move: an updater that never changed anything would pass the check above trivially
    masks = [name for name in first[0] if name.endswith(".mask")]
    assert any(not torch.equal(first[0][m], first[-1][m]) for m in masks)


def test_without_synchronisation_the_ranks_diverge(ranks):
    """The control: each rank regrowing from its own local gradient gives different masks (the bug this fixes)."""
    first, second = ranks[0]["cnn-unsynchronised"], ranks[1]["cnn-unsynchronised"]
    assert any(name.endswith(".mask") for name in differing(first[0], second[0]))


def test_a_mask_that_differs_on_one_rank_fails_on_every_rank_naming_the_layer(ranks):
    for rank in ranks:
        assert "'fc1'" in rank["tampered"] and "differs between ranks" in rank["tampered"]
