"""lower(target='llvm'): compiled kernels equal the masked model, in every torch mode, and survive save/load."""


import pytest
import torch
import torch.nn as nn

from srigl_compile import (
    CheckpointError,
    LayerError,
    SRigLConfig,
    UnsupportedTargetError,
    condense,
    load_lowered,
    lower,
    save_lowered,
    sparsify,
)
from srigl_compile.nn.lowered import LoweredConv, LoweredLinear
from tests.helpers import ablate, assert_same, randomize_bn
from tests.models import Block, ReadsAWeight, ResidualCNN
from tests.models import condense_mlp as mlp

pytestmark = pytest.mark.tvm


@pytest.mark.parametrize("batch", [1, 2, 3, 8, 9, 15, 16, 37, 48, 49, 256])
def test_mlp_with_ablated_neurons(lowered_mlp, batch):
    masked, lowered = lowered_mlp
    assert isinstance(lowered[0], LoweredLinear) and lowered[0].compact
    assert_same(lowered, masked, torch.randn(batch, 32))


@pytest.mark.parametrize("layer, shape", [(lambda: nn.Linear(64, 32), (3, 64)),
                                          (lambda: nn.Conv2d(8, 16, 3, padding=1), (2, 8, 9, 9))],
                         ids=["linear", "conv2d"])
def test_a_model_that_is_one_sparse_layer(layer, shape, tmp_path):
    """The model is the layer itself (name ""): condense and lower return the replacement layer."""
    torch.manual_seed(0)
    masked = sparsify(layer(), SRigLConfig(sparsity=0.8, seed=1))
    lowered = lower(masked, progress=False)
    assert isinstance(lowered, (LoweredLinear, LoweredConv))
    x = torch.randn(*shape)
    assert_same(lowered, masked, x)
    save_lowered(lowered, tmp_path / "layer")
    assert_same(load_lowered(tmp_path / "layer"), masked, x)


@pytest.mark.parametrize("ablated, filled", [([3, 9], True), (list(range(0, 16, 2)), False)])
@pytest.mark.parametrize("bias", [True, False])
def test_full_width_layer_with_few_ablated_neurons_runs_them_as_zero_rows(ablated, filled, bias):
    torch.manual_seed(0)
    masked = ablate(sparsify(nn.Sequential(nn.Linear(32, 16, bias=bias)), SRigLConfig(sparsity=0.8)),
                    {"0": ablated}, {("0", ablated[0]): 0.7} if bias else None)
    assert condense(masked)[0].n_active == 16 - len(ablated) and not condense(masked)[0].compact, "model output"
    lowered = lower(masked, progress=False)
    assert lowered[0].n_active == (16 if filled else 16 - len(ablated)), "zero rows only for a few ablated"
    for batch in (1, 5, 300):
        assert_same(lowered, masked, torch.randn(batch, 32))


@pytest.mark.parametrize("bias", [True, False])
def test_paper_layer_shape_k_not_a_multiple_of_8(bias):
    masked = sparsify(nn.Sequential(nn.Linear(3072, 768, bias=bias)), SRigLConfig(sparsity=0.9, distribution="uniform"))
    lowered = lower(masked, progress=False)
    assert lowered[0].k == 312, "k = 307 is padded to a multiple of 8"
    for batch in (1, 37, 300):
        assert_same(lowered, masked, torch.randn(batch, 3072), tol=1e-4)


def test_k_equal_one():
    masked = sparsify(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3)),
                      SRigLConfig(sparsity=0.9375, distribution="uniform"))
    lowered = lower(masked, progress=False)
    assert condense(masked)[0].k == 1
    for batch in (1, 33):
        assert_same(lowered, masked, torch.randn(batch, 16))


def test_convolutions_and_cnn_with_batchnorm_residuals():
    torch.manual_seed(0)
    masked = randomize_bn(sparsify(ResidualCNN(), SRigLConfig(sparsity=0.8, seed=2)))
    ablate(masked, {"expand": [0, 3, 9], "stem": [1]})
    lowered = lower(masked, progress=False)
    assert isinstance(lowered.expand, LoweredConv) and lowered.expand.compact
    assert isinstance(lowered.mix, LoweredConv)
    for batch in (1, 3):
        assert_same(lowered, masked, torch.randn(batch, 3, 8, 8))
    depthwise = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 8, 3, stride=2, dilation=2))
    masked_dw = sparsify(depthwise, SRigLConfig(sparsity=0.6, distribution="uniform"))
    lowered_dw = lower(masked_dw, progress=False)
    assert isinstance(lowered_dw[0], LoweredConv) and lowered_dw[0].k == 8, "k = 3 of 9, padded to 8"
    assert_same(lowered_dw, masked_dw, torch.randn(2, 8, 9, 9))
    net = nn.Sequential(nn.Conv1d(4, 8, 5, stride=2, padding=2), nn.ReLU(), nn.Conv1d(8, 8, 3, groups=2))
    masked1d = sparsify(net, SRigLConfig(sparsity=0.6))
    assert_same(lower(masked1d, progress=False), masked1d, torch.randn(3, 4, 17))


