"""cpu_graph with state objects (``runtime.state_objects``): a static key/value cache among the arguments is
updated by each replay exactly as by an eager call, and only while it holds the tensors a recording was made with;
``model.forward = cpu_graph(model.forward)`` makes ``generate()`` replay; functional ops replay through their out=
overloads, bit for bit."""

import contextlib
import copy
import gc

import pytest
import torch
import torch.nn as nn

from srigl_compile import ReplayError, cpu_graph
from srigl_compile.runtime.call_record import record
from srigl_compile.runtime.state_objects import Layout, Snapshot


class _StaticCache:
    """Keys written at a position counter, in place: the shape of Hugging Face's StaticCache."""

    is_compileable = True

    def __init__(self, length=6, width=3, lazy=False, inference=False):
        self.length, self.width = length, width
        self.keys = None if lazy else torch.zeros(length, width)
        self.position = torch.zeros((), dtype=torch.long)
        if inference:
            with torch.inference_mode():
                self.keys, self.position = torch.zeros(length, width), torch.zeros((), dtype=torch.long)

    def update(self, key):
        if self.keys is None:  # (allocated by the first call, as transformers' lazy layers do)
            self.keys = torch.zeros(self.length, self.width)
        self.keys.index_copy_(0, self.position.reshape(1), key.reshape(1, -1))
        self.position.add_(1)
        return self.keys


class _Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(3, 3)

    def forward(self, x, cache):
        keys = cache.update(self.proj(x))
        return (keys.sum(0) * x).tanh(), cache


def _steps(model, cache, inputs):
    outs = []
    with torch.no_grad():
        for x in inputs:
            y, same = model(x, cache)
            assert same is cache
            outs.append(y)
    return outs


@pytest.mark.parametrize("lazy", [False, True])
def test_each_replay_advances_the_cache_by_one_step_as_an_eager_call_does(lazy):
    inputs = [torch.randn(3) for _ in range(6)]
    model = _Decoder().eval()
    want_cache, got_cache = _StaticCache(lazy=lazy), _StaticCache(lazy=lazy)
    want = _steps(model, want_cache, inputs)
    graphed = cpu_graph(model)
    got = _steps(graphed, got_cache, inputs)
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(got_cache.keys, want_cache.keys, rtol=0, atol=0)
    assert int(got_cache.position) == 6  # the recording's extra runs (settle, the check) left no trace
    # one call is seen eagerly, the next records (and is answered by a replay), the rest replay; a lazy cache's
    # first call allocates it, so the next one is seen again
    assert graphed.replays == (4 if lazy else 5)


def test_a_cache_holding_other_tensors_is_seen_again_and_never_replayed_into_the_old_ones():
    inputs = [torch.randn(3) for _ in range(8)]
    model = _Decoder().eval()
    want_cache, got_cache = _StaticCache(length=8), _StaticCache(length=8)
    want = _steps(model, want_cache, inputs[:4])
    graphed = cpu_graph(model)
    got = _steps(graphed, got_cache, inputs[:4])
    old = got_cache.keys
    got_cache.keys = old.clone()  # replaced between calls: a recording writing into `old` would go unseen
    want += _steps(model, want_cache, inputs[4:])
    got += _steps(graphed, got_cache, inputs[4:])
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(got_cache.keys, want_cache.keys, rtol=0, atol=0)
    torch.testing.assert_close(old[4:], torch.zeros(4, 3), rtol=0, atol=0)
    assert graphed.replays == 3 + 3  # before the change and after it: one call seen, one recorded, two replayed


def test_a_dead_caches_recording_replays_for_the_next_cache_of_its_structure():
    """generate() makes a cache a call: recording each again cost more than its replays saved. A cache of another
    structure (length) records its own; the orphan waits."""
    inputs = [torch.randn(3) for _ in range(5)]
    model = _Decoder().eval()
    want = _steps(model, _StaticCache(), inputs)
    graphed = cpu_graph(model)
    first = _StaticCache()
    _steps(graphed, first, inputs)
    (recorded,) = graphed._entries.values()
    del first
    gc.collect()
    assert graphed._states.entries() == [recorded] and not graphed._entries
    second = _StaticCache()
    _steps(model, second, inputs[:1])  # (a cache that holds a step: the recording's tensors get its contents)
    own = second.keys
    got = _steps(graphed, second, inputs[1:])
    for a, b in zip(want[1:], got):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the first call is seen eagerly, then the cache holds the recording's tensors and the rest replay
    assert graphed.replays == 4 + 3 and list(graphed._entries.values()) == [recorded] and second.keys is not own
    assert not graphed._states.orphans and int(second.position) == 5
    other = _StaticCache(length=7)
    got = _steps(graphed, other, inputs)
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(graphed._entries) == 2 and recorded in graphed._entries.values()  # (recorded anew, not adopted)
    del second, other
    gc.collect()
    assert len(graphed._states.entries()) == 2 and graphed.held_bytes > 0


