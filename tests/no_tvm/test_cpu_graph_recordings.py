"""cpu_graph's recordings over their life: spare copies for other threads, misses and hits, closed and eager
signatures, every variant tried, state objects (caches) adopted, kept or refused. Each test failed on a mutant
the rest of the suite let through (mutation probe, session 43)."""

import gc
import warnings

import pytest
import torch
import torch.nn as nn

from srigl_compile import ReplayError, cpu_graph
from srigl_compile.nn import cpu_graph as cpu_graph_module


def _same(got, want):
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# a stale signature's spare copies -----------------------------------------------------------------------------

def test_copies_recorded_while_the_first_was_busy_go_with_it_when_the_parameters_are_replaced():
    """A stale first recording was dropped but its spares (recorded while it replayed on another thread) were
    kept: a thread arriving while the new first one replays claimed a spare, computing with the old weights."""
    torch.manual_seed(0)
    model = nn.Linear(5, 4).eval()
    graphed = cpu_graph(model)
    x = torch.randn(3, 5)
    with torch.no_grad():
        _same(graphed(x), model(x))
        (entry,) = graphed._entries.values()
        with entry.lock:  # (as if another thread were replaying it)
            _same(graphed(x), model(x))  # a spare
        model.load_state_dict({"weight": torch.randn(4, 5), "bias": torch.randn(4)}, assign=True)
        _same(graphed(x), model(x))  # stale: recorded again
        (entry,) = graphed._entries.values()
        with entry.lock:
            _same(graphed(x), model(x))  # no stale spare may answer this


# a hit resets the count of misses ----------------------------------------------------------------------------

class _NanCheck(nn.Module):
    def forward(self, x):
        return x * 3 if torch.isnan(x).any() else x * 2  # (a guard on a bool: every finite input hits)


def test_a_hit_between_misses_starts_the_count_of_misses_again():
    """``MISSES_BEFORE_EAGER`` counts misses in a row: with the count never reset, a signature whose inputs
    sometimes miss went eager for good after that many misses in all, and its hits stopped replaying."""
    graphed = cpu_graph(_NanCheck(), max_recordings=1)
    nan = torch.full((3, 4), float("nan"))
    with torch.no_grad():
        graphed(torch.rand(3, 4))
        (entry,) = graphed._entries.values()
        for _ in range(cpu_graph_module.MISSES_BEFORE_EAGER + 1):
            torch.testing.assert_close(graphed(nan), nan * 3, rtol=0, atol=0, equal_nan=True)
            x = torch.rand(3, 4)
            _same(graphed(x), x * 2)
        assert not entry.eager
    assert graphed.replays == 2 + cpu_graph_module.MISSES_BEFORE_EAGER
    assert graphed.guard_misses == cpu_graph_module.MISSES_BEFORE_EAGER + 1


# a closed signature is not recorded again ----------------------------------------------------------------------

class _CountedRefusedBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self._calls = 0  # (private: bookkeeping, not a setting)

    def forward(self, x):
        self._calls += 1
        if x.sum() > 0:
            return x * 2
        return x[x > 0].sum() * torch.ones(3)  # (a boolean-mask index: no replay on this branch)


def test_a_closed_signature_runs_its_misses_eagerly_once_without_trying_to_record_again():
    """With the closed flag ignored, every later miss settled and recorded the forward again (several forwards
    a call) before failing, and warned again."""
    model = _CountedRefusedBranch()
    graphed = cpu_graph(model)
    negative = -torch.rand(3)
    negative[0] = 0.1
    with torch.no_grad():
        graphed(torch.rand(3))
        with pytest.warns(UserWarning, match="takes a path that cannot be recorded"):
            graphed(negative)
        (entry,) = graphed._entries.values()
        assert entry.closed
        calls = model._calls
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _same(graphed(negative), _CountedRefusedBranch()(negative))
        assert model._calls == calls + 1  # (the replay up to its guard runs no Python: one eager forward)


# a state object's replay stopping part way --------------------------------------------------------------------

_SHAPED = torch.library.Library("srigl_test_shaped", "DEF")
_SHAPED.define("positive_rows(Tensor x) -> Tensor")  # (its output's shape follows the values, and no tag says so)
_SHAPED.impl("positive_rows", lambda x: x[x.sum(1) > 0] if bool((x.sum(1) > 0).any()) else x[:1].clone(), "CPU")


class _Cache:
    is_compileable = True

    def __init__(self, length=6, width=3):
        self.keys = torch.zeros(length, width)
        self.position = torch.zeros((), dtype=torch.long)

    def update(self, key):
        self.keys.index_copy_(0, self.position.reshape(1), key.reshape(1, -1))
        self.position.add_(1)
        return self.keys


class _ShapedDecoder(nn.Module):
    def forward(self, x, cache):
        keys = cache.update(x)
        return torch.ops.srigl_test_shaped.positive_rows(keys).sum(0), cache


def test_a_replay_that_updates_a_cache_and_misses_an_op_shape_raises():
    """The replay has written its step into the cache when the op's shape misses: it must say so, not record the
    call again without the cache's snapshot (which runs the step several more times on the caller's cache)."""
    cache = _Cache()
    graphed = cpu_graph(_ShapedDecoder())
    with torch.no_grad():
        graphed(torch.rand(3) + 0.1, cache)  # seen eagerly
        graphed(torch.rand(3) + 0.1, cache)  # recorded (2 positive rows), replayed
        with pytest.raises(ReplayError, match="stopped part way"):
            graphed(torch.rand(3) + 0.1, cache)  # 3 positive rows: the op's shape misses after the update


