"""Model rewrites with stated contracts (see each module's docstring): sparsify, and later condense/shrink."""

from .base import Pass, PassResult
from .sparsify import SparsifyPass, sparse_layers, sparsify

__all__ = ["Pass", "PassResult", "SparsifyPass", "sparse_layers", "sparsify"]
