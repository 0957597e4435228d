"""Configuration of sparse training: a frozen, validated, dict-round-tripping dataclass.

Example:
    >>> from srigl_compile import SRigLConfig
    >>> cfg = SRigLConfig(sparsity=0.9, distribution="erk", overrides={"fc": None})
    >>> SRigLConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Iterable, Mapping
from enum import Enum
from typing import Any

from .errors import ConfigError

__all__ = ["Distribution", "Method", "TooSmallPolicy", "SRigLConfig", "DENSE", "TRAINING_METHODS", "training_config"]


class Distribution(str, Enum):
    """How the global density is split across layers (SRIGL_SPEC §2.2)."""

    ERK = "erk"
    UNIFORM = "uniform"


class Method(str, Enum):
    """Which mask-update rule the updater applies. All share every other line of code."""

    SRIGL = "srigl"  # constant fan-in, per-neuron regrowth, optional neuron ablation
    RIGL = "rigl"  # unstructured: layer-wise prune by |W|, grow by |dense grad|
    SET = "set"  # unstructured: layer-wise prune by |W|, random regrowth
    STATIC = "static"  # the initial random mask never changes


class TooSmallPolicy(str, Enum):
    """What to do with a layer whose constant fan-in k would be 0."""

    ERROR = "error"
    DENSE = "dense"


def _enum(cls: type[Enum], field: str, value: Any) -> Enum:
    try:
        return cls(value.value if isinstance(value, Enum) else value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in cls)
        raise ConfigError(f"SRigLConfig.{field}={value!r} is not one of {allowed}") from None


def _is_real(value: Any) -> bool:
    """A finite real number, numpy scalars included; bool is not a number here."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_fraction(field: str, value: Any, *, low_open: bool = True, high_open: bool = True,
                    example: str = "0.9 for 90% sparsity") -> float:
    if not _is_real(value):
        raise ConfigError(f"SRigLConfig.{field}={value!r} must be a finite number")
    lo_ok = value > 0 if low_open else value >= 0
    hi_ok = value < 1 if high_open else value <= 1
    if not (lo_ok and hi_ok):
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ConfigError(f"SRigLConfig.{field}={value!r} must lie in {interval}, e.g. {example}")
    return float(value)


def _check_nonnegative(field: str, value: Any, meaning: str = "") -> float:
    if not _is_real(value) or value < 0:
        raise ConfigError(f"SRigLConfig.{field}={value!r} must be a finite number >= 0{meaning}")
    return float(value)


def _check_int(field: str, value: Any, minimum: int) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"SRigLConfig.{field}={value!r} must be an integer >= {minimum}")
    return int(value)


def _check_pattern(field: str, pattern: Any) -> str:
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"SRigLConfig.{field}: layer key {pattern!r} must be a non-empty layer name or regex")
    try:
        re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"SRigLConfig.{field}: {pattern!r} is not a valid regex ({err})") from None
    return pattern


