"""cpu_graph on plain torch models (no TVM): a replay equals an eager forward on new inputs; recordings per input
signature; grad-tracked calls and calls passing objects run eagerly; forwards a replay cannot repeat raise
ReplayError at their first call; recycled results are reused while recording, and a recording takes over the eager
forward's buffers; which input layouts are copied with their strides. Values read into Python (guards):
test_cpu_graph_guards.py; threads: test_cpu_graph_threads.py; state objects (static caches):
test_cpu_graph_state.py; changes to the model that record again: test_cpu_graph_watched.py."""

import copy
import itertools
import warnings

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from srigl_compile import ReplayError, cpu_graph
from srigl_compile.runtime import scratch as scratch_module
from srigl_compile.runtime.call_record import _overlaps, record, static_copy
from srigl_compile.runtime.scratch import result
from tests.models import make_cnn, make_encoder, make_mlp


def _same(got, want):
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("make, shape", [(make_mlp, (3, 20)), (make_cnn, (2, 3, 8, 8)), (make_encoder, (2, 5, 32))])
def test_replays_equal_eager_forwards_on_new_inputs(make, shape):
    model = make().eval()
    graphed = cpu_graph(model)
    with torch.no_grad():
        for seed in range(3):
            x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
            _same(graphed(x), model(x))
    assert graphed.replays == 3 and len(graphed._entries) == 1 and graphed.held_bytes > 0


def test_each_signature_records_once_and_others_run_eagerly_past_the_limit():
    model = make_mlp().eval()
    graphed = cpu_graph(model, max_recordings=2)
    with torch.inference_mode():
        for rows in (1, 2, 1, 2):
            x = torch.randn(rows, 20)
            _same(graphed(x), model(x))
        assert graphed.replays == 4 and len(graphed._entries) == 2
        x = torch.randn(3, 20)  # a third signature: eager, not recorded
        _same(graphed(x), model(x))
        transposed = torch.randn(20, 2).t()  # same shape as a recorded one, other strides: a signature of its own
        _same(graphed(transposed), model(transposed))
    assert graphed.replays == 4 and len(graphed._entries) == 2
    graphed = cpu_graph(model)
    with torch.inference_mode():
        for row in (torch.randn(20), torch.randn(20)):  # expanded inputs (one memory row for all 3): copied contiguous
            _same(graphed(row.expand(3, 20)), model(row.expand(3, 20)))
    assert graphed.replays == 2


class _Sine(nn.Module):
    def forward(self, x):
        return torch.sin(x) * 3


def test_another_dtype_of_a_recorded_shape_records_again():
    """A mutant that left the dtype out of a recording's key passed every test: a float64 input replayed the
    float32 recording and came back float32, 1.2e-4 off."""
    graphed = cpu_graph(_Sine())
    with torch.inference_mode():
        for dtype in (torch.float32, torch.float64, torch.float32, torch.float64):
            x = torch.randn(4, 8, dtype=dtype) * 1e3
            y = graphed(x)
            assert y.dtype == dtype
            torch.testing.assert_close(y, _Sine()(x), rtol=0, atol=0)
    assert len(graphed._entries) == 2 and graphed.replays == 4


