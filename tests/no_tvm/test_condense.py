"""condense(): condensed layers equal the masked model; ablated neurons are removed where allowed, kept where not."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from srigl_compile import LayerError, SRigLConfig, condense, sparse_layers, sparsify
from srigl_compile.nn.condensed import CondensedConv, CondensedLinear
from tests.helpers import ablate, assert_same, randomize_bn
from tests.models import Block, ReadsAWeight, ResidualCNN
from tests.models import condense_mlp as mlp


@pytest.mark.parametrize("batch", [1, 7, 64])
@pytest.mark.parametrize("bias", [True, False])
def test_mlp_with_ablated_neurons_shrinks_and_matches(batch, bias):
    torch.manual_seed(0)
    masked = sparsify(mlp(bias), SRigLConfig(sparsity=0.8, seed=1))
    ablate(masked, {"0": [1, 5, 7], "3": [0, 10]}, {("0", 5): -0.5, ("0", 7): 0.7} if bias else None)
    condensed = condense(masked)
    first, second, last = condensed[0], condensed[3], condensed[5]
    assert isinstance(first, CondensedLinear) and first.compact and first.n_active == 61
    assert second.compact and second.fan_in == 61 and second.n_active == 46
    assert not last.compact and last.fan_in == 46, "the model output keeps its width"
    assert_same(condensed, masked, torch.randn(batch, 32))


def test_condensed_arrays_are_sorted_rows_of_the_mask():
    masked = sparsify(nn.Sequential(nn.Linear(40000, 4)), SRigLConfig(sparsity=0.999, seed=3))
    layer = dict(sparse_layers(masked))["0"]
    condensed = condense(masked)[0]
    assert condensed.indices.dtype == torch.int32, "fan-in 40000 does not fit int16"
    assert torch.all(condensed.indices[:, 1:] > condensed.indices[:, :-1])
    rows = layer.mask.nonzero()
    assert torch.equal(condensed.indices.long().reshape(-1), rows[:, 1])
    assert torch.equal(condensed.values.reshape(-1), layer.weight.detach()[layer.mask])
    small = condense(sparsify(nn.Sequential(nn.Linear(64, 4)), SRigLConfig(0.5)))[0]
    assert small.indices.dtype == torch.int16


def test_k_equal_one_layers():
    masked = sparsify(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3)),
                      SRigLConfig(sparsity=0.9375, distribution="uniform"))
    condensed = condense(masked)
    assert condensed[0].k == 1
    assert_same(condensed, masked, torch.randn(5, 16))


def test_cnn_with_batchnorm_and_residuals():
    torch.manual_seed(0)
    masked = randomize_bn(sparsify(ResidualCNN(), SRigLConfig(sparsity=0.8, seed=2)))
    # expand -> BN -> relu -> project (1x1, no padding): removable with relu(BN(bias)) folded.
    # spatial -> BN -> relu -> mix (3x3, padded): removable only where the folded constant is exactly 0.
    # stem / project feed the residual add: kept.
    ablate(masked, {"expand": [0, 3, 9], "spatial": [2, 4], "stem": [1], "project": [0], "mix": [5]})
    with torch.no_grad():
        masked.bn3.bias[2], masked.bn3.bias[4] = -3.0, -3.0  # relu(BN(bias)) = 0 for both spatial rows
        masked.bn3.running_mean[2:5:2] = 0.0
    condensed = condense(masked)
    assert isinstance(condensed.expand, CondensedConv) and condensed.expand.compact
    assert condensed.bn1.num_features == 29 and condensed.project.in_channels == 29
    assert condensed.spatial.compact and condensed.bn3.num_features == 22 and condensed.mix.in_channels == 22
    assert not condensed.stem.compact and not condensed.project.compact, "widths into a residual add are kept"
    assert not condensed.mix.compact, "mix feeds a depthwise conv: grouped consumers keep the width"
    for batch in (1, 3):
        assert_same(condensed, masked, torch.randn(batch, 3, 8, 8))


class _SharedConsumer(nn.Module):
    """``block`` is called twice: on the stem's output, then on its own full-width output."""

    def __init__(self, conv: bool) -> None:
        super().__init__()
        make = (lambda i, o: nn.Conv2d(i, o, 1)) if conv else nn.Linear
        self.conv, self.stem, self.block, self.out = conv, make(16, 32), make(32, 32), nn.Linear(32, 10)

    def forward(self, x):
        h = F.relu(self.block(F.relu(self.block(F.relu(self.stem(x))))))
        return self.out(h.mean((2, 3)) if self.conv else h)


