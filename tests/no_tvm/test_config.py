import dataclasses
import json
import math

import pytest

from srigl_compile import ConfigError, SRigLConfig
from srigl_compile.config import Distribution, Method


def test_defaults_follow_the_paper():
    cfg = SRigLConfig()
    assert (cfg.distribution, cfg.method, cfg.erk_power) == (Distribution.ERK, Method.SRIGL, 1.0)
    assert (cfg.gamma_sal, cfg.alpha, cfg.delta_t, cfg.t_end_fraction, cfg.grad_accumulation_n) == (0.3, 0.3, 100, 0.75, 1)
    assert cfg.ablation is True


def test_round_trip_through_json():
    cfg = SRigLConfig(sparsity=0.95, distribution="uniform", method="rigl", overrides={"fc": None, r"layer\d+": 0.8},
                      no_ablation=("head",), keep_first_dense=True, seed=7)
    again = SRigLConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert again.method is Method.RIGL and again.overrides == {"fc": None, r"layer\d+": 0.8}


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.1, math.nan, math.inf, "0.9", True, None])
def test_sparsity_outside_open_interval_is_rejected_naming_the_field(value):
    with pytest.raises(ConfigError, match="sparsity"):
        SRigLConfig(sparsity=value)


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("distribution", "gaussian", "'erk', 'uniform'"),
        ("method", "magic", "'srigl'"),
        ("alpha", 0.0, "alpha"),
        ("t_end_fraction", 1.2, "t_end_fraction"),
        ("delta_t", 0, "delta_t"),
        ("grad_accumulation_n", 0, "grad_accumulation_n"),
        ("gamma_sal", -1, "gamma_sal"),
        ("gamma_sal", math.inf, "finite"),
        ("gamma_sal", 2.5, "must be whole"),
        ("erk_power", math.nan, "finite"),
        ("delta_t", 1.5, "integer"),
        ("seed", -3, "seed"),
        ("ablation", "yes", "ablation"),
        ("too_small", "shrug", "too_small"),
        ("no_ablation", "fc", "no_ablation"),
        ("overrides", {"fc": 1.0}, "overrides"),
        ("overrides", {"(": 0.5}, "regex"),
    ],
)
def test_bad_fields_raise_config_error_naming_them(field, value, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        SRigLConfig(**{field: value})


def test_gamma_sal_counts_are_whole_numbers_and_fractions_stay_fractions():
    assert SRigLConfig(gamma_sal=3.0).gamma_sal == 3.0 and SRigLConfig(gamma_sal=0.95).gamma_sal == 0.95


def test_numpy_scalars_are_numbers():
    import numpy as np

    config = SRigLConfig(sparsity=np.float64(0.8), delta_t=np.int64(5), erk_power=np.float32(1.0))
    assert (config.sparsity, config.delta_t, config.erk_power) == (0.8, 5, 1.0)
    assert type(config.delta_t) is int and SRigLConfig.from_dict(config.to_dict()) == config


def test_gradient_window_must_fit_between_updates():
    with pytest.raises(ConfigError, match="grad_accumulation_n"):
        SRigLConfig(delta_t=4, grad_accumulation_n=5)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ConfigError, match="no field"):
        SRigLConfig.from_dict({"sparsity": 0.9, "spasity": 0.8})


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SRigLConfig().sparsity = 0.5


def test_override_lookup_prefers_exact_names():
    cfg = SRigLConfig(overrides={r"layer.*": 0.5, "layer1": None})
    assert cfg.override_for("layer1") == (True, None)
    assert cfg.override_for("layer2") == (True, 0.5)
    assert cfg.override_for("fc") == (False, None)
