"""lower(target='llvm'): compiled kernels equal the masked model, in every torch mode, and survive save/load."""


import pytest
import torch
import torch.nn as nn

from srigl_compile import (
    CheckpointError,
    DeviceError,
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
from tests.models import Block, ResidualCNN
from tests.models import condense_mlp as mlp

pytestmark = pytest.mark.tvm


@pytest.fixture(scope="module")
def lowered_mlp():
    torch.manual_seed(0)
    masked = ablate(sparsify(mlp(), SRigLConfig(sparsity=0.8, seed=1)), {"0": [1, 5], "3": [2]},
                    {("0", 5): 0.4})
    return masked, lower(masked, progress=False)


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


@pytest.mark.parametrize("batch, kernel", [(1, "row"), (2, "row"), (3, "mid"), (48, "mid"), (49, "col"), (300, "col"),
                                           (197, "col mid"), (160, "col mid"), (128, "col")])
def test_each_batch_size_runs_its_kernel(lowered_mlp, batch, kernel, monkeypatch):
    """Row kernel for 1-2 rows, 8-lane mid kernel up to the threshold, 64-lane col kernel beyond; a ragged tail
    of at most half a tile (197 = 3 x 64 + 5; 160 = 2 x 64 + 32) runs on the mid kernel after the full tiles."""
    from srigl_compile.runtime.registry import get_handle

    masked, lowered = lowered_mlp
    handle = get_handle(lowered[0].kernel_key)
    calls = []
    for name in ("row", "mid", "col"):
        original = getattr(handle, f"{name}_fn")
        monkeypatch.setattr(handle, f"{name}_fn", lambda *args, _f=original, _n=name: calls.append(_n) or _f(*args))
    assert_same(lowered, masked, torch.randn(batch, 32))
    assert calls == kernel.split()


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


def test_leading_dims_and_empty_batch(lowered_mlp):
    masked, lowered = lowered_mlp
    assert_same(lowered, masked, torch.randn(2, 3, 5, 32))
    assert lowered(torch.randn(0, 32)).shape == (0, 8)


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
    assert isinstance(lowered.layers[0].self_attn.q_proj, LoweredLinear)
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
def test_hf_decoders_with_their_cache_on(kind):
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
    with pytest.raises(KernelDtypeError, match="lower it again"):
        lowered.to(dtype)(x.to(dtype) if dtype == torch.float64 else x)


def test_lower_and_its_target_reject_the_wrong_kinds_of_argument():
    with pytest.raises(TypeError, match="nn.Module"):
        lower("model")
    masked = sparsify(nn.Sequential(nn.Linear(8, 8)), SRigLConfig(sparsity=0.5))
    for cores in (-1, "abc", 0):
        with pytest.raises(UnsupportedTargetError, match="num-cores"):
            lower(masked, target={"kind": "llvm", "mcpu": "znver3", "num-cores": cores})


def test_custom_op_passes_opcheck(lowered_mlp):
    _, lowered = lowered_mlp
    layer = lowered[3]
    args = (layer.values, layer.indices, layer.bias, layer.kernel_key, layer.col_threshold)
    for batch in (1, 40):
        torch.library.opcheck(torch.ops.srigl_compile.tvm_condensed_linear.default,
                              (torch.randn(batch, layer.fan_in), *args))


def test_fx_export_and_compile_keep_the_op(lowered_mlp):
    masked, lowered = lowered_mlp
    x = torch.randn(4, 32)
    expected = masked.eval()(x)
    traced = torch.fx.symbolic_trace(lowered)
    torch.testing.assert_close(traced(x), expected, rtol=1e-5, atol=1e-5)
    program = torch.export.export(lowered, (x,))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert any("srigl_compile.tvm_condensed_linear" in t for t in targets)
    torch.testing.assert_close(program.module()(x), expected, rtol=1e-5, atol=1e-5)
    compiled = torch.compile(lowered, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_clear_errors(lowered_mlp):
    from srigl_compile.runtime.registry import get_handle

    _, lowered = lowered_mlp
    with pytest.raises(DeviceError, match="float32"):
        lowered(torch.randn(2, 32, dtype=torch.float64))
    with pytest.raises(DeviceError, match="CPU"):
        get_handle(lowered[0].kernel_key).check_input(torch.empty(2, 32, device="meta"))
    from srigl_compile.runtime.checks import KernelShapeError

    with pytest.raises(KernelShapeError, match=r"lowered LoweredLinear '0' expects 32 input features.*\(2, 31\)"):
        lowered(torch.randn(2, 31))
    assert issubclass(KernelShapeError, ValueError)


@pytest.mark.parametrize("target", ["tpu", "native", {"kind": "opencl"}, 3, {"kind": "llvm", "mcpu": "native"}])
def test_unknown_targets_list_the_supported_ones(lowered_mlp, target):
    masked, _ = lowered_mlp
    with pytest.raises(UnsupportedTargetError):
        lower(masked, target=target)


def test_nothing_to_lower():
    with pytest.raises(LayerError, match="sparsify"):
        lower(mlp())


def test_tuning_records_are_written_once_and_reused(tmp_path, monkeypatch):
    from srigl_compile.codegen import rules, tuning
    from srigl_compile.runtime import registry

    monkeypatch.setattr(rules.RowRule, "space", lambda self, k: [rules.RowParams(8, 8, 8), rules.RowParams(8, 16, 8)])
    monkeypatch.setattr(rules.ColRule, "space", lambda self, k: [rules.ColParams(32, 8, 1, 16),
                                                                 rules.ColParams(32, 8, 1, 32)])
    monkeypatch.setattr(registry, "_HANDLES", {})
    masked = sparsify(nn.Sequential(nn.Linear(48, 24)), SRigLConfig(sparsity=0.5, distribution="uniform"))
    lowered = lower(masked, tune=True, cache_dir=tmp_path, progress=False)
    records = list(tmp_path.rglob("*.json"))
    assert len(records) == 2, "one record per layout"
    calls = []
    monkeypatch.setattr(tuning, "tune_layout", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(AssertionError))
    monkeypatch.setattr(registry, "_HANDLES", {})
    lower(masked, tune=True, cache_dir=tmp_path, progress=False)
    assert not calls, "a tuned shape is read from the records, not searched again"
    assert_same(lowered, masked, torch.randn(3, 48))


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


def test_schedule_rules_decline_what_they_do_not_apply_to():
    from srigl_compile.codegen.kernels import col_kernel, row_kernel
    from srigl_compile.codegen.rules import RULES, ColParams, RowParams, RowRule, schedule

    row, col = row_kernel(16, 32, 12, "int16"), col_kernel(16, 32, 12, "int16", 16)
    assert RowRule().apply(col, None, RowParams()) is None, "wrong layout"
    assert RowRule().apply(row, None, RowParams(vec=8)) is None, "k = 12 is not a multiple of 8"
    assert RowRule().apply(row, None, RowParams(vec=4)) is not None
    assert RowRule().apply(row, {"kind": "cuda"}, RowParams(vec=4)) is None, "not an llvm target"
    assert RULES["col"].apply(row, None, ColParams()) is None
    with pytest.raises(ValueError, match="no schedule rule"):
        schedule(row, list(RULES.values()), RowParams(vec=8))
    assert all(12 % p.vec == 0 for p in RowRule().space(12))


def test_a_shape_lowered_again_with_other_variants_leaves_the_first_model_working(tmp_path):
    from srigl_compile.codegen.cpu_target import host_llvm_target
    from srigl_compile.codegen.tuning import select_params
    from srigl_compile.nn.lowered import kernel_spec
    from srigl_compile.runtime.llvm_params import ColParams, RowParams

    torch.manual_seed(0)
    masked = sparsify(nn.Sequential(nn.Linear(40, 48), nn.ReLU(), nn.Unflatten(1, (3, 4, 4)),
                                    nn.Conv2d(3, 8, 3, padding=1)),
                      SRigLConfig(sparsity=0.7, distribution="uniform")).eval()
    target, condensed = host_llvm_target(), condense(masked)
    for layer, layout, variant in ((condensed[0], "row", RowParams(16, 32, 16)),
                                   (condensed[3], "offset", ColParams(16, 4, 1, 32))):
        spec = kernel_spec(layer, "direct")
        chosen = select_params(spec, layout, target, tune=True, cache_dir=tmp_path / "records", space=[variant],
                               progress=False)
        assert chosen == variant and chosen != select_params(spec, layout, target, cache_dir=tmp_path / "none")
    first = lower(masked, cache_dir=tmp_path / "records", progress=False)
    second = lower(masked, cache_dir=tmp_path / "none", progress=False)  # default variants, same shapes
    assert first[0].kernel_key != second[0].kernel_key and second[0].kernel_key.endswith("#2")
    x = torch.randn(3, 40)
    with torch.no_grad():
        for lowered in (first, second):
            torch.testing.assert_close(lowered(x), masked(x), rtol=1e-5, atol=1e-5)
        save_lowered(second, tmp_path / "second")
        torch.testing.assert_close(load_lowered(tmp_path / "second")(x), second(x), rtol=0, atol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_small_eager_calls_skip_the_checks_only_while_the_checked_operands_are_in_place(bias, tmp_path):
    from srigl_compile.errors import InferenceOnlyError
    from srigl_compile.runtime.checks import KernelDtypeError, KernelShapeError

    torch.manual_seed(1)
    masked = sparsify(nn.Sequential(nn.Linear(48, 40, bias=bias)), SRigLConfig(sparsity=0.8)).eval()
    layer = lower(masked, progress=False)[0]
    x = torch.randn(2, 48)
    with torch.no_grad():
        full = layer(x)  # the first call takes the full path, with every check
        assert type(layer._row_call).__name__ == "RowCall"
        for rows in (x[:1], x, x.t().contiguous().t(), torch.randn(7, 48)):  # row kernel, strided rows, mid kernel
            torch.testing.assert_close(layer(rows), masked(rows), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(x), full, rtol=0, atol=0)
        with pytest.raises(KernelDtypeError):
            layer(x.double())
        with pytest.raises(KernelShapeError):
            layer(torch.randn(1, 47))
    with pytest.raises(InferenceOnlyError):
        layer(x.requires_grad_())
    with torch.no_grad():
        layer.values = layer.values * 2  # replaced operands: checked again, then the fast path on the new ones
        torch.testing.assert_close(layer(x[:1]), 2 * (full[:1] - (layer.bias if bias else 0)) +
                                   (layer.bias if bias else 0), rtol=1e-5, atol=1e-5)
        assert layer._row_call.values is layer.values
        layer.values = layer.values.double()
        with pytest.raises(KernelDtypeError):
            layer(x[:1])
    called = lower(masked, progress=False)
    with torch.no_grad():
        want = called(x[:1])
        assert called[0]._row_call is not None
        save_lowered(called, tmp_path / "m")  # a called model pickles without its fast path (compiled functions)
        torch.testing.assert_close(load_lowered(tmp_path / "m")(x[:1]), want, rtol=0, atol=0)
