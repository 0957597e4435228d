"""ERK / uniform densities and budgets (SRIGL_SPEC §2.2-2.3), checked against the reference's own numbers."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from srigl_compile import ConfigError
from srigl_compile.sparsity import constant_fan_in, erk_densities, layer_budget, uniform_densities


def resnet50_shapes():
    shapes, inplanes = {"conv1": (64, 3, 7, 7)}, 64
    for li, (planes, blocks) in enumerate(zip([64, 128, 256, 512], [3, 4, 6, 3]), 1):
        for b in range(blocks):
            p = f"layer{li}.{b}"
            shapes[p + ".conv1"] = (planes, inplanes, 1, 1)
            shapes[p + ".conv2"] = (planes, planes, 3, 3)
            shapes[p + ".conv3"] = (planes * 4, planes, 1, 1)
            if b == 0:
                shapes[p + ".downsample.0"] = (planes * 4, inplanes, 1, 1)
            inplanes = planes * 4
    shapes["fc"] = (1000, 2048)
    return shapes


def k_of(shapes, densities, name):
    return layer_budget(math.prod(shapes[name]), densities[name]) // shapes[name][0]


def test_resnet50_erk_matches_reference_fan_ins():
    shapes = resnet50_shapes()
    assert len(shapes) == 54  # the reference's test counts 54 weight tensors
    densities = erk_densities(shapes, 0.1, {})
    assert k_of(shapes, densities, "conv1") == 61
    assert k_of(shapes, densities, "layer4.2.conv2") == 98
    assert k_of(shapes, densities, "fc") == 148
    nnz = sum(k_of(shapes, densities, n) * s[0] for n, s in shapes.items())
    assert nnz / sum(math.prod(s) for s in shapes.values()) == pytest.approx(0.0998, abs=5e-5)


def test_vit_b16_uniform_fan_ins():
    shapes = {"conv_proj": (768, 3, 16, 16), "in_proj": (2304, 768), "out_proj": (768, 768),
              "mlp.0": (3072, 768), "mlp.3": (768, 3072), "head": (1000, 768)}
    densities = uniform_densities(shapes, 0.1, {})
    assert [k_of(shapes, densities, n) for n in shapes] == [76, 76, 76, 76, 307, 76]


shape_lists = st.lists(
    st.tuples(st.integers(1, 64), st.integers(1, 64), st.sampled_from([(), (1, 1), (3, 3), (5,)])).map(
        lambda t: (t[0], t[1], *t[2])
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=200, deadline=None)
@given(shape_lists, st.floats(0.01, 0.99), st.sampled_from([0.5, 1.0, 2.0]))
def test_erk_hits_the_global_budget_and_keeps_densities_valid(shapes, density, power):
    shapes = {f"l{i}": s for i, s in enumerate(shapes)}
    densities = erk_densities(shapes, density, {}, power)
    assert set(densities) == set(shapes)
    assert all(0 < d <= 1 + 1e-12 for d in densities.values())
    total = sum(math.prod(s) for s in shapes.values())
    target = sum(n - int(n * (1 - density)) for n in (math.prod(s) for s in shapes.values()))
    allocated = sum(densities[n] * math.prod(s) for n, s in shapes.items())
    if any(d < 1 for d in densities.values()):
        assert allocated == pytest.approx(target, rel=1e-9)
    else:  # everything dense: only possible when the budget covers (nearly) all weights
        assert target >= total - len(shapes) - 1 or allocated <= total


@settings(max_examples=100, deadline=None)
@given(shape_lists, st.floats(0.05, 0.95))
def test_erk_gives_higher_density_to_layers_with_higher_raw_score(shapes, density):
    shapes = {f"l{i}": s for i, s in enumerate(shapes)}
    densities = erk_densities(shapes, density, {})
    raw = {n: sum(s) / math.prod(s) for n, s in shapes.items()}
    for a in shapes:
        for b in shapes:
            if raw[a] > raw[b]:
                assert densities[a] >= densities[b] - 1e-12


def test_erk_moves_saturated_layers_to_dense_and_redistributes():
    shapes = {"tiny": (4, 3), "big": (512, 512)}
    densities = erk_densities(shapes, 0.3, {})
    assert densities["tiny"] == 1.0 and 0 < densities["big"] < 0.3


def test_fixed_layers_keep_the_global_density():
    shapes = {"a": (100, 100), "b": (100, 100), "c": (10, 100)}
    for fn in (uniform_densities, lambda s, d, f: erk_densities(s, d, f)):
        densities = fn(shapes, 0.2, {"c": 1.0})
        assert densities["c"] == 1.0
        total = sum(densities[n] * math.prod(s) for n, s in shapes.items())
        assert total == pytest.approx(0.2 * 21000, abs=2)


def test_fixed_layers_over_budget_is_a_config_error():
    shapes = {"a": (100, 100), "b": (10, 10)}
    with pytest.raises(ConfigError):
        uniform_densities(shapes, 0.1, {"a": 1.0})
    with pytest.raises(ConfigError):
        erk_densities(shapes, 0.1, {"a": 1.0})


@given(st.integers(1, 10**7), st.floats(0.0, 1.0))
def test_budget_is_the_floor(numel, density):
    budget = layer_budget(numel, density)
    assert budget <= numel * density + 1e-6 and budget > numel * density - 1 - 1e-6


def test_fan_in_hands_ablated_budget_to_survivors():
    assert constant_fan_in(100, 10) == 10
    assert constant_fan_in(100, 7) == 14
    with pytest.raises(ValueError):
        constant_fan_in(100, 0)


@pytest.mark.parametrize("power", [0.5, 2.0])
def test_erk_power_scales_the_ratio_of_layer_densities(power):
    """ERK's density of a layer goes as its raw score to the power (SRIGL_SPEC §2.2): a mutant ignoring the power
    passed every test, which checked the global budget only (eps normalises the power away)."""
    shapes = {"a": (64, 32), "b": (128, 256), "c": (32, 16, 3, 3)}
    raw = {name: sum(shape) / math.prod(shape) for name, shape in shapes.items()}
    densities = erk_densities(shapes, 0.1, {}, power)
    assert densities["a"] < 1 and densities["b"] < 1
    assert densities["a"] / densities["b"] == pytest.approx((raw["a"] / raw["b"]) ** power, rel=1e-9)
