import math

from hypothesis import given
from hypothesis import strategies as st

from srigl_compile.sparsity import UpdateSchedule


def test_updates_every_delta_t_and_stop_at_t_end():
    s = UpdateSchedule(delta_t=100, t_end=750, alpha=0.3)
    assert [t for t in range(1, 1001) if s.is_update_step(t)] == [100, 200, 300, 400, 500, 600, 700]


def test_cosine_drop_fraction():
    s = UpdateSchedule(delta_t=10, t_end=100, alpha=0.3)
    assert s.drop_fraction(0) == 0.3
    assert math.isclose(s.drop_fraction(50), 0.15)
    assert math.isclose(s.drop_fraction(100), 0.0, abs_tol=1e-12)


@given(st.integers(1, 50), st.integers(1, 500), st.data())
def test_accumulation_window_is_the_last_n_steps_before_each_update(delta_t, t_end, data):
    n = data.draw(st.integers(1, delta_t))
    s = UpdateSchedule(delta_t, t_end, 0.3, n)
    for t in range(1, t_end + delta_t + 2):
        expected = any(s.is_update_step(u) and 0 <= u - t < n for u in range(t, t + n))
        assert s.accumulates(t) == expected