@pytest.mark.parametrize("conv", [True, False])
def test_ablated_neurons_stay_when_their_consumer_is_called_again_elsewhere(conv):
    """Cutting the shared consumer's inputs would break its other call (found by probing torchvision-like
    models: condense gave wrong outputs, lower a model that failed on every call)."""
    torch.manual_seed(0)
    masked = sparsify(_SharedConsumer(conv), SRigLConfig(sparsity=0.5, distribution="uniform")).eval()
    with torch.no_grad():
        masked.stem.bias.uniform_(0.5, 1.0)  # the ablated neurons output relu(bias) > 0: a constant to fold
    ablate(masked, {"stem": list(range(0, 32, 4))})
    condensed = condense(masked)
    assert not condensed.stem.compact, "the stem keeps its ablated neurons"
    assert (condensed.block.in_channels if conv else condensed.block.in_features) == 32
    assert_same(condensed, masked, torch.randn(2, 16, 4, 4) if conv else torch.randn(3, 16))


class _SharedBatchNorm(nn.Module):
    """One BatchNorm normalises two convolutions' outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.ca, self.cb = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.ca(torch.relu(self.bn(self.a(x)))) + self.cb(torch.relu(self.bn(self.b(x))))


def test_a_batchnorm_shared_by_two_producers_keeps_its_channels():
    """A mutant that let one producer's ablated neurons take their channels out of a BatchNorm also called for
    another producer passed every test: the other call then failed (running_mean has 8 elements, not 6)."""
    torch.manual_seed(0)
    masked = randomize_bn(sparsify(_SharedBatchNorm(), SRigLConfig(sparsity=0.5, seed=1))).eval()
    ablate(masked, {"a": [1, 2]})
    condensed = condense(masked)
    assert condensed.bn.num_features == 8 and condensed.ca.in_channels == 8
    assert_same(condensed, masked, torch.randn(2, 3, 6, 6))


@pytest.mark.parametrize("capture", ["symbolic_trace", "export"])
def test_a_layer_whose_weight_the_forward_computes_with_stays_masked(capture):
    from srigl_compile.passes.graph_capture import capture_graph

    torch.manual_seed(0)
    x = torch.randn(3, 16)
    example = dict(example_inputs=(x,)) if capture == "export" else {}
    masked = sparsify(ReadsAWeight(capture == "export"), SRigLConfig(sparsity=0.75, distribution="uniform"),
                      **example).eval()
    assert capture_graph(masked, x).method == capture
    with pytest.warns(UserWarning, match=r"reads the weight of \['fc'\] itself"):
        condensed = condense(masked, **example)
    assert type(condensed.fc) is type(masked.fc), "kept masked: its dense weight is what the forward reads"
    assert isinstance(condensed.a, CondensedLinear) and isinstance(condensed.head, CondensedLinear)
    assert_same(condensed, masked, x)


def test_padded_consumer_keeps_a_nonzero_constant():
    torch.manual_seed(0)
    masked = randomize_bn(sparsify(ResidualCNN(), SRigLConfig(sparsity=0.8, seed=2)))
    ablate(masked, {"spatial": [2]})
    with torch.no_grad():
        masked.bn3.bias[2], masked.bn3.running_mean[2] = 2.0, 0.0  # relu(BN(bias)) > 0: not foldable at borders
    condensed = condense(masked)
    assert not condensed.spatial.compact and condensed.mix.in_channels == 24
    assert_same(condensed, masked, torch.randn(2, 3, 8, 8))


def test_conv1d_and_strided_dilated_convs():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(4, 8, 5, stride=2, padding=2, dilation=1), nn.ReLU(),
                        nn.Conv1d(8, 8, 3, dilation=2, groups=2, padding_mode="circular", padding=2))
    masked = sparsify(net, SRigLConfig(sparsity=0.6))
    assert_same(condense(masked), masked, torch.randn(3, 4, 17))
    net2 = nn.Sequential(nn.Conv2d(3, 6, (3, 5), stride=(2, 1), padding="same" if False else (1, 2)),
                         nn.Conv2d(6, 6, 3, padding="same", dilation=2))
    masked2 = sparsify(net2, SRigLConfig(sparsity=0.7))
    assert_same(condense(masked2), masked2, torch.randn(2, 3, 9, 11))


def test_transformer_block_shrinks_the_mlp_only():
    torch.manual_seed(0)
    masked = sparsify(Block(), SRigLConfig(sparsity=0.8, distribution="uniform"))
    ablate(masked, {"fc1": [3, 7], "qkv": [0, 40], "fc2": [1]}, {("fc1", 3): 0.9})
    condensed = condense(masked)
    assert condensed.fc1.compact and condensed.fc2.fan_in == 62
    assert not condensed.qkv.compact, "qkv is reshaped into heads"
    assert not condensed.fc2.compact, "fc2 writes the residual stream"
    assert_same(condensed, masked, torch.randn(2, 5, 32))


def test_hf_bert_condenses_through_torch_export():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=3)
    torch.manual_seed(0)
    bert = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(0, 100, (2, 7))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    masked = sparsify(bert, SRigLConfig(sparsity=0.8, distribution="uniform"), example_inputs=inputs)
    inter_name = "bert.encoder.layer.0.intermediate.dense"
    ablate(masked, {inter_name: [2, 9], "bert.encoder.layer.1.attention.self.query": [4]}, {(inter_name, 2): 0.8})
    condensed = condense(masked, example_inputs=inputs)
    inter = condensed.bert.encoder.layer[0].intermediate.dense
    assert inter.compact and condensed.bert.encoder.layer[0].output.dense.fan_in == 62
    assert not condensed.bert.encoder.layer[1].attention.self.query.compact
    masked.eval()
    torch.testing.assert_close(condensed(**inputs).logits, masked(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_condense_errors():
    with pytest.raises(LayerError, match="no sparse layers"):
        condense(mlp())
    rigl_like = sparsify(mlp(), SRigLConfig(sparsity=0.8))
    layer = dict(sparse_layers(rigl_like))["0"]
    with torch.no_grad():
        layer.mask[0, :] = True
    with pytest.raises(LayerError, match="not constant fan-in"):
        condense(rigl_like)
    condensed = condense(sparsify(mlp(), SRigLConfig(sparsity=0.8)))
    with pytest.raises(LayerError, match=r"already condensed or lowered \(layers \['0'"):
        sparsify(condensed, SRigLConfig(sparsity=0.8))  # (its dense layers would be sparsified beside them)


def test_weights_outside_the_masks_are_refused_before_anything_changes():
    """An EMA of a sparse run averages weights trained under other masks: condensing used to drop them silently
    (a probe saw logits off by 0.5)."""
    masked = sparsify(mlp(), SRigLConfig(sparsity=0.8))
    layer = dict(sparse_layers(masked))["3"]
    with torch.no_grad():
        layer.weight[~layer.mask] = 0.01 * torch.randn(int((~layer.mask).sum()))
    before = {name: tensor.clone() for name, tensor in masked.state_dict().items()}
    with pytest.raises(LayerError, match=r"layers \['3'\] have non-zero weights outside their masks \('3': \d+, "
                                         r"largest .*layer.apply_mask_\(\)"):
        condense(masked, inplace=True)
    assert all(torch.equal(before[name], tensor) for name, tensor in masked.state_dict().items())
    assert isinstance(masked[3], nn.Linear) and not isinstance(masked[3], CondensedLinear)
    layer.apply_mask_()  # (the model the masks describe)
    assert_same(condense(masked), masked, torch.randn(4, 32))


def test_masks_merged_by_an_average_of_buffers_name_it():
    """AveragedModel(use_buffers=True) averages the bool masks too: EMA's lerp leaves every mask it saw."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    runs = [sparsify(mlp(), SRigLConfig(sparsity=0.8, seed=seed)) for seed in (1, 2)]
    average = AveragedModel(runs[0], multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    for run in runs:
        average.update_parameters(run)
    with pytest.raises(LayerError, match=r"not constant fan-in .*AveragedModel\(use_buffers=True\), merges every mask"):
        condense(average.module)


def test_condense_without_shrink_keeps_full_width():
    masked = ablate(sparsify(mlp(), SRigLConfig(sparsity=0.8)), {"0": [1, 2]})
    condensed = condense(masked, shrink=False)
    assert not condensed[0].compact and condensed[3].fan_in == 64
    assert_same(condensed, masked, torch.randn(4, 32))


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_attention_condenses(batch_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    x = torch.randn(3, 6, 32) if batch_first else torch.randn(6, 3, 32)
    masked = sparsify(encoder, SRigLConfig(sparsity=0.8, distribution="uniform"), example_inputs=(x,))
    ablate(masked, {"layers.0.self_attn.in_proj": [3, 40], "layers.0.linear1": [5]})
    condensed = condense(masked, example_inputs=(x,))
    from srigl_compile.nn.condensed_attention import CondensedMultiheadAttention

    attention = condensed.layers[0].self_attn
    assert isinstance(attention, CondensedMultiheadAttention)
    assert isinstance(attention.q_proj, CondensedLinear) and isinstance(attention.out_proj, CondensedLinear)
    assert condensed.layers[0].linear1.compact, "linear1 -> relu -> linear2 sheds its ablated neuron"
    padding = torch.zeros(3, 6, dtype=torch.bool)
    padding[0, 4:] = True
    masked.eval()
    condensed.eval()
    with torch.no_grad():
        torch.testing.assert_close(condensed(x), masked(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(condensed(x, src_key_padding_mask=padding), masked(x, src_key_padding_mask=padding),
                                   rtol=1e-5, atol=1e-5)
        causal = nn.Transformer.generate_square_subsequent_mask(6)
        torch.testing.assert_close(condensed(x, mask=causal), masked(x, mask=causal), rtol=1e-5, atol=1e-5)


def test_condensed_attention_returns_the_same_weights():
    from srigl_compile.nn.condensed_attention import CondensedMultiheadAttention

    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    cond = CondensedMultiheadAttention.from_attention(mha)
    q, kv = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    for average in (True, False):
        expected = mha(q, kv, kv, key_padding_mask=pad, average_attn_weights=average)
        got = cond(q, kv, kv, key_padding_mask=pad, average_attn_weights=average)
        torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(2, 1)),
    nn.Conv2d(4, 4, 3, padding="same", dilation=2, groups=2), nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
    nn.Conv1d(3, 4, 5, stride=2, padding=2, dilation=2), nn.Conv2d(3, 4, 4, padding="same"),
])
def test_im2col_rows_equal_unfold_columns(conv):
    layer = condense(sparsify(nn.Sequential(conv), SRigLConfig(sparsity=0.5, distribution="uniform")))[0]
    x = torch.randn(2, conv.in_channels, 9, 11) if isinstance(conv, nn.Conv2d) else torch.randn(2, conv.in_channels, 13)
    columns, spatial = layer.im2col(x)
    rows, spatial_rows = layer.im2col_rows(x)
    assert spatial == spatial_rows
    torch.testing.assert_close(rows, columns.transpose(1, 2).reshape(rows.shape), rtol=0, atol=0)


def test_condensed_weight_is_a_dataless_stand_in_that_fails_loudly():
    """Model code may inspect ``layer.weight`` (its dtype, shape); the dense values are gone, so it is a stand-in:
    reading its shape, dtype and device works, computing with it raises (never garbage numbers)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Conv1d(8, 6, 3, groups=2))
    sparse = sparsify(nn.Sequential(net[0], net[1]), SRigLConfig(sparsity=0.5))
    linear = condense(sparse)[0]
    assert linear.weight.shape == (8, 12) and linear.weight.dtype == torch.float32
    assert linear.weight.device == torch.device("cpu") and "weight" not in linear.state_dict()
    for misuse in (lambda w: F.linear(torch.randn(2, 12), w), lambda w: w + 1, lambda w: w.sum(), lambda w: w.t()):
        with pytest.raises(LayerError, match="no dense weight"):
            misuse(linear.weight)
    conv = condense(sparsify(nn.Sequential(nn.Conv1d(8, 6, 3, groups=2)), SRigLConfig(sparsity=0.5)))[0]
    assert conv.weight.shape == (6, 4, 3)


def test_a_hand_built_condensed_layer_takes_any_integer_indices_in_range_and_refuses_others():
    """Indices are stored in the narrowest dtype addressing every input (what condense makes and the kernels
    take); out-of-range or non-integer indices are a LayerError naming the range, before anything is built."""
    active, values = torch.arange(3), torch.randn(3, 2)
    layer = CondensedLinear(40, 3, active, values, torch.tensor([[0, 5], [1, 39], [2, 3]]))
    assert layer.indices.dtype == torch.int16
    wide = CondensedLinear(40000, 3, active, values, torch.tensor([[0, 5], [1, 39999], [2, 3]]))
    assert wide.indices.dtype == torch.int32 and int(wide.indices.max()) == 39999
    x = torch.randn(2, 40)
    reference = (x[:, layer.indices.long()] * values).sum(-1)
    torch.testing.assert_close(layer(x), reference)
    with pytest.raises(LayerError, match=r"\[0, 40\)"):
        CondensedLinear(40, 3, active, values, torch.tensor([[0, 5], [1, 40], [2, 3]]))
    with pytest.raises(LayerError, match=r"\[0, 40\)"):
        CondensedLinear(40, 3, active, values, torch.tensor([[-1, 5], [1, 4], [2, 3]]))
    with pytest.raises(LayerError, match="integers"):
        CondensedLinear(40, 3, active, values, torch.zeros(3, 2))


class _TokensThenBatchNorm(nn.Module):
    """A Linear over the last dimension of [B, 16, 16] and a BatchNorm1d over dimension 1 (tokens, not features)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn, self.head = nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.fc(x))))