def test_a_channels_last_input_of_a_recorded_shape_records_again():
    """A mutant leaving the strides out of a recording's key was caught only by a 3e-8 matmul difference: a
    channels_last input replayed the contiguous recording, and came back contiguous where torch keeps its layout."""
    model = nn.Sequential(nn.ReLU()).eval()
    graphed = cpu_graph(model)
    with torch.inference_mode():
        for _ in range(2):
            graphed(torch.randn(2, 3, 4, 4))
        x = torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last)
        got, want = graphed(x), model(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got.stride() == want.stride() and len(graphed._entries) == 2


class _Counter(nn.Module):
    """Changes from call to call through a plain attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x * self.calls


def test_a_forward_that_changes_from_call_to_call_is_refused_when_recorded():
    """The check of a recording against the eager forward is what refuses such a forward: a mutant that made
    it pass anything passed every test, and the graph replayed x * 2 for ever."""
    graphed = cpu_graph(_Counter())
    with torch.no_grad(), pytest.raises(ReplayError, match="does not match the eager forward"):
        graphed(torch.ones(2, 3))


def test_outputs_are_new_tensors_and_structures_and_kwargs_are_kept():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(6, 8)

        def forward(self, x, *, scale):
            h = self.body(x)
            return {"a": h * scale, "b": (h.relu(), x)}

    model = TwoHeads().eval()
    graphed = cpu_graph(model)
    with torch.no_grad():
        x = torch.randn(2, 6)
        first = graphed(x, scale=3.0)
        second = graphed(x + 1, scale=3.0)
        want = model(x + 1, scale=3.0)
        _same(second["a"], want["a"])
        _same(second["b"][0], want["b"][0])
        _same(second["b"][1], x + 1)
        assert first["a"].data_ptr() != second["a"].data_ptr()
        _same(first["a"], model(x, scale=3.0)["a"])  # not overwritten by the second call
        _same(graphed(x, scale=0.5)["a"], model(x, scale=0.5)["a"])  # another value: another recording
    assert len(graphed._entries) == 2


def test_the_recording_limit_is_named_once():
    graphed = cpu_graph(nn.Linear(4, 4), max_recordings=1)
    with torch.no_grad():
        graphed(torch.randn(1, 4))
        with pytest.warns(UserWarning, match="max_recordings=1 recordings exist; calls of new input signatures"):
            graphed(torch.randn(2, 4))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            graphed(torch.randn(3, 4))


def test_grad_tracked_calls_run_eagerly():
    model = make_mlp().train(False)
    graphed = cpu_graph(model)
    x = torch.randn(2, 20)
    y = graphed(x)  # grad mode on and the parameters require grad: autograd's eager forward
    assert y.requires_grad and graphed.replays == 0 and not graphed._entries
    with torch.no_grad():
        _same(graphed(x), model(x))
    assert graphed.replays == 1


class _Nonzero(nn.Module):
    def forward(self, x):
        return x[x > 0]


class _WritesInput(nn.Module):
    def forward(self, x):
        return x.relu_()


@pytest.mark.parametrize("model, match", [
    (_Nonzero(), r"aten\.(nonzero|index)\..*output shape depends on tensor values"),
    (_WritesInput(), r"writes into its input \(aten\.relu_"),
])
def test_forwards_a_replay_cannot_repeat_are_refused(model, match):
    graphed = cpu_graph(model)
    with torch.no_grad(), pytest.raises(ReplayError, match=match):
        graphed(torch.randn(3, 4))
    assert not graphed._entries


class _RelativeBias(nn.Module):
    """Swin's relative position bias: a table gathered by a long index tensor (its shape fixes the output's)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(7, 4))
        self.register_buffer("index", torch.randint(0, 7, (3, 3)))

    def forward(self, x):
        return x @ self.table[self.index].sum(1).T + self.table[self.index[0], torch.tensor([0, 1, 2])].sum()


def test_a_gather_by_integer_index_tensors_replays():
    model = _RelativeBias()
    graphed = cpu_graph(model)
    with torch.no_grad():
        for seed in range(3):
            x = torch.randn(2, 4, generator=torch.Generator().manual_seed(seed))
            _same(graphed(x), model(x))
    assert graphed.replays == 3 and len(graphed._entries) == 1


def test_forward_hooks_are_named_once_as_running_at_the_recording_only():
    model = make_mlp().eval()
    seen = []
    model[0].register_forward_hook(lambda module, inputs, output: seen.append(output))
    graphed = cpu_graph(model)
    with torch.no_grad():
        with pytest.warns(UserWarning, match=r"forward hooks on \['0'\] run while a forward is recorded"):
            graphed(torch.randn(2, 20))
        calls, x = len(seen), torch.randn(2, 20)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # (said once: this signature is recorded)
            y = graphed(x)
        assert len(seen) == calls, "a replay runs no hook"
        _same(y, model(x))
    assert len(seen) == calls + 1


