"""A short real training run: SRigL at 90% sparsity learns sklearn's digits with its invariants intact."""

import pytest

from srigl_compile.recipes import train_digits


def test_srigl_at_90_percent_learns_digits():
    result = train_digits("srigl", 0.9, epochs=15, seed=0)
    # The updater checks every layer's invariants after each update and raises on violation; re-check at the end.
    result.updater.check_invariants()
    assert result.accuracy > 0.85, "10 classes: chance is 0.1"
    stats = result.updater.stats()
    assert stats["global"]["density"] == pytest.approx(0.1, abs=0.01)
    assert len(result.history) > 0 and stats["global"]["explored_fraction"] > stats["global"]["density"]
    assert result.losses[-1] < result.losses[0] / 4


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dense", "static", "rigl", "set"])
def test_baselines_learn_digits(method):
    assert train_digits(method, 0.9, epochs=15, seed=0).accuracy > 0.85


def test_srigl_cnn_with_batchnorm_learns_digits():
    result = train_digits("srigl", 0.9, model="cnn", epochs=4, seed=1)
    assert result.accuracy > 0.5