@pytest.mark.parametrize("example", [False, True], ids=["traced", "exported"])
def test_a_linears_ablated_neurons_go_through_a_batchnorm1d_of_its_features(example):
    """Linear -> BatchNorm1d -> ReLU -> Linear (a tabular MLP) kept its ablated neurons: the BatchNorm stopped the
    walk. Where the Linear's output is [batch, features] the BatchNorm is per feature and loses them too; over
    [B, T, F] it normalises T, and the neurons stay."""
    torch.manual_seed(0)
    x = torch.randn(5, 4, 16)
    options = dict(example_inputs=(x,)) if example else {}
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10))
    masked = randomize_bn(sparsify(net, SRigLConfig(sparsity=0.8, seed=1), **options))
    ablate(masked, {"1": [3, 7, 20]}, {("1", 7): 0.9})
    condensed = condense(masked.eval(), **options)
    assert condensed[1].compact and condensed[2].num_features == 125 and condensed[4].fan_in == 125
    assert_same(condensed, masked, x)
    tokens = torch.randn(3, 16, 16)
    masked = randomize_bn(sparsify(_TokensThenBatchNorm(), SRigLConfig(sparsity=0.7, distribution="uniform")))
    ablate(masked, {"fc": [2, 9]})
    condensed = condense(masked.eval(), **(dict(example_inputs=(tokens,)) if example else {}))
    assert not condensed.fc.compact and condensed.bn.num_features == 16
    assert_same(condensed, masked, tokens)


def test_a_fan_in_one_past_int16_keeps_its_last_input():
    """A mutation probe's int16 indices up to fan-in 32769 passed every test (only 64 and 40000 were tried):
    index 32768 wrapped to -32768 and the gather read input 1 in its place (1.85 off)."""
    from srigl_compile.nn.condensed import condensed_arrays, index_dtype_for

    n_in = torch.iinfo(torch.int16).max + 2  # 32769 inputs: the last index, 32768, does not fit int16
    assert index_dtype_for(n_in - 1) == torch.int16 and index_dtype_for(n_in) == torch.int32
    torch.manual_seed(0)
    weight, mask = torch.randn(2, n_in), torch.zeros(2, n_in, dtype=torch.bool)
    mask[0, [0, 32767, 32768]] = mask[1, [5, 100, 32768]] = True
    layer = CondensedLinear(n_in, 2, *condensed_arrays(weight, mask))
    assert int(layer.indices.max()) == n_in - 1
    x = torch.randn(3, n_in)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ (weight * mask).t(), rtol=1e-5, atol=1e-5)