# a lazy cache's first call is not warned about ----------------------------------------------------------------

class _LazyCache(_Cache):
    def __init__(self):
        super().__init__()
        self.keys = None

    def update(self, key):
        if self.keys is None:
            self.keys = torch.zeros(6, 3)
        return super().update(key)


class _Decoder(nn.Module):
    def forward(self, x, cache):
        return (cache.update(x).sum(0) * x).tanh(), cache


def test_a_lazy_caches_allocating_first_call_gives_no_warning():
    graphed = cpu_graph(_Decoder())
    cache = _LazyCache()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(4):
            graphed(torch.randn(3), cache)
    assert graphed.replays == 2


# an eager signature's recording is not kept for the next cache -------------------------------------------------

class _Deciding(nn.Module):
    def forward(self, x, cache):
        keys = cache.update(x)
        return (keys * 2 if keys.sum() > 0 else keys * 3), cache


def test_an_eager_signatures_recording_goes_with_its_cache():
    """An eager entry (it reads values while updating the cache) replays nothing: kept as an orphan it held a
    forward's buffers (held_bytes) and took the place of one that replays."""
    graphed = cpu_graph(_Deciding())
    cache = _Cache()
    with torch.no_grad(), pytest.warns(UserWarning, match="reads tensor values into Python"):
        for _ in range(3):
            graphed(torch.rand(3), cache)
    (entry,) = graphed._entries.values()
    assert entry.eager
    del cache
    gc.collect()
    assert not graphed._states.entries() and graphed.held_bytes == 0


# every variant is tried before a miss ------------------------------------------------------------------------

class _ThreeWays(nn.Module):
    def forward(self, x):
        total = x.sum()
        if total > 10:
            return x * 2
        if total > 0:
            return x * 3
        return x * 4


def test_an_input_matching_a_middle_variant_replays_it():
    """Only the first and the last variant were tried: an input of the second missed, and was recorded again."""
    graphed = cpu_graph(_ThreeWays())
    big, mid, negative = torch.full((4,), 5.0), torch.full((4,), 1.0), torch.full((4,), -1.0)
    with torch.no_grad():
        for x in (big, mid, negative, mid, big, negative):
            _same(graphed(x), _ThreeWays()(x))
    (entry,) = graphed._entries.values()
    assert len(entry.recordings) == 3 and graphed.guard_misses == 2 and graphed.replays == 6


# another thread's reads are not guards of this thread's recording ---------------------------------------------

_ELSEWHERE = torch.zeros(3)


class _ReadsElsewhere(nn.Module):
    """While its forward records, another thread reads a tensor of its own with ``.tolist()``."""

    def forward(self, x):
        import threading

        reader = threading.Thread(target=_ELSEWHERE.tolist)
        reader.start()
        reader.join()
        return x * 2


def test_values_another_thread_reads_while_a_forward_records_are_no_guards():
    graphed = cpu_graph(_ReadsElsewhere())
    with torch.no_grad():
        for step in range(3):
            _ELSEWHERE.fill_(step)  # (the other thread's tensor changes: no concern of the recording)
            x = torch.randn(2, 3)
            _same(graphed(x), x * 2)
    assert graphed.guard_misses == 0 and graphed.replays == 3


# a state object whose list grows is not steady --------------------------------------------------------------------

class _Logging(_Cache):
    """Appends each step's position to a Python list: a replay would not."""

    def __init__(self):
        super().__init__()
        self.log = []

    def update(self, key):
        self.log.append(len(self.log))
        return super().update(key)


def test_a_state_object_whose_list_grows_runs_eagerly_with_a_warning():
    graphed = cpu_graph(_Decoder())
    cache = _Logging()
    with torch.no_grad(), pytest.warns(UserWarning, match="calls change what the _Logging holds"):
        for _ in range(4):
            graphed(torch.randn(3), cache)
    assert cache.log == [0, 1, 2, 3] and graphed.replays == 0


# a tensor's dtype is part of a state object's structure --------------------------------------------------------

class _TypedCache(_Cache):
    def __init__(self, dtype):
        super().__init__()
        self.keys = self.keys.to(dtype)

    def update(self, key):
        return super().update(key.to(self.keys.dtype))


def test_an_orphan_is_not_adopted_by_a_cache_of_another_dtype():
    """Without dtypes in the structure, a float64 cache adopted a dead float32 cache's recording: its tensors
    became float32 and the steps replayed in float32."""
    graphed = cpu_graph(_Decoder())
    inputs = [torch.randn(3, dtype=torch.float64) for _ in range(4)]
    with torch.no_grad():
        first = _TypedCache(torch.float32)
        for x in inputs:
            graphed(x.float(), first)
        del first
        gc.collect()
        assert graphed._states.entries()
        cache, want_cache = _TypedCache(torch.float64), _TypedCache(torch.float64)
        for x in inputs:
            got, want = graphed(x.float(), cache)[0], _Decoder()(x.float(), want_cache)[0]
            assert got.dtype == want.dtype
            _same(got, want)
    assert cache.keys.dtype == torch.float64
