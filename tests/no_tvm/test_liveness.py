"""runtime.liveness: whether a value is produced by the forward and dead after a call, against a byte-by-byte
simulation (hypothesis); extents of strided tensors (pure torch, no TVM)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from srigl_compile.runtime.liveness import Access, Extent, dead_after, extent, never_rewritten, producer

BASE = 4096  # where the cases' memory starts


def _e(start, end):
    return Extent(BASE + start, BASE + end)


def test_extent_spans_first_to_last_element():
    base = torch.zeros(4, 10)
    view = base[1:3, 2:5]  # rows 1-2, columns 2-4
    got = extent(view)
    start = base.data_ptr()
    assert (got.start, got.end) == (start + (1 * 10 + 2) * 4, start + (2 * 10 + 4 + 1) * 4)
    assert extent(base[:0]) is None
    # another storage object on the same memory (numpy's array of it): the same addresses
    assert extent(torch.from_numpy(base.numpy())[1:3, 2:5]) == got


def test_a_value_read_again_is_live_and_one_overwritten_first_is_dead():
    target = _e(0, 64)
    calls = [Access(kills=(target,)), Access(reads=(target,))]
    assert dead_after(calls + [Access(kills=(target,))], 1, target, ())
    assert not dead_after(calls + [Access(reads=(_e(60, 70),))], 1, target, ())  # one byte read is enough
    assert dead_after(calls + [Access(reads=(_e(64, 128),))], 1, target, ())  # the memory next to it
    # overwritten in two halves, then read: dead; read between the halves, where not yet overwritten: live
    halves = [Access(kills=(_e(0, 32),)), Access(kills=(_e(32, 64),)), Access(reads=(target,))]
    assert dead_after(calls + halves, 1, target, ())
    assert not dead_after(calls + [halves[0], Access(reads=(_e(40, 48),))], 1, target, ())
    assert dead_after(calls + [halves[0], Access(reads=(_e(8, 16),))], 1, target, ())  # a new value's bytes
    # a strided write keeps its gaps: the value is not known to be gone
    assert not dead_after(calls + [Access(writes=(target,)), Access(reads=(target,))], 1, target, ())
    # part of an output: live
    assert not dead_after(calls, 1, target, (_e(48, 52),)) and dead_after(calls, 1, target, (_e(64, 80),))


def test_only_a_value_written_whole_by_the_forward_has_a_producer():
    target = _e(16, 48)
    assert producer([Access(kills=(_e(0, 64),)), Access(reads=(target,))], 2, target) == 0
    assert producer([Access(kills=(target,)), Access(reads=(target,), kills=(_e(0, 8),))], 2, target) == 0
    assert producer([Access(reads=(target,))], 1, target) is None  # a parameter, an input: never written
    assert producer([Access(kills=(target,)), Access(kills=(_e(40, 56),))], 2, target) is None  # half replaced
    assert producer([Access(kills=(target,)), Access(writes=(target,))], 2, target) is None
    assert producer([Access(kills=(target,))], 0, target) is None  # written after the call asks


_ranges = st.tuples(st.integers(0, 15), st.integers(1, 8)).map(lambda r: _e(r[0], min(r[0] + r[1], 16)))
_accesses = st.builds(Access, reads=st.lists(_ranges, max_size=2).map(tuple),
                      kills=st.lists(_ranges, max_size=2).map(tuple))


@settings(max_examples=300, deadline=None)
@given(calls=st.lists(_accesses, min_size=1, max_size=6), index=st.integers(0, 5), target=_ranges,
       outputs=st.lists(_ranges, max_size=2))
def test_dead_after_matches_a_byte_by_byte_simulation(calls, index, target, outputs):
    index = min(index, len(calls) - 1)
    live = set(range(target.start, target.end))
    expected = True
    for access in calls[index + 1:]:
        if any(byte in live for read in access.reads for byte in range(read.start, read.end)):
            expected = False
            break
        for kill in access.kills:
            live -= set(range(kill.start, kill.end))
    if expected:
        expected = not any(byte in live for out in outputs for byte in range(out.start, out.end))
    assert dead_after(calls, index, target, outputs) == expected


def test_a_constant_is_kept_only_while_nothing_later_writes_its_bytes():
    a, b, c = _e(0, 64), _e(64, 128), _e(128, 192)
    calls = [Access(kills=(a,)), Access(kills=(b,)), Access(kills=(c,), writes=()), Access(reads=(a, c)),
             Access(kills=(_e(96, 100),)), Access(reads=(c,))]
    # a: only read later; b: partly overwritten by call 4; c: read by an in-place op (call 5), which may write it
    assert never_rewritten(calls, [False, False, False, False, False, True], [0, 1, 2]) == {0}
    assert never_rewritten(calls, [False] * 6, [0, 1, 2]) == {0, 2}
    strided = [Access(writes=(a,)), Access(writes=(_e(8, 16),))]  # (a strided result's gaps: writes, not kills)
    assert never_rewritten(strided, [False, False], [0]) == set()
