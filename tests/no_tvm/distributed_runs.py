"""Training runs executed on every rank of a 2-process gloo group (started by test_distributed.py).

Each run writes, per rank, a snapshot of the masks and parameters after every mask update; the test compares the
ranks' files itself, so the check does not rely on the updater's own checksum.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from srigl_compile import InvariantError, SRigLConfig, SRigLUpdater, sparse_layers, sparsify
from srigl_compile.nn.sharding import whole, whole_like
from srigl_compile.recipes import load_checkpoint
from srigl_compile.training.rank_sync import RankSync
from tests.helpers import Stop
from tests.helpers import run_recipe as recipes_run
from tests.models import SmallCNN

STEPS, DELTA_T = 10, 2  # T_end = 7: updates after steps 2, 4 and 6


class Transformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(12, 32)
        self.block = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.block(self.embed(x)).mean(dim=1))


MODELS = {"cnn": (SmallCNN, (3, 4, 4)), "transformer": (Transformer, (6, 12))}
OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Masks and whole parameters (gathered when FSDP2 shards them)."""
    masks = {f"{name}.mask": layer.mask.clone() for name, layer in sparse_layers(model)}
    return masks | {name: whole(p.detach()).clone() for name, p in model.named_parameters()}


def shard(model: nn.Module) -> nn.Module:
    """FSDP2 as a user applies it: each top-level child (a layer or a block) its own unit, then the root."""
    for child in model.children():
        if any(True for _ in child.parameters()):
            fully_shard(child)
    return fully_shard(model)


def config_of(method: str = "srigl", grad_accumulation_n: int = 1) -> SRigLConfig:
    return SRigLConfig(sparsity=0.8, distribution="uniform", delta_t=DELTA_T, method=method,
                       grad_accumulation_n=grad_accumulation_n, seed=0)


def sparse_model(model_kind: str, config: SRigLConfig) -> nn.Module:
    factory, input_shape = MODELS[model_kind]
    torch.manual_seed(0)  # the same initial model everywhere, as a user's script would build it
    return sparsify(factory(), config, example_inputs=(torch.randn(2, *input_shape),))


def build(model_kind: str, optimizer: str, wrap: str, *, method: str = "srigl", sync: bool | None = None,
          broadcast_buffers: bool = True, grad_accumulation_n: int = 1):
    config = config_of(method, grad_accumulation_n)
    sparse = sparse_model(model_kind, config)
    forward = DDP(sparse, broadcast_buffers=broadcast_buffers) if wrap == "ddp" else shard(sparse)
    opt = OPTIMIZERS[optimizer](forward.parameters())
    updater = SRigLUpdater(forward, opt, config, total_steps=STEPS, distributed=sync)
    return sparse, forward, opt, updater