def test_a_layout_adopts_only_an_object_of_its_structure_with_rebindable_tensors():
    cache = _StaticCache()
    layout = Layout(cache)
    assert not layout.adopt(Layout(_StaticCache(width=4)))
    aliased = _StaticCache()
    aliased.position = aliased.keys[0, 0]  # (a view of keys: the structure says which tensors share storage)
    assert not layout.adopt(Layout(aliased))
    in_tuple, held = _StaticCache(), _StaticCache()
    in_tuple.keys, held.keys = (torch.zeros(6, 3),), (cache.keys,)
    assert not Layout(held).adopt(Layout(in_tuple))
    new = _StaticCache()
    new.keys.fill_(2.0)
    assert layout.adopt(Layout(new)) and new.keys is cache.keys and new.position is cache.position
    assert bool((cache.keys == 2.0).all()) and layout.holds()


class _Growing(_StaticCache):
    """Claims static tensors but replaces them (as a growing cache would): never replayable."""

    def update(self, key):
        self.keys = torch.cat([self.keys[1:], key.reshape(1, -1)])
        self.position.add_(1)
        return self.keys


def test_a_cache_whose_calls_replace_its_tensors_runs_eagerly_with_a_warning():
    """As beam search's cache reordering does, or a sliding window's Python counter."""
    inputs = [torch.randn(3) for _ in range(4)]
    model = _Decoder().eval()
    want = _steps(model, _Growing(), inputs)
    graphed = cpu_graph(model)
    with pytest.warns(UserWarning, match="calls change what the _Growing holds besides its tensors' contents"):
        got = _steps(graphed, _Growing(), inputs)
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert graphed.replays == 0 and not graphed._entries


def test_a_cache_of_inference_tensors_runs_eagerly():
    inputs = [torch.randn(3) for _ in range(4)]
    model = _Decoder().eval()
    want_cache, got_cache = _StaticCache(inference=True), _StaticCache(inference=True)
    with torch.inference_mode():
        want = _steps(model, want_cache, inputs)
        graphed = cpu_graph(model)
        with pytest.warns(UserWarning, match=r"holds tensors made under torch.inference_mode\(\).*torch.no_grad"):
            got = _steps(graphed, got_cache, inputs)
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert graphed.replays == 0 and int(got_cache.position) == 4


class _Deciding(_Decoder):
    def forward(self, x, cache):
        keys = cache.update(self.proj(x))
        return (keys * 2 if keys.sum() > 0 else keys * 3), cache


def test_a_forward_that_reads_values_while_updating_a_cache_runs_eagerly_with_a_warning():
    """A replay missing a guard would already have updated the cache: such signatures are not replayed."""
    inputs = [torch.randn(3) for _ in range(4)]
    model = _Deciding().eval()
    want_cache, got_cache = _StaticCache(), _StaticCache()
    want = _steps(model, want_cache, inputs)
    graphed = cpu_graph(model)
    with pytest.warns(UserWarning, match="reads tensor values into Python while it updates a _StaticCache"):
        got = _steps(graphed, got_cache, inputs)
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert graphed.replays == 0 and int(got_cache.position) == 4
    (entry,) = graphed._entries.values()  # (eager: claimed without its lock, so threads never queue behind it)
    assert entry.eager and not entry.lock.locked() and not graphed._spares


def test_layouts_see_replaced_tensors_and_values_and_snapshots_undo_calls():
    cache = _StaticCache()
    layout = Layout(cache)
    assert layout.holds()
    snapshot = Snapshot([cache])
    cache.update(torch.ones(3))
    assert layout.holds()  # contents changed only
    cache.width = 4
    assert not layout.holds()
    snapshot.restore()
    assert layout.holds() and int(cache.position) == 0 and not cache.keys.any()
    cache.keys = torch.zeros(6, 3)
    assert not layout.holds()


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _generate(model, ids, new=10, cache=None):
    options = {"cache_implementation": "static"} if cache is None else {"cache": cache}
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                              **options)


