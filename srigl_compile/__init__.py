"""srigl_compile: train any PyTorch model sparse with SRigL, then compile it into fast condensed kernels.

Public API (``import srigl_compile`` never imports TVM nor touches CUDA):

    sparsify(model, config)                  -> model with masked constant-fan-in layers
    prune(model, config, "magnitude"|"wanda", calibration) -> the same, masks from a trained model's weights
    from_sparse_weights(model)               -> masks where an already-pruned model's weights are non-zero
    unsparsify(model)                        -> a sparse model as the plain torch modules it was made of
    SRigLUpdater(model, optimizer, config, total_steps).step()   after every optimizer.step()
    sparse_layers(model)                     -> (name, layer) pairs
    condense(model)                          -> sparse layers as values/indices [n_active, k], ablated removed
    fold_batchnorm(model)                    -> eval BatchNorms folded into the Linear/Conv before them
    lower(model, target="llvm")              -> condensed layers running TVM-compiled kernels
    cpu_graph(model)                         -> the model's forward recorded per input signature, then replayed
    release_scratch()                        frees this thread's reused kernel buffers (after a huge batch)
"""

from .runtime.scratch import release_scratch
from .config import Distribution, Method, SRigLConfig
from .errors import (
    CheckpointError,
    ConfigError,
    DeviceError,
    InferenceOnlyError,
    InvariantError,
    LayerError,
    LoweringError,
    ReplayError,
    SRigLError,
    TraceError,
    TrainingError,
    UnsupportedTargetError,
)
from .nn.cpu_graph import cpu_graph
from .passes.condense import condense
from .passes.fold_batchnorm import fold_batchnorm
from .passes.lower import lower
from .passes.prune import from_sparse_weights, prune
from .passes.sparsify import sparse_layers, sparsify
from .passes.unsparsify import unsparsify
from .serialization import load_lowered, save_lowered
from .training.updater import SRigLUpdater

__version__ = "0.1.0"

__all__ = [
    "SRigLConfig",
    "Distribution",
    "Method",
    "sparsify",
    "prune",
    "from_sparse_weights",
    "unsparsify",
    "sparse_layers",
    "SRigLUpdater",
    "condense",
    "fold_batchnorm",
    "lower",
    "cpu_graph",
    "save_lowered",
    "load_lowered",
    "release_scratch",
    "SRigLError",
    "ConfigError",
    "LayerError",
    "TraceError",
    "InvariantError",
    "CheckpointError",
    "TrainingError",
    "UnsupportedTargetError",
    "LoweringError",
    "InferenceOnlyError",
    "DeviceError",
    "ReplayError",
]
