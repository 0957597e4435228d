"""sparsify on attention models: nn.TransformerEncoder and Hugging Face BERT / ViT / GPT-2, compared with a
masked-dense reference; helpers and models come from test_sparsify_models.py.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from srigl_compile import (
    SRigLConfig,
    SRigLUpdater,
    TraceError,
    condense,
    sparse_layers,
    sparsify,
)
from srigl_compile.nn.masked import MaskedMultiheadAttention, MaskedProjection, is_masked
from srigl_compile.passes.as_linear import AsLinearPass, is_hf_conv1d
from srigl_compile.passes.discover import capture_graph, discover_layers
from tests.helpers import (
    assert_fresh_invariants,
    assert_same_classes,
    assert_training_invariants,
    masked_dense_reference,
)
from tests.models import DECODERS, make_encoder, make_gpt2

# -- 3. nn.TransformerEncoder (torch.export) ----------------------------------------------------------------------


ENCODER_LAYERS = [f"layers.{i}.{n}" for i in range(2) for n in ("self_attn.in_proj", "self_attn.out_proj", "linear1",
                                                                 "linear2")]


def test_transformer_encoder_without_example_inputs_raises_trace_error():
    enc = make_encoder()
    with pytest.raises(TraceError, match="example_inputs") as info:
        sparsify(enc, SRigLConfig(sparsity=0.8))
    assert "TransformerEncoder" in str(info.value)
    assert not any(is_masked(m) for m in enc.modules())


@pytest.fixture(scope="module")
def sparse_encoder():
    enc = make_encoder()
    x = torch.randn(3, 5, 32)
    sparse = sparsify(enc, SRigLConfig(sparsity=0.8, distribution="erk"), example_inputs=(x,))
    return enc, sparse


def test_transformer_encoder_layers_are_sparse(sparse_encoder):
    enc, sparse = sparse_encoder
    layers = assert_fresh_invariants(sparse, ENCODER_LAYERS)
    assert_same_classes(enc, sparse)
    for i in range(2):
        attn = sparse.layers[i].self_attn
        assert isinstance(attn, MaskedMultiheadAttention)
        assert isinstance(attn.in_proj, MaskedProjection)
        assert "in_proj_weight" not in attn._parameters
        assert attn.in_proj_weight is attn.in_proj.weight  # the functional attention reads the masked tensor
        plan = attn.in_proj.srigl_plan
        assert (plan.kind, plan.n_out, plan.fan_in) == ("attention", 96, 32)
    for name, layer in layers.items():
        assert layer.srigl_plan.protected == (name == "layers.1.linear2"), name
    for name, module in sparse.named_modules():
        if isinstance(module, nn.LayerNorm):
            assert not hasattr(module, "mask"), name
    # every parameter appears exactly once (nothing lost or duplicated by moving in_proj_weight)
    assert sum(p.numel() for p in sparse.parameters()) == sum(p.numel() for p in enc.parameters())


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_transformer_encoder_matches_reference_train_eval_and_fast_path(sparse_encoder, monkeypatch):
    enc, sparse = sparse_encoder
    reference = masked_dense_reference(enc, sparse)
    x = torch.randn(4, 6, 32)
    sparse.train(), reference.train()
    torch.testing.assert_close(sparse(x), reference(x))
    sparse.eval(), reference.eval()
    torch.testing.assert_close(sparse(x), reference(x))  # grad enabled: the slow path

    fast_calls = []
    fast_fwd = torch._transformer_encoder_layer_fwd

    def counting(*args, **kwargs):
        fast_calls.append(1)
        return fast_fwd(*args, **kwargs)

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", counting)
    padding = torch.zeros(4, 6, dtype=torch.bool)
    padding[1, 4:] = True
    padding[3, 2:] = True
    with torch.no_grad():
        got, want = sparse(x), reference(x)
        assert len(fast_calls) == 4, "the eval fast path was not taken"
        torch.testing.assert_close(got, want)
        got, want = sparse(x, src_key_padding_mask=padding), reference(x, src_key_padding_mask=padding)
        assert len(fast_calls) == 8
        torch.testing.assert_close(got, want)
    sparse.train()


def test_transformer_encoder_gradients_flow_and_training_keeps_invariants():
    enc = make_encoder(1)
    x = torch.randn(4, 5, 32)
    config = SRigLConfig(sparsity=0.7, distribution="uniform", delta_t=2)
    sparse = sparsify(enc, config, example_inputs=(x,))
    opt = torch.optim.AdamW(sparse.parameters(), lr=1e-2)
    updater = SRigLUpdater(sparse, opt, config, total_steps=8)
    before = {n: l.mask.clone() for n, l in sparse_layers(sparse)}
    target = torch.randn(4, 5, 32)
    updates = []
    for step in range(1, 7):
        opt.zero_grad()
        F.mse_loss(sparse(x), target).backward()
        for name, layer in sparse_layers(sparse):
            assert layer.weight.grad is not None, name
            assert torch.count_nonzero(layer.weight.grad) > 0, name
            assert torch.all(layer.weight.grad[~layer.mask] == 0), name
        opt.step()
        if updater.step():
            updates.append(step)
        assert_training_invariants(sparse)
    assert updates == [2, 4]
    assert any(not torch.equal(before[n], l.mask) for n, l in sparse_layers(sparse))
    sparse.eval()
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), masked_dense_reference(enc, sparse).eval()(x))


class CrossAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, kdim=8, vdim=12, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, q, kv_k, kv_v):
        out, _ = self.attn(q, kv_k, kv_v, need_weights=False)
        return self.head(out)


def test_multihead_attention_separate_q_k_v_projections():
    torch.manual_seed(0)
    net = CrossAttention()
    sparse = sparsify(net, SRigLConfig(sparsity=0.5, distribution="uniform"))
    layers = assert_fresh_invariants(sparse, ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "head"])
    assert {n: layers[n].srigl_plan.fan_in for n in ("attn.q_proj", "attn.k_proj", "attn.v_proj")} == {
        "attn.q_proj": 16, "attn.k_proj": 8, "attn.v_proj": 12}
    assert sparse.attn.k_proj_weight is sparse.attn.k_proj.weight
    q, k, v = torch.randn(2, 3, 16), torch.randn(2, 5, 8), torch.randn(2, 5, 12)
    torch.testing.assert_close(sparse(q, k, v), masked_dense_reference(net, sparse)(q, k, v))


# -- 4. Hugging Face models (torch.export) ----------------------------------------------------------------------


def make_bert(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=100, max_position_embeddings=32, num_labels=3)
    model = transformers.BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (4, 8), generator=g)
    attention = torch.ones(4, 8, dtype=torch.long)
    attention[1, 6:] = 0
    inputs = {"input_ids": ids, "attention_mask": attention}
    return model, inputs, torch.randint(0, 3, (4,), generator=g)


def make_vit(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, num_labels=3)
    model = transformers.ViTForImageClassification(config)
    g = torch.Generator().manual_seed(seed)
    return model, torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 3, (4,), generator=g)


HF = {"bert": make_bert, "vit": make_vit}
HF_CONFIG = SRigLConfig(sparsity=0.6, distribution="uniform", delta_t=2)


def _call(model, inputs, **extra):
    return model(**inputs, **extra) if isinstance(inputs, dict) else model(pixel_values=inputs, **extra)


@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_hf_model_keeps_class_interface_and_matches_reference(kind):
    model, inputs, _ = HF[kind]()
    model.eval()
    with pytest.raises(TraceError, match="example_inputs"):
        sparsify(model, HF_CONFIG)
    sparse = sparsify(model, HF_CONFIG, example_inputs=inputs)
    assert capture_graph(model, inputs).method == "export"
    layers = assert_fresh_invariants(sparse)
    assert_same_classes(model, sparse)
    assert type(sparse) is type(model)

    expected_sparse = {n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)}
    assert set(layers) == expected_sparse  # every Linear (and ViT's patch projection), classifier included
    for name, layer in layers.items():
        assert layer.srigl_plan.protected == (name == "classifier"), name
    first = {c.name for c in discover_layers(model, capture_graph(model, inputs)) if c.is_first}
    assert first == ({f"bert.encoder.layer.0.attention.self.{p}" for p in ("query", "key", "value")}
                     if kind == "bert" else {"vit.embeddings.patch_embeddings.projection"})

    # embeddings, LayerNorms, ViT's cls token and position embeddings: dense and unchanged
    orig_params = dict(model.named_parameters())
    for name, module in sparse.named_modules():
        if isinstance(module, (nn.Embedding, nn.LayerNorm)):
            assert not is_masked(module), name
            for pname, p in module.named_parameters(prefix=name):
                assert torch.equal(p, orig_params[pname]), pname
    for name, p in sparse.named_parameters():
        if "embeddings" in name and "patch_embeddings" not in name:
            assert torch.equal(p, orig_params[name]), name

    out = _call(sparse, inputs)
    assert type(out).__name__ == ("SequenceClassifierOutput" if kind == "bert" else "ImageClassifierOutput")
    assert out.logits.shape == (4, 3)
    reference = masked_dense_reference(model, sparse).eval()
    torch.testing.assert_close(out.logits, _call(reference, inputs).logits)


@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_hf_short_training_loop_keeps_invariants(kind):
    model, inputs, labels = HF[kind]()
    sparse = sparsify(model, HF_CONFIG, example_inputs=inputs)
    sparse.train()
    opt = torch.optim.AdamW(sparse.parameters(), lr=1e-2, weight_decay=0.01)
    updater = SRigLUpdater(sparse, opt, HF_CONFIG, total_steps=8)  # T_end = 6: updates at steps 2 and 4
    before = {n: l.mask.clone() for n, l in sparse_layers(sparse)}
    updates = []
    for step in range(1, 7):
        opt.zero_grad()
        out = _call(sparse, inputs, labels=labels)
        assert torch.isfinite(out.loss)
        out.loss.backward()
        opt.step()
        if updater.step():
            updates.append(step)
        assert_training_invariants(sparse)
    assert updates == [2, 4]
    assert any(not torch.equal(before[n], l.mask) for n, l in sparse_layers(sparse))
    stats = updater.stats()
    assert set(stats["layers"]) == set(before)
    assert stats["layers"]["classifier"]["ablated_neurons"] == 0
    sparse.eval()
    with torch.no_grad():
        torch.testing.assert_close(_call(sparse, inputs).logits,
                                   _call(masked_dense_reference(model, sparse).eval(), inputs).logits)


def test_hf_conv1d_becomes_linear_with_the_same_names_and_outputs():
    gpt, ids = make_gpt2()
    gpt.eval()
    convs = {name: m for name, m in gpt.named_modules() if is_hf_conv1d(m)}
    assert len(convs) == 8  # c_attn, c_proj, mlp.c_fc, mlp.c_proj in each of 2 blocks
    converted = AsLinearPass()(copy.deepcopy(gpt)).module
    for name, conv in convs.items():
        linear = converted.get_submodule(name)
        assert type(linear) is nn.Linear, name
        assert torch.equal(linear.weight, conv.weight.t()) and torch.equal(linear.bias, conv.bias), name
    assert list(converted.state_dict()) == list(gpt.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(converted(input_ids=ids).logits, gpt(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_hf_conv1d_sharing_its_weight_is_left_alone(caplog):
    transformers = pytest.importorskip("transformers")
    net = nn.Sequential(transformers.pytorch_utils.Conv1D(6, 4), nn.ReLU(), transformers.pytorch_utils.Conv1D(6, 4))
    net[2].weight = net[0].weight
    with caplog.at_level("WARNING"):
        kept = AsLinearPass()(net).module
    assert is_hf_conv1d(kept[0]) and is_hf_conv1d(kept[2])
    assert "shares its weight" in caplog.text


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_hf_decoder_with_its_cache_on_sparsifies_and_trains(kind):
    """Decoder LMs return a key/value cache (a DynamicCache torch.export cannot flatten): the graph is captured on
    the output's tensors, so use_cache need not be turned off. GPT-2's Conv1D projections become masked Linears;
    its lm_head is tied to the token embedding and stays dense, with a warning."""
    model, ids = DECODERS[kind]()
    config = SRigLConfig(sparsity=0.6, distribution="uniform", delta_t=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparse = sparsify(model, config, example_inputs={"input_ids": ids})
    layers = assert_fresh_invariants(sparse)
    linear_model = AsLinearPass()(copy.deepcopy(model)).module
    expected = {name for name, m in linear_model.named_modules() if type(m) is nn.Linear}
    if kind == "gpt2":
        expected.discard("lm_head")
        assert any("lm_head" in str(w.message) and "tied" in str(w.message) for w in caught)
        assert layers["transformer.h.0.attn.c_attn"].weight.shape == (96, 32)  # [out, in], as nn.Linear
    else:
        assert layers["lm_head"].srigl_plan.protected
    assert set(layers) == expected
    assert type(sparse) is type(model)

    sparse.train()
    opt = torch.optim.AdamW(sparse.parameters(), lr=1e-2)
    updater = SRigLUpdater(sparse, opt, config, total_steps=8)
    before = {n: layer.mask.clone() for n, layer in sparse_layers(sparse)}
    for _ in range(6):
        opt.zero_grad()
        out = sparse(input_ids=ids, labels=ids)
        assert torch.isfinite(out.loss)
        out.loss.backward()
        opt.step()
        updater.step()
        assert_training_invariants(sparse)
    assert any(not torch.equal(before[n], layer.mask) for n, layer in sparse_layers(sparse))
    sparse.eval()
    with torch.no_grad():
        torch.testing.assert_close(sparse(input_ids=ids).logits,
                                   masked_dense_reference(linear_model, sparse).eval()(input_ids=ids).logits)


class MaskedDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(16, 2, 32, batch_first=True), 1)

    def forward(self, tgt, memory, tgt_mask=None, tgt_is_causal=None):
        return self.dec(tgt, memory, tgt_mask=tgt_mask, tgt_is_causal=tgt_is_causal)


def test_decoder_mask_checked_for_causality_gets_a_hint_and_the_flag_works():
    """Given a mask and no causal flag, nn.TransformerDecoder inspects the mask's values, which torch.export
    cannot capture: the error says so and names the flag; with the flag, sparsify works."""
    inputs = {"tgt": torch.randn(2, 5, 16), "memory": torch.randn(2, 6, 16),
              "tgt_mask": nn.Transformer.generate_square_subsequent_mask(5)}
    with pytest.raises(TraceError, match="tgt_is_causal=True"):
        sparsify(MaskedDecoder(), SRigLConfig(sparsity=0.5), example_inputs=inputs)
    sparse = sparsify(MaskedDecoder(), SRigLConfig(sparsity=0.5), example_inputs={**inputs, "tgt_is_causal": True})
    assert "dec.layers.0.linear1" in dict(sparse_layers(sparse))


def test_a_condensed_encoder_takes_a_padding_mask_on_its_valid_tokens():
    """torch's TransformerEncoder (enable_nested_tensor, the default) reads its first layer's packed
    in_proj_weight before its nested-tensor path; with a padding mask the condensed encoder raised AttributeError.
    Condensed, it runs without nested tensors: valid tokens as the masked model's."""
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 2, 64, batch_first=True), 2).eval()
    x, pad = torch.randn(2, 7, 32), torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 4:] = True
    masked = sparsify(encoder, SRigLConfig(sparsity=0.8, distribution="uniform"), example_inputs=(x,)).eval()
    condensed = condense(masked, example_inputs=(x,))
    assert condensed.use_nested_tensor is False and masked.use_nested_tensor is True
    with torch.no_grad():
        want, got = masked(x, src_key_padding_mask=pad), condensed(x, src_key_padding_mask=pad)
    torch.testing.assert_close(got[~pad], want[~pad], rtol=1e-5, atol=1e-5)