def batch(model_kind: str, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Different data on every rank, the same on a resumed run."""
    data = torch.Generator().manual_seed(1000 * step + 10 * micro + dist.get_rank())
    return torch.randn(8, *MODELS[model_kind][1], generator=data), torch.randint(0, 5, (8,), generator=data)


def train(model_kind: str, optimizer: str, wrap: str = "ddp", *, micro_batches: int = 1, steps=range(STEPS),
          built=None, **options) -> list[dict]:
    sparse, forward, opt, updater = built or build(model_kind, optimizer, wrap, **options)
    snapshots = []
    for step in steps:
        opt.zero_grad()
        for micro in range(micro_batches):
            x, y = batch(model_kind, step, micro)
            last = micro == micro_batches - 1
            quiet = forward.no_sync() if wrap == "ddp" and not last else contextlib.nullcontext()
            if wrap == "fsdp":
                forward.set_requires_gradient_sync(last)
            with quiet:
                F.cross_entropy(forward(x), y).backward()
        opt.step()
        if updater.step():
            snapshots.append(snapshot(sparse))
    return snapshots


def fsdp_resumed(out: str) -> dict:
    """FSDP2, cut after step 5 (inside the window of the update after step 6 with grad_accumulation_n 2) and
    resumed from full state dicts (torch.distributed.checkpoint.state_dict) written by rank 0."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    kwargs = {"grad_accumulation_n": 2}
    full = train("cnn", "adam", "fsdp", **kwargs)
    sparse, forward, opt, updater = built = build("cnn", "adam", "fsdp", **kwargs)
    first = train("cnn", "adam", "fsdp", steps=range(5), built=built)
    model_state, optim_state = get_state_dict(forward, opt, options=options)
    checkpoint = {"model": model_state, "optimizer": optim_state, "updater": updater.state_dict()}
    if dist.get_rank() == 0:
        torch.save(checkpoint, Path(out) / "fsdp.pt")
    dist.barrier()
    saved = torch.load(Path(out) / "fsdp.pt", weights_only=False)
    _, forward, opt, updater = built = build("cnn", "adam", "fsdp", **kwargs)
    set_state_dict(forward, opt, model_state_dict=saved["model"], optim_state_dict=saved["optimizer"],
                   options=StateDictOptions(full_state_dict=True))
    updater.load_state_dict(saved["updater"])
    rest = train("cnn", "adam", "fsdp", steps=range(5, STEPS), built=built)
    return {"full": full, "resumed": first + rest, "window": sorted(saved["updater"]["grad_buffers"])}


def cross_layout_resumed(out: str) -> dict:
    """Checkpoints cut after step 5 (inside the window of the update after step 6, grad_accumulation_n 2) and
    resumed under the other wrapping (FSDP2's under DDP, DDP's under FSDP2), beside the uninterrupted run each
    continues; with the window each rank holds after the load, whole, and what it should hold."""
    options, kwargs, results = StateDictOptions(full_state_dict=True, cpu_offload=True), {"grad_accumulation_n": 2}, {}
    for saved_wrap, resumed_wrap in (("fsdp", "ddp"), ("ddp", "fsdp")):
        full = train("cnn", "adam", saved_wrap, **kwargs)
        built = build("cnn", "adam", saved_wrap, **kwargs)
        first = train("cnn", "adam", saved_wrap, steps=range(5), built=built)
        _, forward, opt, updater = built
        model_state, optim_state = get_state_dict(forward, opt, options=options)
        checkpoint = {"model": model_state, "optimizer": optim_state, "updater": updater.state_dict()}
        path = Path(out) / f"{saved_wrap}-then-{resumed_wrap}.pt"
        if dist.get_rank() == 0:
            torch.save(checkpoint, path)
        dist.barrier()
        loaded = torch.load(path, weights_only=False)  # (rank 0's: the others' full state dicts are empty)
        saved = loaded["updater"]
        built = build("cnn", "adam", resumed_wrap, **kwargs)
        _, forward, opt, updater = built
        set_state_dict(forward, opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
        updater.load_state_dict(saved)
        window = {name: whole_like(buf, updater.layers[name].weight).clone()
                  for name, buf in updater._tap.buffers.items()}
        if saved_wrap == "fsdp":
            expected = saved["grad_buffers"]  # (averaged over the ranks when saved)
        else:
            by_rank = saved["rank_grad_buffers"]
            expected = {name: sum(b[name] for b in by_rank) / len(by_rank) for name in by_rank[0]}
        rest = train("cnn", "adam", resumed_wrap, steps=range(5, STEPS), built=built)
        results[f"{saved_wrap} then {resumed_wrap}"] = {"full": full, "resumed": first + rest, "window": window,
                                                        "expected": expected}
    return results


def one_rank_fails_before_an_update() -> str:
    """A masked weight moved on rank 1 only: its own check fails before the update's collectives, and rank 0
    stops with it, naming it (it waited in the window's all-reduce until rank 1's process exited)."""
    sparse, forward, opt, updater = built = build("cnn", "sgd", "ddp")
    train("cnn", "sgd", steps=range(DELTA_T - 1), built=built)
    if dist.get_rank() == 1:
        with torch.no_grad():
            sparse.fc1.weight.view(-1)[(~sparse.fc1.mask).view(-1).nonzero()[0]] = 1.0
    try:
        train("cnn", "sgd", steps=range(DELTA_T - 1, DELTA_T), built=built)
    except InvariantError as err:
        return str(err)
    return "no error"


def tampered_mask_is_caught() -> str:
    """Flip one mask entry on rank 1 only: the next rank check must fail on every rank, naming the layer."""
    torch.manual_seed(0)
    config = SRigLConfig(sparsity=0.8, distribution="uniform", seed=0)
    sparse = sparsify(SmallCNN(), config, example_inputs=(torch.randn(2, 3, 4, 4),))
    updater = SRigLUpdater(DDP(sparse), torch.optim.SGD(sparse.parameters(), lr=0.1), config, total_steps=10)
    if dist.get_rank() == 1:
        with torch.no_grad():
            sparse.fc1.mask.view(-1)[0] ^= True
    try:
        updater._sync.check_same_masks(updater._masks(), updater.step_count)
    except InvariantError as err:
        return str(err)
    return "not caught"


def recipe(out: str, name: str, stop_at: int | None = None, resume: dict | None = None):
    """The reference training loop (test_recipes_data.run) under 2 ranks: DDP + DistributedSampler, 8 steps an
    epoch (512 samples / 2 ranks / batch 32), updates after steps 5, 10 and 15 (each scoring a 2-step window),
    checkpoints every 7 steps."""
    return recipes_run(Path(out), name, stop_at, resume, checkpoint_every=7, batch_size=32)


def resumed_run(out: str) -> dict:
    """An uninterrupted 2-rank run, and one cut at step 17 and resumed from its step-14 checkpoint (mid-epoch,
    inside the open gradient window of the update after step 15): both ranks' final models and losses."""
    full = recipe(out, "full.pt")
    try:
        recipe(out, "cut.pt", stop_at=17)
    except Stop:
        pass
    saved = load_checkpoint(Path(out) / "cut.pt")
    windows = [sorted(b) for b in saved["updater"]["rank_grad_buffers"]]
    resumed = recipe(out, "cut.pt", resume=saved)
    return {"full": full.model.state_dict(), "resumed": resumed.model.state_dict(), "full_losses": full.losses,
            "resumed_losses": resumed.losses, "steps": len(full.losses),
            "saved_windows": windows}


RUNS = {
    "cnn-sgd": lambda: train("cnn", "sgd"),
    "cnn-sgd-fsdp": lambda: train("cnn", "sgd", "fsdp"),
    "cnn-adam-fsdp-accumulation": lambda: train("cnn", "adam", "fsdp", micro_batches=2, grad_accumulation_n=2),
    "transformer-adam-fsdp": lambda: train("transformer", "adam", "fsdp"),
    "cnn-set-fsdp": lambda: train("cnn", "sgd", "fsdp", method="set"),
    "cnn-adam": lambda: train("cnn", "adam"),
    "transformer-sgd": lambda: train("transformer", "sgd"),
    "transformer-adam": lambda: train("transformer", "adam", broadcast_buffers=False),
    "cnn-set": lambda: train("cnn", "sgd", method="set"),
    "cnn-no-sync-accumulation": lambda: train("cnn", "sgd", micro_batches=2, grad_accumulation_n=2),
    "cnn-adam-accumulation": lambda: train("cnn", "adam", micro_batches=2, grad_accumulation_n=2),
    "cnn-unsynchronised": lambda: unsynchronised_run(),
    "one-rank-fails": one_rank_fails_before_an_update,
}


def unsynchronised_run() -> dict:
    """Ranks updating their masks each from its own gradient: the first update's masks (which differ), then the
    error of the next update (DDP's averaged gradients moved each rank's weights outside its own mask)."""
    built = build("cnn", "sgd", "ddp", sync=False)
    first = train("cnn", "sgd", steps=range(DELTA_T), built=built)
    try:  # (the update is the range's last call: every rank has made the same DDP steps, error or not)
        train("cnn", "sgd", steps=range(DELTA_T, 2 * DELTA_T), built=built)
    except InvariantError as err:
        return {"first": first, "error": str(err)}
    return {"first": first, "error": None}
# Runs that need a folder shared by the ranks.
FOLDER_RUNS = {"resume": resumed_run, "fsdp-resume": fsdp_resumed, "cross-layout": cross_layout_resumed}


def _catch(fn):
    try:
        result = fn()
    except InvariantError as err:
        return f"InvariantError: {err}"
    return result if result is not None else "no error"


def sync_checks() -> dict:
    """What the rank checks must catch, each scenario's error (or result) on this rank: a mutation probe found
    none of them tested (session 42)."""
    rank = dist.get_rank()
    sync = RankSync()
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(6, 8, generator=g) < 0.3, torch.rand(5, 8, generator=g) < 0.3
    out = {}

    first = {"a": a.clone(), "b": b.clone()}
    if rank == 1:
        first["a"].view(-1)[0] ^= True
    out["first_layer"] = _catch(lambda: sync.check_same_masks(first, 0))

    same = {"a": a, "b": b}
    out["steps_masks"] = _catch(lambda: sync.check_same_masks(same, 3 + rank))
    out["steps_ready"] = _catch(lambda: sync.check_ready(same, 3 + rank, False))
    out["rank0_failed"] = _catch(lambda: sync.check_ready(same, 5, rank == 0))

    buffers = {"x": torch.full((2, 3), float(rank + 1))} | ({"y": torch.full((4,), 4.0)} if rank == 0 else {})
    out["average"] = sync.average_gradients(buffers, {"x": torch.Size((2, 3)), "y": torch.Size((4,)),
                                                      "z": torch.Size((3,))})

    def model(seed):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 4))
        return sparsify(net, SRigLConfig(sparsity=0.7, distribution="uniform", seed=seed, delta_t=1, method="set"))

    config = SRigLConfig(sparsity=0.7, distribution="uniform", seed=0, delta_t=1, method="set")

    def diverging_update():
        net = model(0)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        updater = SRigLUpdater(net, opt, config, total_steps=10, distributed=True)
        if rank == 1:
            updater.generator.manual_seed(1234)  # (SET regrows at other random positions on this rank)
        x, y = torch.randn(8, 12, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 4
        F.cross_entropy(net(x), y).backward()
        opt.step()
        updater.step()

    out["diverging_update"] = _catch(diverging_update)

    def different_start():
        net = model(rank)  # (each rank sparsified with its own seed)
        SRigLUpdater(net, torch.optim.SGD(net.parameters(), lr=0.1), config, total_steps=10, distributed=True)

    out["different_start"] = _catch(different_start)
    return out


# Runs of the ranks' checks themselves (no training to compare).
CHECK_RUNS = {"sync-checks": sync_checks}


def worker(rank: int, world_size: int, out: str, runs: list[str]) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    # (a collective the ranks do not all reach fails after 2 minutes instead of hanging the suite)
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(minutes=2))
    try:
        results = {name: FOLDER_RUNS[name](out) if name in FOLDER_RUNS else {**RUNS, **CHECK_RUNS}[name]()
                   for name in runs}
        results["tampered"] = tampered_mask_is_caught()
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