def test_transformer_block_and_encoder():
    torch.manual_seed(0)
    masked = ablate(sparsify(Block(), SRigLConfig(sparsity=0.8, distribution="uniform")), {"fc1": [3]})
    assert_same(lower(masked, progress=False), masked, torch.randn(2, 5, 32))
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 2,
                                    enable_nested_tensor=False)
    x = torch.randn(3, 6, 32)
    masked_enc = sparsify(encoder, SRigLConfig(sparsity=0.8, distribution="uniform"), example_inputs=(x,))
    lowered = lower(masked_enc, example_inputs=(x,), progress=False)
    assert isinstance(lowered.layers[0].self_attn.qkv_proj, LoweredLinear)  # (q, k, v stacked: one kernel)
    assert_same(lowered, masked_enc, x)


def test_hf_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=3)
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 7))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    masked = sparsify(transformers.BertForSequenceClassification(config).eval(),
                      SRigLConfig(sparsity=0.8, distribution="uniform"), example_inputs=inputs)
    ablate(masked, {"bert.encoder.layer.0.intermediate.dense": [2, 9]})
    lowered = lower(masked, example_inputs=inputs, progress=False)
    masked.eval()
    torch.testing.assert_close(lowered(**inputs).logits, masked(**inputs).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_hf_decoders_with_their_cache_on(kind, tmp_path):
    """GPT-2 (Conv1D projections, tied lm_head) and Llama (gated MLP, grouped-query attention, RMSNorm), captured
    with use_cache left on; an ablated MLP neuron in each."""
    from tests.models import DECODERS

    model, ids = DECODERS[kind]()
    config = SRigLConfig(sparsity=0.8, distribution="uniform")
    masked = sparsify(model.eval(), config, example_inputs={"input_ids": ids})
    ablate(masked, {"transformer.h.0.mlp.c_fc" if kind == "gpt2" else "model.layers.0.mlp.up_proj": [3]})
    lowered = lower(masked, example_inputs={"input_ids": ids}, progress=False)
    assert sum(isinstance(m, LoweredLinear) for m in lowered.modules()) == (8 if kind == "gpt2" else 15)
    masked.eval()
    with torch.no_grad():
        for batch in (ids[:1], ids):
            torch.testing.assert_close(lowered(input_ids=batch).logits, masked(input_ids=batch).logits,
                                       rtol=1e-5, atol=1e-5)
    # A probe's save_pretrained of a lowered model wrote condensed operands, and from_pretrained gave back random
    # weights where they were (2.15 off). Refused, before anything is written:
    with pytest.raises(CheckpointError, match=f"lowered {type(model).__name__} cannot be saved with save_pretrained.*"
                                              "save_lowered"):
        lowered.save_pretrained(tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    torch.testing.assert_close(load_lowered(save_lowered(lowered, tmp_path / "ours"))(input_ids=ids).logits,
                               masked(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_hf_t5_reads_its_lowered_layers_weight_dtype():
    """T5's feed-forward reads ``self.wo.weight.dtype`` each forward: lowered layers answer with a stand-in."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    ids = torch.randint(0, 100, (2, 7))
    masked = sparsify(transformers.T5EncoderModel(config).eval(), SRigLConfig(sparsity=0.8, distribution="uniform"),
                      example_inputs={"input_ids": ids})
    lowered = lower(masked, example_inputs={"input_ids": ids}, progress=False)
    wo = lowered.encoder.block[0].layer[1].DenseReluDense.wo
    assert isinstance(wo, LoweredLinear) and wo.weight.dtype == torch.float32 and wo.weight.shape == (32, 64)
    masked.eval()
    with torch.no_grad():
        expected = masked(input_ids=ids).last_hidden_state
        torch.testing.assert_close(lowered(input_ids=ids).last_hidden_state, expected, rtol=1e-5, atol=1e-5)
        exported = torch.export.export(lowered, (), {"input_ids": ids}, strict=False).module()
        compiled = torch.compile(lowered, fullgraph=True)  # (dynamo gets a plain meta tensor for .weight)
        for run in (exported, compiled):
            torch.testing.assert_close(run(input_ids=ids).last_hidden_state, expected, rtol=1e-5, atol=1e-5)


def test_weight_norm_layers_are_baked_so_the_lowered_model_saves(tmp_path):
    """A weight-normed conv stays dense (sparsify warns); lowering stores its weight as a plain tensor, which
    save_lowered can pickle (torch refuses parametrized modules)."""
    from tests.models import WeightNormAndRNN

    torch.manual_seed(0)
    x = torch.randn(3, 4, 6)
    with pytest.warns(UserWarning, match="parametrization"):
        masked = sparsify(WeightNormAndRNN(), SRigLConfig(sparsity=0.5), example_inputs=x)
    lowered = lower(masked, example_inputs=x, progress=False)
    assert not torch.nn.utils.parametrize.is_parametrized(lowered.conv)
    assert torch.nn.utils.parametrize.is_parametrized(masked.conv)  # the input model is not modified
    assert_same(lowered, masked, x)
    save_lowered(lowered, tmp_path / "wn")
    assert_same(load_lowered(tmp_path / "wn"), masked, x)


def test_lowered_models_are_inference_only_and_say_so():
    """The kernels have no backward. The lowered model's parameters are frozen, so a plain call builds no graph;
    an input autograd tracks (or a parameter thawed upstream) raises instead of cutting the gradient silently."""
    from srigl_compile import InferenceOnlyError

    torch.manual_seed(0)
    net = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 32), nn.ReLU(), nn.Unflatten(1, (32, 1)), nn.Conv1d(32, 8, 1))
    masked = sparsify(net, SRigLConfig(sparsity=0.5), filter_fn=lambda m, name: name != "0")
    lowered = lower(masked, progress=False)
    assert not any(p.requires_grad for p in lowered.parameters())
    assert any(p.requires_grad for p in masked.parameters())  # the input model is not modified
    x = torch.randn(2, 16)
    assert not lowered(x).requires_grad
    with pytest.raises(InferenceOnlyError, match="no_grad"):
        lowered(x.requires_grad_())
    with torch.no_grad():
        lowered(x)
    lowered[0].weight.requires_grad_()
    with pytest.raises(InferenceOnlyError):
        lowered(torch.randn(2, 16))
    with pytest.raises(InferenceOnlyError):
        lowered[4](torch.randn(2, 32, 1, requires_grad=True))  # the conv kernel too
    lowered[0].weight.requires_grad_(False)
    # The layers' own operands: a probe fine-tuned a lowered layer's values (or swapped in tracked ones with
    # functional_call), and backward() ran with their gradient left None.
    for layer, name in ((lowered[1], "values"), (lowered[1], "bias"), (lowered[4], "values")):
        getattr(layer, name).requires_grad_()
        with pytest.raises(InferenceOnlyError, match=rf"'{1 if layer is lowered[1] else 4}': autograd tracks its "
                                                     rf"{name}"):
            lowered(torch.randn(2, 16))
        getattr(layer, name).requires_grad_(False)
    tracked = {"1.values": lowered[1].values.detach().clone().requires_grad_()}
    with pytest.raises(InferenceOnlyError, match="autograd tracks its values"):
        torch.func.functional_call(lowered, tracked, (torch.randn(2, 16),))
    with torch.no_grad():
        torch.testing.assert_close(torch.func.functional_call(lowered, tracked, (x,)), lowered(x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_a_model_in_another_dtype_lowers_to_float32_and_stays_there(dtype):
    """The llvm kernels run float32: lower() converts the whole model; converting the lowered model afterwards
    is a typed error at the call, not TVM's argument mismatch."""
    from srigl_compile.runtime.checks import KernelDtypeError

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Unflatten(1, (32, 1)), nn.Conv1d(32, 4, 1))
    masked = sparsify(net.to(dtype), SRigLConfig(sparsity=0.5))
    lowered = lower(masked, progress=False)
    assert all(p.dtype == torch.float32 for p in lowered.parameters())
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = masked.float()(x)  # (the float32 version of the same weights)
    assert_same(lowered, masked, x, tol=1e-5)
    torch.testing.assert_close(lowered(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(KernelDtypeError, match="lowered LoweredLinear '0' kernel .* lower it again"):
        lowered.to(dtype)(x.to(dtype) if dtype == torch.float64 else x)  # (named: a kernel serves like layers)


def test_lower_and_its_target_reject_the_wrong_kinds_of_argument():
    with pytest.raises(TypeError, match="nn.Module"):
        lower("model")
    masked = sparsify(nn.Sequential(nn.Linear(8, 8)), SRigLConfig(sparsity=0.5))
    for cores in (-1, "abc", 0):
        with pytest.raises(UnsupportedTargetError, match="num-cores"):
            lower(masked, target={"kind": "llvm", "mcpu": "znver3", "num-cores": cores})


@pytest.mark.parametrize("target", ["tpu", "native", {"kind": "opencl"}, 3, {"kind": "llvm", "mcpu": "native"}])
def test_unknown_targets_list_the_supported_ones(lowered_mlp, target):
    masked, _ = lowered_mlp
    with pytest.raises(UnsupportedTargetError):
        lower(masked, target=target)


def test_a_layer_whose_weight_the_forward_reads_stays_masked_and_the_rest_runs_everywhere():
    """torchvision's Swin attention computes F.linear(x, self.qkv.weight): lowered, that layer stays masked (a
    condensed one keeps no dense weight) and the model runs eagerly, replayed, compiled and exported."""
    from srigl_compile import cpu_graph
    torch.manual_seed(0)
    masked = sparsify(ReadsAWeight(False), SRigLConfig(sparsity=0.75, distribution="uniform")).eval()
    with pytest.warns(UserWarning, match="reads the weight of"):
        lowered = lower(masked, progress=False)
    assert type(lowered.fc) is type(masked.fc) and isinstance(lowered.a, LoweredLinear)
    x = torch.randn(3, 16)
    with torch.no_grad():
        want = masked(x)
        graphed = cpu_graph(lowered)
        for run in (lowered, graphed, graphed, torch.compile(lowered), torch.export.export(lowered, (x,)).module()):
            torch.testing.assert_close(run(x), want, rtol=1e-5, atol=1e-5)


def test_nothing_to_lower():
    with pytest.raises(LayerError, match="sparsify"):
        lower(mlp())
    masked = sparsify(nn.Sequential(nn.Conv3d(3, 8, 3), nn.ReLU(), nn.Conv3d(8, 4, 3)), SRigLConfig(sparsity=0.9))
    with pytest.warns(UserWarning, match="no condensed form yet"), pytest.raises(
            LayerError, match=r"the sparse layers \['0 \(MaskedConv3d\)', '2 \(MaskedConv3d\)'\] stay masked"):
        lower(masked)


def test_save_and_load_round_trip_in_a_fresh_process(lowered_mlp, tmp_path):
    import subprocess
    import sys

    masked, lowered = lowered_mlp
    assert not lowered.training, "lower returns an inference model"
    save_lowered(lowered, tmp_path / "model")
    x = torch.randn(6, 32)
    torch.save({"x": x, "y": lowered(x)}, tmp_path / "io.pt")
    code = (f"import torch, srigl_compile as sc; m = sc.load_lowered({str(tmp_path / 'model')!r}); "
            f"d = torch.load({str(tmp_path / 'io.pt')!r}); assert torch.equal(m(d['x']), d['y'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert torch.equal(load_lowered(tmp_path / "model")(x), lowered(x))


def test_corrupt_or_missing_files_are_checkpoint_errors(lowered_mlp, tmp_path):
    _, lowered = lowered_mlp
    folder = save_lowered(lowered, tmp_path / "model")
    with pytest.raises(CheckpointError, match="manifest"):
        load_lowered(tmp_path)
    library = sorted((folder / "kernels").iterdir())[0]
    library.write_bytes(library.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_lowered(folder)
    with pytest.raises(CheckpointError, match="no lowered layers"):
        save_lowered(mlp(), tmp_path / "dense")


def test_an_edited_kernel_manifest_is_a_checkpoint_error(lowered_mlp, tmp_path):
    """A probe edited kernels/manifest.json (it has no hash of its own): its entries say how each library is
    called, and an edited tile parameter loaded, then failed in TVM at the first call; a list of kernels raised
    AttributeError."""
    import json

    from srigl_compile.runtime.kernel_files import KernelFileError
    from srigl_compile.runtime.kernel_io import load_kernels

    _, lowered = lowered_mlp
    folder = save_lowered(lowered, tmp_path / "model")
    manifest = folder / "kernels" / "manifest.json"
    text = manifest.read_text()
    for edited in (text.replace('"device": "cpu"', '"device": "cuda"', 1),
                   json.dumps({**json.loads(text), "kernels": []})):
        assert edited != text
        manifest.write_text(edited)
        with pytest.raises(CheckpointError, match="kernels/manifest.json is missing or does not match"):
            load_lowered(folder)
    with pytest.raises(KernelFileError, match="its kernels are a list"):
        load_kernels(folder / "kernels")
    manifest.write_text(text)
    x = torch.randn(3, 32)
    assert torch.equal(load_lowered(folder)(x), lowered(x))
    with pytest.raises(CheckpointError, match="cannot use the path .*File name too long"):
        save_lowered(lowered, tmp_path / ("x" * 300) / "model")
    with pytest.raises(CheckpointError, match="cannot write the folder .*; choose another path"):
        save_lowered(lowered, "/proc/srigl_compile_test/model")  # (unwritable even for root, who CI may be)


def test_saving_over_a_saved_model_replaces_its_kernels(lowered_mlp, tmp_path):
    _, lowered = lowered_mlp
    other = lower(sparsify(nn.Sequential(nn.Linear(8, 24)), SRigLConfig(sparsity=0.5)), progress=False)
    folder = save_lowered(other, tmp_path / "model")
    save_lowered(lowered, folder)
    fresh = save_lowered(lowered, tmp_path / "fresh")
    assert {p.name for p in (folder / "kernels").iterdir()} == {p.name for p in (fresh / "kernels").iterdir()}
    x = torch.randn(3, 32)
    assert torch.equal(load_lowered(folder)(x), lowered(x))
    (tmp_path / "mine" / "kernels").mkdir(parents=True)  # not a save_lowered folder: left alone, refused
    with pytest.raises(CheckpointError, match="manifest"):
        save_lowered(lowered, tmp_path / "mine")


def test_lowered_90_percent_layer_is_small_and_drops_dense_weights():
    masked = sparsify(nn.Sequential(nn.Linear(3072, 768)), SRigLConfig(sparsity=0.9, distribution="uniform"))
    lowered = lower(masked, progress=False)
    layer = lowered[0]
    dense_bytes = 3072 * 768 * 4
    kernel_bytes = layer.values.numel() * 4 + layer.indices.numel() * 2
    assert layer.indices.dtype == torch.int16
    assert kernel_bytes <= 0.16 * dense_bytes
    assert all(t.numel() < 3072 * 768 // 4 for t in list(lowered.parameters()) + list(lowered.buffers()))




def test_a_consumer_left_with_one_input_feature_lowers_and_runs_at_every_batch():
    """All but one neuron of a hidden layer ablated: its consumer keeps one input feature, whose pack loop of one the
    fused kernel's schedule lost (a TypeError from the schedule at lower(); the fuzz probe, 2026-12-06)."""
    torch.manual_seed(0)
    masked = sparsify(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)),
                      SRigLConfig(sparsity=0.5, distribution="uniform")).eval()
    ablate(masked, {"0": list(range(1, 16))})
    lowered = lower(masked, progress=False)
    assert lowered[2].fan_in == 1
    for batch in (1, 2, 3, 8, 64, 300):  # the row, mid, col and fused kernels
        x = torch.randn(batch, 8)
        with torch.no_grad():
            torch.testing.assert_close(lowered(x), masked(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("conv", [False, True])
def test_a_layer_with_every_neuron_ablated_lowers_and_runs(conv):
    """A probe found a Linear left with no active neuron lowered, then failed on its first call asking for a
    kernel '' (it has none: its output is its biases)."""
    from srigl_compile import cpu_graph

    torch.manual_seed(0)
    layer = (lambda i, o: nn.Conv2d(i, o, 3, padding=1)) if conv else nn.Linear
    net = nn.Sequential(layer(16, 32), nn.ReLU(), layer(32, 32), nn.ReLU(), layer(32, 4))
    masked = sparsify(net, SRigLConfig(sparsity=0.8, distribution="uniform")).eval()
    with torch.no_grad():
        masked[2].bias.uniform_(-1, 1)  # (the ablated layer's constant output, through the ReLU)
    ablate(masked, {"2": list(range(32))})
    lowered = lower(masked, progress=False)
    graphed = cpu_graph(lowered)
    for batch in (1, 3, 64):
        x = torch.randn(batch, 16, 5, 5) if conv else torch.randn(batch, 16)
        assert_same(lowered, masked, x)
        assert_same(graphed, masked, x)
