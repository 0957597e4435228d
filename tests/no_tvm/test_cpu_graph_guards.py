"""cpu_graph's guards (``runtime.value_guards``): values a forward reads into Python (``.item()``, ``bool(tensor)``,
``.tolist()``, ``.numpy()``) are computed again at each replay; an input that reads other values is recorded as
another variant of its signature, or runs eagerly (past the limit, a branch that cannot be recorded, calls that
keep missing); Hugging Face models with attention masks replay; a read no guard can hold names its line."""

import inspect

import numpy as np
import pytest
import torch
import torch.nn as nn

from srigl_compile import ReplayError, cpu_graph


class _ValueDecision(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x * 3


class _Numpy(nn.Module):
    def forward(self, x):
        return torch.from_numpy(np.sin(x.numpy())) + 1


def test_values_read_by_tolist_or_numpy_are_guards_on_the_contents():
    """``.tolist()`` and ``.numpy()`` read values without the dispatcher: a recording replayed the values of its
    own call (``torch.split`` by recorded lengths, numpy's sin of the recorded input). Their contents are guards
    now: a replay on other contents misses, and is recorded as a variant, up to the limit, then runs eagerly."""
    class SplitByLengths(nn.Module):
        def forward(self, x, lengths):
            return torch.stack([part.sum() for part in torch.split(x, lengths.tolist())])

    graphed = cpu_graph(SplitByLengths(), max_recordings=2)
    x = torch.randn(10)
    with torch.no_grad():
        for lengths in ([3, 4, 3], [3, 4, 3], [5, 4, 1], [2, 2, 6], [3, 4, 3]):
            lengths = torch.tensor(lengths)
            torch.testing.assert_close(graphed(x, lengths), SplitByLengths()(x, lengths), rtol=0, atol=0)
    assert (graphed.replays, graphed.guard_misses) == (4, 2)  # ([2, 2, 6]: no recording left, eager)
    numpy_graph = cpu_graph(_Numpy())
    with torch.no_grad():
        for x in (torch.randn(3, 4), torch.randn(3, 4)):
            torch.testing.assert_close(numpy_graph(x), _Numpy()(x), rtol=0, atol=0)
    assert numpy_graph.guard_misses == 1


class _NanRead(nn.Module):
    def forward(self, x):
        value = x.max().item()
        return x * 2 if value == value else x * 3


class _RefusedBranch(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x[x > 0].sum() * torch.ones(3)  # (a boolean-mask index: no replay on this branch)


_SHAPED = torch.library.Library("cpu_graph_shaped", "DEF")
_SHAPED.define("positive_rows(Tensor x) -> Tensor")  # (its output's shape follows the values, and no tag says so)
_SHAPED.impl("positive_rows", lambda x: x[x.sum(1) > 0] if bool((x.sum(1) > 0).any()) else x[:1].clone(), "CPU")


class _ValueShapedOp(nn.Module):
    def forward(self, x):
        return torch.ops.cpu_graph_shaped.positive_rows(x).sum(0)


def test_guards_read_nan_as_nan_and_a_branch_that_cannot_be_recorded_runs_eagerly():
    """A NaN read failed its own guard (NaN != NaN), so its variant's check raised ReplayError; a later input
    taking a branch no recording can hold raised ReplayError on every call, where eager works."""
    nan = torch.rand(3, 4)
    nan[1, 1] = float("nan")
    graphed = cpu_graph(_NanRead())
    with torch.no_grad():
        for x in (torch.rand(3, 4), nan, nan.clone()):
            torch.testing.assert_close(graphed(x), _NanRead()(x), rtol=0, atol=0, equal_nan=True)
    assert (graphed.replays, graphed.guard_misses) == (3, 1)
    graphed = cpu_graph(_RefusedBranch())
    negative = -torch.rand(3)
    negative[0] = 0.1
    with torch.no_grad():
        graphed(torch.rand(3))
        with pytest.warns(UserWarning, match="takes a path that cannot be recorded"):
            torch.testing.assert_close(graphed(negative), _RefusedBranch()(negative), rtol=0, atol=0)
        for x in (negative, torch.rand(3)):  # (closed: misses eager without recording again; hits replayed)
            torch.testing.assert_close(graphed(x), _RefusedBranch()(x), rtol=0, atol=0)
    assert (graphed.replays, graphed.guard_misses) == (2, 2)


def test_an_op_whose_result_changes_shape_misses_like_a_guard():
    """Its new result was copied into the recorded one: broadcast silently, or a raw size error."""
    graphed = cpu_graph(_ValueShapedOp())
    three = torch.tensor([[1.0, 2, 3, 4], [1, 1, 1, 1], [2, 2, 2, 2], [-5, -5, -5, -5]])
    with torch.no_grad():
        for x in (three, -three.abs(), three[[0, 1, 3, 3]], three):
            torch.testing.assert_close(graphed(x), _ValueShapedOp()(x), rtol=0, atol=0)
    assert (graphed.replays, graphed.guard_misses) == (4, 2)


def test_calls_that_keep_missing_at_the_limit_run_eagerly_without_trying_replays():
    """Past the limit, a miss replayed every recording up to its failing guard first (9x eager in the probe)."""
    from srigl_compile.nn import cpu_graph as cpu_graph_module

    graphed = cpu_graph(_NanRead(), max_recordings=1)
    with torch.no_grad():
        graphed(torch.rand(3, 4))
        (entry,) = graphed._entries.values()
        nan = torch.full((3, 4), float("nan"))
        for call in range(cpu_graph_module.MISSES_BEFORE_EAGER):
            assert not entry.eager
            graphed(nan)
        assert entry.eager and graphed.guard_misses == cpu_graph_module.MISSES_BEFORE_EAGER
        graphed(torch.rand(3, 4))  # (eager now: no replay)
    assert graphed.replays == 1 and graphed.guard_misses == cpu_graph_module.MISSES_BEFORE_EAGER


@pytest.mark.parametrize("max_recordings", [8, 1])
def test_values_read_into_python_are_guards_and_a_miss_records_another_variant(max_recordings):
    """``x.sum() > 0`` decides the path: recorded on a positive sum, a call on a negative one misses the guard (a
    replay would take the recorded path) and is recorded as a second variant of the signature, or, with no
    recording left, runs eagerly; the check's flipped input keeps the sum."""
    graphed = cpu_graph(_ValueDecision(), max_recordings=max_recordings)
    positive = torch.rand(3, 4)
    with torch.no_grad():
        for x in (positive, positive + 1, -positive, positive, -positive - 1):
            torch.testing.assert_close(graphed(x), x * 2 if x.sum() > 0 else x * 3, rtol=0, atol=0)
    (entry,) = graphed._entries.values()
    if max_recordings == 1:
        assert (graphed.replays, graphed.guard_misses, len(entry.recordings)) == (3, 2, 1)
    else:
        assert (graphed.replays, graphed.guard_misses, len(entry.recordings)) == (5, 1, 2)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_hugging_face_models_with_attention_masks_replay(name):
    """Their mask code decides on tensor values (``.item()`` in transformers' masking utils): a full and a padded
    mask are two variants of one signature, each replayed."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "bert":
        config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64)
        model, options = transformers.BertModel(config).eval(), {}
    else:
        config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          num_key_value_heads=2, intermediate_size=64)
        model, options = transformers.LlamaForCausalLM(config).eval(), {"use_cache": False}
    graphed = cpu_graph(model)
    ids = torch.randint(0, 100, (2, 12))
    full = torch.ones(2, 12, dtype=torch.long)
    padded = full.clone()
    padded[1, 8:] = 0
    with torch.no_grad():
        for mask in (full, full, padded, padded, full):
            want = model(input_ids=ids, attention_mask=mask, **options)[0]
            torch.testing.assert_close(graphed(input_ids=ids, attention_mask=mask, **options)[0], want, rtol=0,
                                       atol=0)
    (entry,) = graphed._entries.values()
    assert (graphed.replays, graphed.guard_misses, len(entry.recordings)) == (5, 1, 2)


_LIB = torch.library.Library("cpu_graph_test", "DEF")
_LIB.define("positive_rows(Tensor x) -> int[]")  # (an op returning values, not tensors, and no plain value)
_LIB.impl("positive_rows", lambda x: [int(i) for i in (x.sum(1) > 0).nonzero().flatten()], "CPU")


class _ReadsAList(nn.Module):
    def forward(self, x):
        return x * len(torch.ops.cpu_graph_test.positive_rows(x))


def test_a_value_read_that_is_no_plain_value_is_refused_naming_its_line():
    graphed = cpu_graph(_ReadsAList())
    line = inspect.getsourcelines(_ReadsAList.forward)[1] + 1
    words = rf"reads a tensor's value into Python .*test_cpu_graph_guards\.py:{line}: return x \* len"
    with torch.no_grad(), pytest.raises(ReplayError, match=words):
        graphed(torch.randn(3, 4))