class _Regrows(nn.Module):
    """Uses a tensor, then gives it other storage and sizes (resize_), then uses it again."""

    def forward(self, x):
        buffer = torch.ones(4)
        y = x + buffer.sum()
        buffer.resize_(8)
        buffer.fill_(2.0)
        return y + buffer.sum()


def test_a_tensor_whose_storage_changes_is_replayed_with_its_new_storage():
    graphed = cpu_graph(_Regrows())
    with torch.no_grad():
        for x in (torch.zeros(3), torch.arange(3.0)):
            _same(graphed(x), x + 20.0)
    assert graphed.replays == 2


def test_inputs_on_other_devices_are_refused_before_anything_is_copied():
    meta = torch.empty(2, 3, device="meta")
    with pytest.raises(ReplayError, match="records CPU models only, got a meta input"):
        record(make_mlp(), (meta,), {})


def test_copies_and_pickles_record_again(tmp_path):
    model = make_cnn().eval()
    graphed = cpu_graph(model)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        graphed(x)
        for other in (copy.deepcopy(graphed), _saved_and_loaded(graphed, tmp_path / "graphed.pt")):
            assert not other._entries and other.replays == 0
            _same(other(x), model(x))
            assert other.replays == 1 and other.model is not model
        _same(graphed(x), model(x))  # the original keeps its recording
    assert graphed.replays == 2 and len(graphed._entries) == 1


def _saved_and_loaded(module, path):
    torch.save(module, path)
    return torch.load(path, weights_only=False)


class _Cache:
    """Holds tensors across calls, as a decoder's key/value cache does."""

    def __init__(self):
        self.keys = []


class _Cached(nn.Module):
    def forward(self, x, cache=None):
        cache = cache if cache is not None else _Cache()
        cache.keys.append(x * 2)
        return x + len(cache.keys), cache


def test_objects_in_and_out_are_not_replayed():
    graphed = cpu_graph(_Cached())
    x = torch.randn(3)
    with torch.no_grad():
        cache = _Cache()
        for calls in (1, 2):  # an object among the inputs: eager, so the cache grows as it should
            y, same = graphed(x, cache)
            assert same is cache and len(cache.keys) == calls and torch.equal(y, x + calls)
        assert not graphed._entries
        with pytest.raises(ReplayError, match="returns a _Cache, which a replay would return as it was recorded"):
            graphed(x)  # an object among the outputs: refused
    assert not graphed._entries and graphed.replays == 0


def test_bad_arguments_are_refused():
    with pytest.raises(ReplayError, match="max_recordings must be >= 1, got 0"):
        cpu_graph(make_mlp(), max_recordings=0)
    with pytest.raises(ReplayError, match=r"takes a torch.nn.Module or its bound forward \(model.forward\), got "
                                          "function"):
        cpu_graph(lambda x: x)
    model = make_mlp()
    with pytest.raises(ReplayError, match="takes a module or its bound forward, got its method extra_repr"):
        cpu_graph(model.extra_repr)
    model.forward = cpu_graph(model.forward)
    with pytest.raises(ReplayError, match="already a cpu_graph's"):
        cpu_graph(model.forward)


class _Results(nn.Module):
    """Four 1-MiB results in a row, each dropped once the next is made: an eager forward recycles one buffer."""

    def forward(self, x):
        for _ in range(4):
            y = result((x.numel(),))
            torch.add(x, 1.0, out=y)
            x = y
        return x.sum()


def test_recycled_results_are_reused_while_recording_and_replayed_in_order():
    scratch_module.release_scratch()
    x = torch.randn(2**18)  # 1 MiB: recycled
    recording = record(_Results(), (x,), {})
    # the static input and two result buffers taking turns (+ the sum), not the input and four results
    assert recording.held_bytes <= 3 * x.nbytes + 64
    other = torch.randn(2**18)
    _same(recording.replay([other]), _Results()(other))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4), st.integers(0, 12)), min_size=1, max_size=4))
