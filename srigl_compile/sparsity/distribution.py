"""Per-layer densities from a global density: ERK and uniform (SRIGL_SPEC §2.2), and per-layer budgets (§2.3).

Pure maths on shapes: no modules, no graphs.

Example:
    >>> densities = erk_densities({"a": (64, 32), "b": (10, 64)}, density=0.1, fixed={})
    >>> round(sum(densities[n] * s[0] * s[1] for n, s in {"a": (64, 32), "b": (10, 64)}.items()))  # ~= 0.1 * 2688
    269
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from ..errors import ConfigError

__all__ = ["erk_densities", "uniform_densities", "layer_budget", "constant_fan_in"]

Shape = Sequence[int]


def _numel(shape: Shape) -> int:
    return math.prod(shape)


def _nnz_at(numel: int, density: float) -> int:
    # The reference counts a layer's non-zeros as N - int(N * sparsity): int() truncates the zeros, so the
    # non-zeros round up. Used for the global budget so that it matches the reference's rhs exactly.
    return numel - int(numel * (1.0 - density))


def _free_budget(shapes: Mapping[str, Shape], density: float, fixed: Mapping[str, float]) -> float:
    """Non-zeros left for the free layers once the fixed (dense or overridden) layers took theirs.

    rhs = sum_all (N - int(N (1 - D))) - sum_fixed nnz_fixed. With only dense fixed layers this is the spec's
    sum_sparse (N - int(N (1 - D))) - sum_dense int(N (1 - D)).
    """
    total = sum(_nnz_at(_numel(s), density) for s in shapes.values())
    return total - sum(_nnz_at(_numel(shapes[n]), d) for n, d in fixed.items())


def erk_densities(
    shapes: Mapping[str, Shape], density: float, fixed: Mapping[str, float], power: float = 1.0
) -> dict[str, float]:
    """Erdős–Rényi-Kernel densities.

    Each free layer gets density eps * raw_l with raw_l = (sum(shape) / prod(shape)) ** power, the sum running
    over ALL weight dims (n_out + n_in + kh + kw for a conv). eps is chosen so that the free layers hold exactly
    the free budget: eps = rhs / sum_free raw_l N_l. A layer whose density would exceed 1 is moved to the dense
    set (largest raw first, one at a time) and eps is solved again, as the reference does.

    Args:
        shapes: weight shape per layer name (all layers that count toward the global density).
        density: global target density D in (0, 1).
        fixed: layers whose density is fixed (1.0 = dense, or an override); excluded from ERK.
        power: ERK exponent (1.0 in the paper).
    """
    fixed = dict(fixed)
    dense: set[str] = set()
    while True:
        free = [n for n in shapes if n not in fixed and n not in dense]
        all_fixed = {**fixed, **{n: 1.0 for n in dense}}
        rhs = _free_budget(shapes, density, all_fixed)
        if not free:
            break
        raw = {n: (sum(shapes[n]) / _numel(shapes[n])) ** power for n in free}
        divisor = sum(raw[n] * _numel(shapes[n]) for n in free)
        if not 0 < divisor < math.inf:  # (a large power under- or overflows: the same scores, relative to the top)
            logs = {n: power * math.log(sum(shapes[n]) / _numel(shapes[n])) for n in free}
            top = max(logs.values())
            raw = {n: math.exp(logs[n] - top) for n in free}
            divisor = sum(raw[n] * _numel(shapes[n]) for n in free)
        if rhs <= 0:
            raise ConfigError(
                f"the layers kept dense or overridden ({sorted(all_fixed)}) already exceed the global density "
                f"{density:.4f}; give them a higher sparsity (overrides), or lower the global sparsity"
            )
        eps = rhs / divisor
        worst = max(free, key=lambda n: raw[n])
        if eps * raw[worst] > 1.0:
            dense.add(worst)
            continue
        result = {n: eps * raw[n] for n in free}
        result.update({n: 1.0 for n in dense})
        result.update(fixed)
        return result
    return {**fixed, **{n: 1.0 for n in dense}}


def uniform_densities(shapes: Mapping[str, Shape], density: float, fixed: Mapping[str, float]) -> dict[str, float]:
    """The same density for every free layer, adjusted so fixed layers do not change the global density.

    With dense layers fixed this is the spec's s = 1 - (N_total D - N_dense) / N_sparse.
    """
    free = [n for n in shapes if n not in fixed]
    result = dict(fixed)
    if not free:
        return result
    n_total = sum(_numel(s) for s in shapes.values())
    n_fixed_nnz = sum(_numel(shapes[n]) * d for n, d in fixed.items())
    n_free = sum(_numel(shapes[n]) for n in free)
    free_density = (n_total * density - n_fixed_nnz) / n_free
    if not 0.0 < free_density <= 1.0:
        raise ConfigError(
            f"uniform distribution: with layers {sorted(fixed)} fixed, the other layers would need density "
            f"{free_density:.4f}; choose a global sparsity compatible with the fixed layers"
        )
    result.update({n: free_density for n in free})
    return result


def layer_budget(numel: int, density: float) -> int:
    """Non-zero budget of a layer: floor(N x density) (spec §2.3); always taken from the target density."""
    # The epsilon guards against density*N landing a hair under an integer through float rounding.
    return int(math.floor(numel * density + 1e-9))


def constant_fan_in(budget: int, n_active: int) -> int:
    """k = floor(budget / active neurons): ablated neurons hand their share to the survivors."""
    if n_active <= 0:
        raise ValueError("a layer needs at least one active neuron")
    return budget // n_active
