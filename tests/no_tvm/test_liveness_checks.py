"""runtime.liveness against byte-by-byte models (hypothesis): which call produced a value (``producer``) and which
constants no later call writes (``never_rewritten``), over random byte ranges with touching ends; pure bookkeeping,
no TVM."""

from hypothesis import given, settings
from hypothesis import strategies as st

from srigl_compile.runtime.liveness import Access, Extent, dead_after, never_rewritten, producer

BASE = 4096


def _e(start, end):
    return Extent(BASE + start, BASE + end)


def _bytes(extent):
    return set(range(extent.start, extent.end))


# ranges over 16 bytes, so that random ones often touch (one ends where the other starts) or coincide
_ranges = st.tuples(st.integers(0, 15), st.integers(1, 8)).map(lambda r: _e(r[0], min(r[0] + r[1], 16)))
_accesses = st.builds(Access, reads=st.lists(_ranges, max_size=2).map(tuple),
                      kills=st.lists(_ranges, max_size=2).map(tuple), writes=st.lists(_ranges, max_size=1).map(tuple))


def _producer_model(calls, index, target):
    """The latest call before ``index`` writing any byte of target: it, when one of its kills holds all of target's
    bytes (the value written whole), else None (part of it written by something else, or strided)."""
    wanted = _bytes(target)
    for earlier in range(index - 1, -1, -1):
        access = calls[earlier]
        if any(wanted <= _bytes(kill) for kill in access.kills):
            return earlier
        if any(wanted & _bytes(other) for other in (*access.kills, *access.writes)):
            return None
    return None


@settings(max_examples=400, deadline=None)
@given(calls=st.lists(_accesses, min_size=1, max_size=6), index=st.integers(0, 6), target=_ranges)
def test_producer_matches_a_byte_by_byte_model(calls, index, target):
    index = min(index, len(calls))
    assert producer(calls, index, target) == _producer_model(calls, index, target)


def test_writes_next_to_a_value_leave_its_producer_alone():
    """Mutant: ranges that only touch (one ends where the other starts) counted as overlapping."""
    target = _e(16, 48)
    calls = [Access(kills=(target,)), Access(kills=(_e(48, 64),)), Access(writes=(_e(0, 16),))]
    assert producer(calls, 3, target) == 0
    assert producer([Access(kills=(target,))], 1, target) == 0  # exactly the same bytes: written whole
    assert producer([Access(kills=(_e(16, 47),))], 1, target) is None  # one byte short at the end
    assert producer([Access(kills=(_e(17, 48),))], 1, target) is None  # one byte short at the start


@settings(max_examples=400, deadline=None)
@given(calls=st.lists(_accesses, min_size=1, max_size=6), in_place=st.lists(st.booleans(), min_size=6, max_size=6),
       candidates=st.sets(st.integers(0, 5)))
def test_never_rewritten_matches_a_byte_by_byte_model(calls, in_place, candidates):
    candidates = {c for c in candidates if c < len(calls)}
    in_place = in_place[:len(calls)]
    expected = set()
    for index in candidates:
        made = set().union(*map(_bytes, (*calls[index].kills, *calls[index].writes)))
        later = set()
        for access, changes in zip(calls[index + 1:], in_place[index + 1:]):
            for other in (*access.kills, *access.writes, *(access.reads if changes else ())):
                later |= _bytes(other)
        if not made & later:
            expected.add(index)
    assert never_rewritten(calls, in_place, candidates) == expected


def test_the_bytes_just_past_a_partial_kill_stay_live():
    """Mutant: a kill inside the live range dropped the byte right after it (and right before it) from the live
    bytes, so a later read of that one byte was missed and the value called dead."""
    target = _e(0, 64)
    calls = [Access(kills=(target,)), Access(reads=(target,)), Access(kills=(_e(16, 32),))]
    for byte in (15, 32):  # the bytes on either side of the kill still hold the value
        assert not dead_after(calls + [Access(reads=(_e(byte, byte + 1),))], 1, target, ())
        assert not dead_after(calls, 1, target, (_e(byte, byte + 1),))
    for byte in (16, 31):  # the first and last bytes killed hold a new value
        assert dead_after(calls + [Access(reads=(_e(byte, byte + 1),)), Access(kills=(target,))], 1, target, ())


@settings(max_examples=300, deadline=None)
@given(kills=st.lists(st.tuples(st.integers(0, 15), st.integers(1, 8)), min_size=1, max_size=3),
       byte=st.integers(0, 15))
def test_one_byte_read_after_kills_is_live_exactly_when_no_kill_covered_it(kills, byte):
    target = _e(0, 16)
    killed = [_e(start, min(start + size, 16)) for start, size in kills]
    calls = [Access(kills=(target,)), Access(reads=(target,)), Access(kills=tuple(killed)),
             Access(reads=(_e(byte, byte + 1),))]
    covered = any(kill.start <= BASE + byte < kill.end for kill in killed)
    assert dead_after(calls, 1, target, ()) == covered  # (dead: the byte read holds a new value)