def test_layouts_whose_elements_share_memory_are_seen(dims):
    """Sound: a layout where two elements share memory is always flagged (it may flag a few that do not: they are
    then copied contiguous, which is only slower)."""
    sizes, strides = zip(*dims)
    tensor = torch.zeros(1 + sum((n - 1) * s for n, s in dims)).as_strided(sizes, strides)
    offsets = [sum(i * s for i, s in zip(index, strides)) for index in itertools.product(*map(range, sizes))]
    if len(set(offsets)) < len(offsets):
        assert _overlaps(tensor)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=4), st.randoms(use_true_random=False), st.integers(0, 3))
def test_permuted_and_sliced_layouts_are_copied_with_their_strides(sizes, rng, step):
    order = list(range(len(sizes)))
    rng.shuffle(order)
    tensor = torch.randn(sizes).permute(order)
    if step:  # every step-th element of the last dimension: gaps, no overlap
        tensor = tensor[..., ::step]
    assert not _overlaps(tensor)
    copy = static_copy(tensor)
    assert copy.stride() == tensor.stride() and torch.equal(copy, tensor)


def test_recording_adds_no_kernel_buffers_to_the_eager_forward_s():
    scratch_module.release_scratch()
    model, x = _Results(), torch.randn(2**18)
    with torch.no_grad():
        model(x)
        eager = scratch_module.scratch_bytes()
        y = cpu_graph(model)(x)  # settles, probes eagerly, records, checks, replays
        assert scratch_module.scratch_bytes() == eager  # the recording took over the eager forward's buffers
        _same(y, model(x))  # (an eager forward now allocates its own: the recording holds those)


def test_recording_inside_a_recording_is_refused_and_a_graph_inside_one_runs_eagerly():
    class Records(nn.Module):
        def forward(self, x):
            return record(torch.relu, (x,), {})  # (a forward that records: refused while it is recorded)

    with pytest.raises(ReplayError, match="inside a forward this thread is recording"):
        record(Records(), (torch.randn(3),), {})
    inner = make_mlp()
    outer = cpu_graph(nn.Sequential(cpu_graph(inner), nn.ReLU()))
    with torch.no_grad():
        for seed in range(2):
            x = torch.randn(3, 20, generator=torch.Generator().manual_seed(seed))
            _same(outer(x), torch.relu(inner(x)))
    assert outer.replays == 2  # (while the outer graph recorded, the inner one ran its model eagerly)


def test_torch_compile_runs_a_cpu_graph_as_it_is():
    """Compiled, a CpuGraph graph-broke into recompiles, and with fullgraph=True failed in dynamo's own terms (an
    RLock, a data-dependent guard). torch.compile now leaves its forward to replay."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    graphed = cpu_graph(model)
    compiled = torch.compile(graphed)
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(3, 8)
            _same(compiled(x), model(x))
        assert graphed.replays == 3
    assert not torch._dynamo.utils.counters["stats"]["unique_graphs"]  # (nothing of it traced)


class _Constants(nn.Module):
    """Tensors made from plain values: one only read (a replay need not make it again), one then updated in place
    from the input (each replay must make it again)."""

    def forward(self, x):
        steps = torch.arange(x.shape[-1], dtype=x.dtype)
        total = torch.zeros(x.shape[-1])
        total.add_(x.sum(0))
        return x * steps + total


def test_constants_a_replay_would_write_again_are_left_out_and_the_rest_kept():
    from srigl_compile.runtime.call_record import _Call

    graphed = cpu_graph(_Constants())
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(3, 5)
            _same(graphed(x), x * torch.arange(5.0) + x.sum(0))
    recorded = [str(call.fn) for call in next(iter(graphed._entries.values())).recording.calls]
    assert not any("arange" in name for name in recorded) and any("zeros" in name for name in recorded), recorded
    drawn = torch.rand(3)  # (a seeded random op is never a constant: each replay draws again)
    assert not _Call(torch.ops.aten.rand.default, ([3],), {}, (drawn,)).constant()
    assert _Call(torch.ops.aten.arange.default, (3,), {}, (torch.arange(3),)).constant()