def test_generate_with_a_static_cache_replays_its_steps_and_makes_the_same_tokens():
    model = _tiny_llama()
    ids = torch.randint(0, 100, (1, 7))
    want = _generate(model, ids)
    model.forward = graphed = cpu_graph(model.forward)
    assert repr(graphed) == "GraphedForward(LlamaForCausalLM.forward)"
    torch.testing.assert_close(_generate(model, ids), want, rtol=0, atol=0)
    # the prompt allocates the cache, the first step is seen eagerly, the second records: 8 of the 9 steps replay
    assert graphed.graph.replays == 8
    gc.collect()  # generate() made that cache for the call: its recording waits for the next call's cache
    (recorded,) = graphed.graph._states.entries()
    assert not graphed.graph._entries and not graphed.graph._states.layouts
    other = torch.randint(0, 100, (1, 7))
    model.forward = graphed.graph._call  # (the eager forward)
    want_other = _generate(model, other)
    model.forward = graphed
    torch.testing.assert_close(_generate(model, other), want_other, rtol=0, atol=0)
    gc.collect()
    assert graphed.graph.replays == 8 + 8 and graphed.graph._states.entries() == [recorded]  # (not recorded again)
    copied = copy.deepcopy(model)  # (the copy's forward is a graph of its own, on the copied model)
    assert copied.forward.graph.model is copied
    torch.testing.assert_close(_generate(copied, ids), want, rtol=0, atol=0)


def test_a_static_cache_kept_across_generate_calls_keeps_its_recordings():
    transformers = pytest.importorskip("transformers")
    model = _tiny_llama()
    prompts = [torch.randint(0, 100, (1, 7)) for _ in range(3)]
    want = [_generate(model, ids) for ids in prompts]
    model.forward = graphed = cpu_graph(model.forward)
    cache = transformers.StaticCache(config=model.config, max_cache_len=24)
    replays = []
    for number, (ids, tokens) in enumerate(zip(prompts, want)):
        cache.reset()
        # the third prompt records: transformers' mask code reads values while it fills the cache, so it stays eager
        with pytest.warns(UserWarning, match="reads tensor values into Python while it updates a StaticCache") \
                if number == 2 else contextlib.nullcontext():
            torch.testing.assert_close(_generate(model, ids, cache=cache), tokens, rtol=0, atol=0)
        replays.append(graphed.graph.replays)
    # the first call as above; later calls replay their 9 steps (the second prompt is seen again: the first one
    # allocated the cache)
    assert replays == [8, 8 + 9, 8 + 9 + 9]


def test_a_graphed_forward_keeps_its_signature_so_generate_takes_the_same_path():
    """generate() reads the forward's parameters: with (*args, **kwargs) it built no attention mask from pad tokens
    (a left-padded row got other tokens), passed no logits_to_keep, and crashed OPT."""
    import inspect

    model = _tiny_llama()
    original = inspect.signature(model.forward)
    ids = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(3))
    ids[1, :4] = 0  # (left padding with pad_token_id=0, no attention mask given)
    want = _generate(model, ids)
    model.forward = graphed = cpu_graph(model.forward)
    assert inspect.signature(model.forward) == original and model._supports_logits_to_keep()
    torch.testing.assert_close(_generate(model, ids), want, rtol=0, atol=0)
    assert graphed.graph.replays == 8


def test_bound_methods_other_than_forward_and_graphed_forwards_are_refused():
    model = _tiny_llama()
    with pytest.raises(ReplayError, match="got its method generate"):
        cpu_graph(model.generate)


class _Elementwise(nn.Module):
    def forward(self, x):
        return (x * 2 + 1).sin().t()


def test_functional_ops_replay_into_their_results_through_out_overloads():
    x = torch.randn(4, 5)
    with torch.no_grad():
        recording = record(_Elementwise(), (x,), {})
    ops = {str(call.fn): call.into for call in recording.calls}
    assert all(ops[name] is not None for name in ("aten.mul.Tensor", "aten.add.Tensor", "aten.sin.default"))
    y = torch.randn(4, 5)
    torch.testing.assert_close(recording.replay([y]), _Elementwise()(y), rtol=0, atol=0)
