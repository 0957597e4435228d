"""ONNX Runtime and OpenVINO beside torch in the model benchmark: the dense runtimes a user could pick instead.

    pip install -e '.[peers]'
    python benchmarks/run.py --only models --peers [--models resnet50 --model-inputs 1x224]

Each model is exported to ONNX once per input resolution (``torch.onnx.export(..., dynamo=True)``, batch
dynamic), twice: the dense model, and the masked model as a plain dense copy whose weights hold the masks' zeros
(``bake_masks``; a dense runtime does not know the zeros are there). Each runtime is timed in a fresh process per
variant (as the dense torch models are under other thread settings), with the torch threads of the run
(``TimerConfig.threads``) and ``common.measure``'s warm-up and median:

- ONNX Runtime (CPU execution provider): ``intra_op_num_threads`` = threads, ``inter_op_num_threads`` = 1,
  sequential execution, all graph optimisations, the batch dimension fixed to the batch timed;
- OpenVINO (CPU plugin), the model reshaped to the batch timed, ``PERFORMANCE_HINT`` LATENCY,
  ``INFERENCE_NUM_THREADS`` = threads, in two precisions: ``f32`` (``INFERENCE_PRECISION_HINT`` f32) and the
  plugin's default, which is bf16 on CPUs with AMX or AVX512-BF16; the precision it compiled to is recorded.

Every output is compared with torch's output of the same model (dense or masked) before it is timed: f32 within
``F32_MAX_REL_ERR`` of the largest output, a reduced precision within ``REDUCED_MAX_REL_ERR``; both errors are in the
row. A runtime that is not installed gives rows saying so (``skipped``), not an error.

The dynamo exporter stores every weight. The TorchScript exporter (``dynamo=False``) would not: the zoo's dense
ViT has 12 identical encoder layers (``nn.TransformerEncoder`` deep-copies one layer), and that exporter stores
identical weights once (35 MB instead of 347 for ViT-B/16), a cache advantage the torch models do not get.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib.util
import io
import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from common import TimerConfig, measure
from torch import nn

INSTALL = "pip install -e '.[peers]'"
EXPORTER = ("onnx", "onnxscript")  # what torch.onnx.export(dynamo=True) needs
F32_MAX_REL_ERR = 1e-3
REDUCED_MAX_REL_ERR = 5e-2  # bf16 keeps 8 bits of mantissa; ViT-B's 12 layers add up to ~1e-2


@dataclasses.dataclass(frozen=True)
class Peer:
    runtime: str  # "onnxruntime" | "openvino"
    precision: str  # "f32" | "default" (OpenVINO's own choice for the CPU)
    source: str  # "dense" | "masked"

    @property
    def variant(self) -> str:
        precision = "" if self.runtime == "onnxruntime" else f"_{self.precision}"
        return f"{self.runtime}{precision}_{self.source}"


PEERS = tuple(Peer(runtime, precision, source)
              for runtime, precision in (("onnxruntime", "f32"), ("openvino", "f32"), ("openvino", "default"))
              for source in ("dense", "masked"))
VARIANTS = {peer.variant: peer for peer in PEERS}


def missing(*modules: str) -> str | None:
    """A note naming what is not installed (and how to install it), or None."""
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    return f"{', '.join(absent)} not installed: {INSTALL}" if absent else None


def bake_masks(masked: nn.Module, dense: nn.Module) -> nn.Module:
    """A copy of ``dense`` (same architecture, plain modules) holding ``masked``'s weights times their masks: the
    masked model as a dense runtime sees it. nn.MultiheadAttention's packed projection goes back to
    ``in_proj_weight``."""
    state = masked.state_dict()
    baked = {}
    for name, tensor in state.items():
        if name.endswith(".mask"):
            continue
        mask = state.get(name.removesuffix("weight") + "mask") if name.endswith(".weight") else None
        value = tensor * mask if mask is not None else tensor
        for packed in ("in_proj", "q_proj", "k_proj", "v_proj"):  # MaskedMultiheadAttention's children
            if name.endswith(f".{packed}.weight") and name.replace(f".{packed}.weight", f".{packed}_weight") in \
                    dense.state_dict():
                name = name.replace(f".{packed}.weight", f".{packed}_weight")
        baked[name] = value
    model = copy.deepcopy(dense)
    model.load_state_dict(baked, strict=True)
    return model.eval()


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """``model`` as ONNX at ``path``, its batch dimension dynamic ("batch"), its weights inside the file."""
    batch = torch.export.Dim("batch")
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")  # "torchvision not installed"
    level = registration.level
    registration.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model.eval(), (example,), str(path), dynamo=True, dynamic_shapes=({0: batch},),
                              input_names=["x"], output_names=["y"], external_data=False)
        finally:
            registration.setLevel(level)
    return path


def export_sources(models: dict[str, nn.Module], example: torch.Tensor, folder: Path) -> dict[str, Path | str]:
    """{source: ONNX path, or why there is none} for each of ``models`` ("dense", "masked")."""
    note = missing(*EXPORTER)
    out: dict[str, Path | str] = {}
    for source, model in models.items():
        if note:
            out[source] = f"ONNX export needs {note}"
            continue
        try:
            out[source] = export_onnx(model, example, folder / f"{source}.onnx")
        except Exception as err:  # noqa: BLE001 (an optional baseline: say why, keep the benchmark going)
            out[source] = f"ONNX export failed: {type(err).__name__}: {str(err)[:300]}"
    return out


def relative_errors(out: np.ndarray, expected: np.ndarray) -> dict[str, float]:
    diff = float(np.abs(out.astype(np.float64) - expected.astype(np.float64)).max())
    return {"max_abs_err": diff, "max_rel_err": diff / max(float(np.abs(expected).max()), 1e-12)}


def _onnxruntime_runner(path: Path, batch: int, threads: int, precision: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_free_dimension_override_by_name("batch", batch)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    settings = {"intra_op_num_threads": threads, "inter_op_num_threads": 1, "execution_mode": "sequential",
                "graph_optimization_level": "all", "providers": session.get_providers()}
    return (lambda x: session.run(None, {name: x})[0]), {"version": ort.__version__, "precision": "f32",
                                                          "settings": settings}


def _openvino_runner(path: Path, batch: int, threads: int, precision: str):
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    shape = list(model.input(0).get_partial_shape().get_min_shape())
    model.reshape({0: [batch] + shape[1:]})
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
    if precision != "default":
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    used = {key: str(compiled.get_property(key))
            for key in ("INFERENCE_NUM_THREADS", "NUM_STREAMS", "PERFORMANCE_HINT")}
    used["INFERENCE_PRECISION_HINT"] = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    return (lambda x: request.infer([x])[0]), {"version": ov.__version__.split("-")[0], "build": ov.get_version(),
                                               "precision": used["INFERENCE_PRECISION_HINT"],
                                               "settings": {"asked": config, "compiled": used}}


RUNNERS = {"onnxruntime": _onnxruntime_runner, "openvino": _openvino_runner}


def time_peer(peer: Peer, path: Path, x: np.ndarray, expected: np.ndarray, config: TimerConfig) -> dict:
    """One peer variant in this process: its output checked against torch's, then timed. Returns the row's peer
    fields (``peer``, ``check``, ``time_us`` when the check passed)."""
    run, info = RUNNERS[peer.runtime](path, x.shape[0], config.threads, peer.precision)
    errors = relative_errors(np.asarray(run(x)), expected)
    tolerance = F32_MAX_REL_ERR if info["precision"] == "f32" else REDUCED_MAX_REL_ERR
    row = {"peer": {"runtime": peer.runtime, "source": peer.source, "threads": config.threads, **info},
           "check": {"passed": errors["max_rel_err"] < tolerance, "vs": f"torch {peer.source}",
                     "tolerance_rel": tolerance, **errors}}
    if row["check"]["passed"]:
        row["time_us"] = measure(lambda: run(x), config)
    return row


def time_peer_in_child(peer: Peer, path: Path, x: np.ndarray, expected: np.ndarray, config: TimerConfig,
                       folder: Path) -> dict:
    """``time_peer`` in a fresh process (its thread pool alone with the cores, as the dense children are)."""
    np.save(folder / "x.npy", x)
    np.save(folder / f"expected_{peer.source}.npy", expected)
    job = {"variant": peer.variant, "onnx": str(path), "x": str(folder / "x.npy"),
           "expected": str(folder / f"expected_{peer.source}.npy"), "config": dataclasses.asdict(config)}
    command = [sys.executable, str(Path(__file__).resolve()), "--peer-child", json.dumps(job)]
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        return {"skipped": f"{peer.variant} failed (exit {done.returncode}): {done.stderr.strip()[-400:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def peer_rows(sources: dict[str, Path | str], x: torch.Tensor, expected: dict[str, torch.Tensor], base: dict,
              config: TimerConfig, folder: Path, dense_us: float | None = None, child: bool = True) -> list[dict]:
    """A row per peer variant: timed and checked, or ``skipped`` with the reason (not installed, export failed).
    ``dense_us``: torch dense eager's median in this run, for ``speedup_vs_dense``."""
    rows = []
    installed = {runtime: missing(runtime) for runtime in RUNNERS}
    for peer in PEERS:
        row = {**base, "variant": peer.variant}
        source = sources.get(peer.source, "not exported")
        if installed[peer.runtime]:
            row["skipped"] = installed[peer.runtime]
        elif not isinstance(source, Path):
            row["skipped"] = source
        else:
            args = (peer, source, x.numpy(), expected[peer.source].numpy(), config)
            row.update(time_peer_in_child(*args, folder) if child else time_peer(*args))
        if "time_us" in row and dense_us:
            row["speedup_vs_dense"] = dense_us / row["time_us"]["median"]
        rows.append(row)
    return rows