@dataclasses.dataclass(frozen=True)
class SRigLConfig:
    """Everything that decides how a model is sparsified and how its masks evolve.

    Attributes:
        sparsity: global fraction of removed weights over the sparse layers, in (0, 1).
        distribution: "erk" (Erdős–Rényi-Kernel, the paper's default for CNNs) or "uniform" (used for ViT).
        erk_power: exponent on the ERK raw score (1.0 in the paper).
        method: "srigl", "rigl", "set" or "static".
        ablation: SRigL's dynamic neuron ablation (ignored by other methods).
        gamma_sal: minimum salient weights per neuron, as a fraction of k (absolute count when >= 1, a whole
            number then).
        alpha: initial drop fraction of the cosine schedule.
        delta_t: optimizer steps between mask updates.
        t_end_fraction: masks freeze after this fraction of the total steps.
        grad_accumulation_n: optimizer steps whose dense gradients are averaged for the grow criterion.
        seed: seed of the explicit torch.Generator behind initial masks, re-initialisation and SET regrowth.
        keep_first_dense / keep_last_dense: keep the layers nearest the input / output dense.
        overrides: per-layer sparsity by exact name or regex (full match); ``None`` keeps that layer dense. An
            override names a layer explicitly, so it wins over keep_first_dense / keep_last_dense.
        no_ablation: names/regexes of layers never ablated, on top of the output layer(s), always protected.
        reinit: sparse Kaiming re-initialisation (std sqrt(2 / k)); False keeps the existing (masked) weights,
            which is what fine-tuning a pretrained model needs.
        too_small: "error" (default) or "dense" for a layer whose fan-in k would be 0.
    """

    sparsity: float = 0.9
    distribution: Distribution = Distribution.ERK
    erk_power: float = 1.0
    method: Method = Method.SRIGL
    ablation: bool = True
    gamma_sal: float = 0.3
    alpha: float = 0.3
    delta_t: int = 100
    t_end_fraction: float = 0.75
    grad_accumulation_n: int = 1
    seed: int = 0
    keep_first_dense: bool = False
    keep_last_dense: bool = False
    overrides: Mapping[str, float | None] = dataclasses.field(default_factory=dict)
    no_ablation: tuple[str, ...] = ()
    reinit: bool = True
    too_small: TooSmallPolicy = TooSmallPolicy.ERROR

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        set_("sparsity", _check_fraction("sparsity", self.sparsity))
        set_("distribution", _enum(Distribution, "distribution", self.distribution))
        set_("method", _enum(Method, "method", self.method))
        set_("too_small", _enum(TooSmallPolicy, "too_small", self.too_small))
        set_("erk_power", _check_nonnegative("erk_power", self.erk_power))
        set_("alpha", _check_fraction("alpha", self.alpha, high_open=False, example="0.3, the fraction dropped"))
        set_("t_end_fraction", _check_fraction("t_end_fraction", self.t_end_fraction, high_open=False,
                                               example="0.75, the fraction of training with mask updates"))
        set_("gamma_sal", _check_nonnegative("gamma_sal", self.gamma_sal, " (a fraction of k, or a count >= 1)"))
        if self.gamma_sal >= 1 and not float(self.gamma_sal).is_integer():  # (a count: 2.5 would act as 2)
            raise ConfigError(f"SRigLConfig.gamma_sal={self.gamma_sal!r}: values >= 1 are a count of salient weights "
                              "and must be whole (e.g. 3); below 1 it is a fraction of k (e.g. 0.3)")
        set_("delta_t", _check_int("delta_t", self.delta_t, 1))
        set_("grad_accumulation_n", _check_int("grad_accumulation_n", self.grad_accumulation_n, 1))
        if self.grad_accumulation_n > self.delta_t:
            raise ConfigError(
                f"SRigLConfig.grad_accumulation_n={self.grad_accumulation_n} exceeds delta_t={self.delta_t}: "
                "the gradient window must fit between two mask updates"
            )
        set_("seed", _check_int("seed", self.seed, 0))
        if self.seed >= 2**63 - 1:  # (torch.Generator takes an int64; the updater seeds seed + 1)
            raise ConfigError(f"SRigLConfig.seed={self.seed} must be below 2**63 - 1 (torch.Generator's range)")
        for name in ("ablation", "keep_first_dense", "keep_last_dense", "reinit"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"SRigLConfig.{name}={getattr(self, name)!r} must be True or False")
        if not isinstance(self.overrides, Mapping):
            raise ConfigError("SRigLConfig.overrides must map layer names/regexes to a sparsity or None")
        overrides = {}
        for key, value in self.overrides.items():
            _check_pattern("overrides", key)
            if isinstance(value, bool):  # (False == 0 would mean dense, True == 1 fails later: neither is meant)
                raise ConfigError(f"SRigLConfig.overrides[{key!r}]={value!r} must be a sparsity in (0, 1), or None "
                                  "(or 0) to keep the layer dense")
            overrides[key] = None if value is None or value == 0 else _check_fraction(f"overrides[{key!r}]", value)
        set_("overrides", overrides)
        if isinstance(self.no_ablation, str) or not isinstance(self.no_ablation, Iterable):
            raise ConfigError(f"SRigLConfig.no_ablation={self.no_ablation!r} must be a list of layer names/regexes, "
                              "e.g. ['fc'] (not one string)")
        set_("no_ablation", tuple(_check_pattern("no_ablation", p) for p in self.no_ablation))

    @property
    def density(self) -> float:
        return 1.0 - self.sparsity

    def override_for(self, layer_name: str) -> tuple[bool, float | None]:
        """Return (matched, sparsity) for a layer: exact names win over regexes, then first regex in order."""
        if layer_name in self.overrides:
            return True, self.overrides[layer_name]
        for pattern, value in self.overrides.items():
            if re.fullmatch(pattern, layer_name):
                return True, value
        return False, None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; ``SRigLConfig.from_dict`` inverts it."""
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, Enum):
                out[key] = value.value
        out["overrides"] = dict(self.overrides)
        out["no_ablation"] = list(self.no_ablation)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SRigLConfig:
        if not isinstance(data, Mapping):
            raise ConfigError(f"SRigLConfig.from_dict takes a mapping of field names to values (what to_dict "
                              f"returns), got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"SRigLConfig has no field(s) {unknown}; known fields: {sorted(known)}")
        kwargs = dict(data)
        if isinstance(kwargs.get("no_ablation"), list):  # (JSON's lists; anything else is checked as given)
            kwargs["no_ablation"] = tuple(kwargs["no_ablation"])
        return cls(**kwargs)

    def replace(self, **changes: Any) -> SRigLConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


# The baseline every comparison trains next to the sparse methods: not a Method (nothing is sparsified, no
# SRigLConfig exists), so it is handled here once rather than by each caller comparing strings.
DENSE = "dense"
TRAINING_METHODS = (DENSE, *(method.value for method in Method))


def training_config(method: str, **fields: Any) -> SRigLConfig | None:
    """The SRigLConfig that trains with ``method`` (a Method value) and ``fields``; None for the dense baseline.

    Example:
        >>> training_config("dense", sparsity=0.9) is None, training_config("rigl", sparsity=0.8).method.value
        (True, 'rigl')
    """
    return None if method == DENSE else SRigLConfig(method=method, **fields)
