"""cpu_graph and threads: recordings are shared, one replaying thread at a time (threads that come and go share
one; a thread arriving while every copy replays records another within max_recordings, or runs eagerly); threads
recording at once keep the limit. A lowered model's recording replayed beside its own thread's eager calls:
tests/codegen/test_cpu_graph_lowered.py."""

import threading

import torch
import torch.nn as nn

from srigl_compile import cpu_graph
from tests.models import make_cnn


def _same(got, want):
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_threads_share_recordings_and_record_copies_only_while_every_one_is_busy():
    model = make_cnn().eval()
    graphed = cpu_graph(model)
    inputs = [torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) for seed in range(8)]
    got = {}

    def work(name, xs):
        with torch.no_grad():
            got[name] = [graphed(x) for x in xs]

    threads = [threading.Thread(target=work, args=(name, inputs[i::2])) for i, name in enumerate("ab")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with torch.no_grad():
        for i, name in enumerate("ab"):
            for x, y in zip(inputs[i::2], got[name]):
                _same(y, model(x))
    copies = 1 + len(graphed._spares.get(next(iter(graphed._entries)), []))
    assert len(graphed._entries) == 1 and copies <= 2 and graphed.replays == 8
    for i in range(10):  # a thread per call (a thread-per-request server): the recordings made serve them all
        thread = threading.Thread(target=work, args=(f"t{i}", inputs[:1]))
        thread.start()
        thread.join()
        _same(got[f"t{i}"][0], got["a"][0])
    assert graphed._recordings() == copies and graphed.replays == 18


def test_a_recording_is_replayed_by_one_thread_at_a_time():
    """A replay writes the recording's buffers: a second thread arriving meanwhile records a copy of its own
    (up to max_recordings), or runs eagerly."""
    graphed = cpu_graph(make_cnn().eval(), max_recordings=2)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = graphed(x)
        (entry,) = graphed._entries.values()
        with entry.lock:  # (as if another thread were replaying it)
            _same(graphed(x), want)  # a copy, recorded
            assert graphed._recordings() == 2
            (spare,) = graphed._spares[next(iter(graphed._entries))]
            with spare.lock:
                _same(graphed(x), want)  # both busy and the limit reached: eager
        assert graphed.replays == 2 and graphed._recordings() == 2
        _same(graphed(x), want)
    assert graphed.replays == 3


def test_threads_recording_at_once_keep_the_limit_and_held_bytes_counts_shared_storage_once():
    graphed = cpu_graph(nn.Linear(256, 256), max_recordings=2)

    def call(batch: int) -> None:
        with torch.no_grad():  # (grad mode is per thread)
            graphed(torch.randn(batch, 256))

    threads = [threading.Thread(target=call, args=(batch,)) for batch in range(1, 7)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(len(entry.recordings) for entry in graphed._entries.values()) == 2
    weight_bytes = 256 * 257 * 4
    assert weight_bytes < graphed.held_bytes < 2 * weight_bytes  # (the weights once, not once a recording)