def fastest_dense_f32(rows: list[dict]) -> tuple[str, float] | None:
    """(variant, median us) of the fastest dense f32 runtime among ``rows``: torch's dense variants (every thread
    setting, BN folded or not) and the peers' f32 rows on the dense model that passed their check."""
    times = {r["variant"]: r["time_us"]["median"] for r in rows if "time_us" in r and (
        r["variant"].startswith("dense") or (r["variant"] in VARIANTS and r["peer"]["source"] == "dense"
                                             and r["peer"]["precision"] == "f32"))}
    return min(times.items(), key=lambda item: item[1]) if times else None


def fastest_dense_reduced(rows: list[dict]) -> tuple[str, float] | None:
    """(variant, median us) of the fastest peer row on the dense model in a reduced precision (OpenVINO's default
    where it compiled to bf16 or f16) that passed its check; None when there is none."""
    times = {r["variant"]: r["time_us"]["median"] for r in rows if "time_us" in r and r["variant"] in VARIANTS
             and r["peer"]["source"] == "dense" and r["peer"]["precision"] != "f32"}
    return min(times.items(), key=lambda item: item[1]) if times else None


def _child(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peer-child", required=True, help="JSON: variant, onnx, x, expected, config")
    job = json.loads(parser.parse_args(argv).peer_child)
    config = TimerConfig(**job["config"])
    torch.set_num_threads(config.threads)
    row = time_peer(VARIANTS[job["variant"]], Path(job["onnx"]), np.load(job["x"]), np.load(job["expected"]), config)
    print(json.dumps(row))


if __name__ == "__main__":
    _child(sys.argv[1:])
