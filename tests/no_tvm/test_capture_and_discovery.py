"""What sparsify can see and what it cannot mask: graph capture of unusual outputs, weights computed by a
parametrization, recurrent layers, models without values (meta device). Each case either works or says why,
with a warning at the caller's line or a typed error."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from srigl_compile import LayerError, SRigLConfig, TraceError, sparse_layers, sparsify
from srigl_compile.passes.graph_capture import capture_graph, output_tensors
from tests.helpers import assert_fresh_invariants, masked_dense_reference
from tests.models import WeightNormAndRNN


class _Cache:  # like a decoder's key/value cache: tensors behind plain attributes
    def __init__(self, keys, values):
        self.layers = [{"keys": keys, "values": values}]
        self.seen = 3


class ReturnsACache(nn.Module):
    """symbolic_trace fails (a branch on a shape) and the output holds an object torch.export cannot flatten."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = self.a(x).relu()
        if x.shape[-1] > 4:
            h = h * 2
        return {"out": self.b(h), "cache": _Cache(h, h + 1)}


def test_output_tensors_walks_containers_and_objects():
    t = [torch.randn(2) for _ in range(4)]
    found = output_tensors({"a": (t[0], [t[1], "text", 3]), "b": _Cache(t[2], t[3]), "m": nn.Linear(2, 2)})
    assert [id(x) for x in found] == [id(x) for x in t]
    assert output_tensors(None) == () and output_tensors(t[0])[0] is t[0]


def test_export_captures_a_model_whose_output_holds_an_object():
    net = ReturnsACache()
    x = torch.randn(3, 8)
    graph = capture_graph(net, x)
    assert graph.method == "export" and {"a.weight", "b.weight"} <= set(graph.consumers)
    sparse = sparsify(net, SRigLConfig(sparsity=0.5), example_inputs=x)
    assert_fresh_invariants(sparse, {"a": 8, "b": 16})
    assert type(sparse(x)["cache"]) is _Cache  # the model itself is untouched by the capture


def test_parametrized_and_recurrent_weights_stay_dense_with_a_warning_at_the_callers_line():
    net = WeightNormAndRNN()
    x = torch.randn(2, 4, 6)
    with pytest.warns(UserWarning) as caught:
        sparse = sparsify(net, SRigLConfig(sparsity=0.5), example_inputs=x)
    messages = {str(w.message): w.filename for w in caught}
    assert any("'conv'" in m and "parametrization" in m for m in messages), list(messages)
    assert any("'rnn'" in m and "LSTM" in m and "no masked form" in m for m in messages), list(messages)
    assert set(messages.values()) == {__file__}  # attributed to this call, not to a line inside the library
    assert [name for name, _ in sparse_layers(sparse)] == ["head"]
    torch.testing.assert_close(sparse(x), masked_dense_reference(net, sparse)(x))


def test_a_lazy_module_not_yet_run_is_a_clear_error_and_sparsifies_once_run():
    """A probe found torch's "uninitialized parameter ... load_state_dict" RuntimeError, naming no layer."""
    net = nn.Sequential(nn.LazyLinear(32), nn.ReLU(), nn.Linear(32, 4))
    with pytest.raises(LayerError, match=r"\['0.weight', '0.bias'\] are uninitialized .*run one forward pass"):
        sparsify(net, SRigLConfig(sparsity=0.9))
    net(torch.randn(2, 16))
    assert [name for name, _ in sparse_layers(sparsify(net, SRigLConfig(sparsity=0.9)))] == ["0", "2"]


def test_a_model_on_the_meta_device_is_a_clear_error():
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    with pytest.raises(LayerError, match="to_empty"):
        sparsify(net, SRigLConfig(sparsity=0.9))


def test_a_decoder_with_dynamic_rope_scaling_is_named_in_the_capture_error():
    """A probe found the hint naming nn.Transformer's masks only, for a Llama whose dynamic RoPE scaling branches
    on the sequence length."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                      rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    model = transformers.LlamaForCausalLM(config).eval()
    with pytest.raises(TraceError, match="dynamic RoPE scaling"):
        sparsify(model, SRigLConfig(sparsity=0.9), example_inputs={"input_ids": torch.randint(0, 200, (1, 8))})
