"""Lowered models as the torch modules they replace, where a runtime probe (2026-12-06) found them differ: train mode
(accepted silently, half honoured) and unbatched [T, E] inputs to attention (a raw error)."""

import copy

import pytest
import torch
import torch.nn as nn

from srigl_compile import SRigLConfig, lower, sparsify
from srigl_compile.errors import InferenceOnlyError, LoweringError

pytestmark = pytest.mark.tvm


def test_train_mode_is_refused_naming_the_layer_and_eval_undoes_what_it_switched():
    """BatchNorm is folded with its running statistics and fused attention has no dropout: train() used to report
    training=True while the torch modules' dropout ran and the folded layers kept eval semantics."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Dropout(0.5),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    masked = sparsify(net, SRigLConfig(sparsity=0.9)).eval()
    lowered = lower(masked, progress=False)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = masked(x)
    with pytest.raises(InferenceOnlyError, match=r"lowered LoweredConv '0' runs in eval mode only .*model.eval\(\)"):
        lowered.train()
    lowered.eval()
    assert not any(m.training for m in lowered.modules())
    lowered.train(False)  # (eval by another name: fine)
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", [None, "padding", "causal"])
def test_an_encoder_takes_an_unbatched_sequence_as_torch_s_does(batch_first, mask):
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 256, batch_first=batch_first), 2,
                                    enable_nested_tensor=False)
    masked = sparsify(encoder, SRigLConfig(sparsity=0.9), example_inputs=(torch.randn(2, 9, 64),)).eval()
    lowered = lower(copy.deepcopy(masked), progress=False, example_inputs=(torch.randn(2, 9, 64),))
    x = torch.randn(9, 64)
    kwargs = {}
    if mask == "padding":
        kwargs["src_key_padding_mask"] = torch.arange(9) >= 7
    elif mask == "causal":
        kwargs["mask"] = nn.Transformer.generate_square_subsequent_mask(9)
    with torch.no_grad():
        want = masked(x, **kwargs)
        got = lowered(x, **kwargs)
    assert got.shape == want.shape == (9, 64)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    if mask == "padding":
        kwargs["src_key_padding_mask"] = kwargs["src_key_padding_mask"].unsqueeze(0)
    with torch.no_grad():  # and one sequence of a batch computes as it does alone
        batched = lowered(x.unsqueeze(0 if batch_first else 1), **kwargs)
    torch.testing.assert_close(batched.squeeze(0 if batch_first else 1), got, rtol=1e-5, atol=1e-6)


def test_multihead_attention_alone_returns_unbatched_weights_as_torch_does():
    torch.manual_seed(1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=True)

    masked = sparsify(Net(), SRigLConfig(sparsity=0.8), example_inputs=(torch.randn(2, 5, 32),)).eval()
    lowered = lower(copy.deepcopy(masked), progress=False)
    x = torch.randn(5, 32)
    with torch.no_grad():
        (out, weights), (want_out, want_weights) = lowered(x), masked(x)
    assert out.shape == (5, 32) and weights.shape == want_weights.shape == (5, 5)
    torch.testing.assert_close(out, want_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weights, want_weights, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_torch_jit_trace_is_refused_naming_what_works(kind):
    """An internal assert (aten::view alias analysis) or a raw TVM type error before."""
    torch.manual_seed(2)
    if kind == "linear":
        net, x = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)), torch.randn(4, 64)
    else:
        net, x = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 8, 3)), torch.randn(2, 3, 8, 8)
    lowered = lower(sparsify(net, SRigLConfig(sparsity=0.9)).eval(), progress=False)
    with torch.no_grad(), pytest.raises(LoweringError, match=r"lowered Lowered\w+ '0': torch.jit cannot trace the TVM "
                                                            r"kernels; use torch.export.export or torch.compile"):
        torch.jit.trace(lowered, x)


def _onnx_export_case():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32, 4))
    return lower(sparsify(net, SRigLConfig(sparsity=0.8)).eval(), progress=False), torch.randn(2, 3, 4, 4)


def test_every_kernel_op_refuses_onnx_export_naming_what_to_export(monkeypatch):
    """torch.onnx.export traces with the operators' fakes: an opaque conversion error came out at its step 3
    (dynamo=True), or the torch.jit refusal without a word of ONNX (dynamo=False)."""
    import srigl_compile.runtime.checks as checks

    lowered, x = _onnx_export_case()
    assert torch.export.export(lowered, (x,)) is not None  # (not exporting to ONNX: the fakes run as before)
    monkeypatch.setattr(checks, "in_onnx_export", lambda: True)
    with pytest.raises(LoweringError, match=r"torch.onnx.export met tvm_\w+, a compiled kernel of a lowered model, "
                                            r"which ONNX cannot hold: export the sparse model"):
        torch.export.export(lowered, (x,))
    with pytest.raises(LoweringError, match=r"torch.onnx.export met lowered Lowered\w+ '\w+', which ONNX cannot"):
        torch.jit.trace(lowered, x)


@pytest.mark.parametrize("dynamo", [True, False])
def test_torch_onnx_export_of_a_lowered_model_says_to_export_the_sparse_one(dynamo, tmp_path):
    pytest.importorskip("onnxscript")  # (the [peers] extra)
    lowered, x = _onnx_export_case()
    with pytest.raises(Exception, match="which ONNX cannot hold: export the sparse model"):
        torch.onnx.export(lowered, (x,), tmp_path / "model.onnx", dynamo=dynamo)


class _PlusOne(nn.Module):
    def forward(self, bias):
        return bias + 1


@pytest.mark.parametrize("conv", [False, True])
def test_a_parametrized_bias_is_computed_with(conv):
    """torch.nn.utils.parametrize moves the bias into ``parametrizations``: the lowered forward read its buffers
    by name and failed with a bare KeyError: 'bias'."""
    import torch.nn.utils.parametrize as parametrize

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)) if conv else \
        nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    masked = sparsify(net, SRigLConfig(sparsity=0.8)).eval()
    lowered = lower(masked, progress=False)
    parametrize.register_parametrization(lowered[0], "bias", _PlusOne())
    with torch.no_grad():
        masked[0].bias.add_(1)
        for batch in (1, 8, 1):  # (the row kernel, the batch kernels, the row kernel with its prepared call)
            x = torch.randn(batch, 3, 6, 6) if conv else torch.randn(batch, 16)
            torch.testing.assert_close(lowered(x), masked(x), rtol=1e-5, atol=1e-5)


def test_a_hook_on_a_layer_computing_a_fused_activation_is_warned_about():
    """A probe's hook on a lowered layer got relu(y) where it had the pre-activation y on the sparse model (5.3
    off), without a word: lower() warns only about hooks that exist when it runs."""
    import warnings

    torch.manual_seed(0)
    masked = sparsify(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), SRigLConfig(sparsity=0.8))
    lowered = lower(masked.eval(), progress=False)
    with pytest.warns(UserWarning, match=r"LoweredLinear sees its output after the 'relu' it computes.*"
                                         r"fuse_epilogues=False"):
        lowered[0].register_forward_hook(lambda *args: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lowered[2].register_forward_hook(lambda *args: None)  # (no epilogue: nothing to say)
        lower(masked, progress=False, fuse_epilogues=False)[0].register_forward_hook(lambda *args: None)


def test_a_lowered_layer_s_repr_names_srigl_s_k_beside_the_padded_width():
    """The kernels read values packed to a multiple of 8; printing the model showed that width as k (8 for a k of
    6), which is not the model's constant fan-in."""
    torch.manual_seed(0)
    masked = sparsify(nn.Sequential(nn.Linear(64, 16)), SRigLConfig(sparsity=0.9, distribution="uniform"))
    lowered = lower(masked.eval(), progress=False)
    k = int(masked[0].mask.sum(dim=1).max())
    assert k == 6 and f"k={k} (padded to 8)," in repr(lowered[0]), repr(lowered[0])
