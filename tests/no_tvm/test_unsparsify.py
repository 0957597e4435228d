"""unsparsify: a sparse model back as plain torch modules, loadable by the original architecture, outputs kept."""

import pytest
import torch
import torch.nn as nn

from srigl_compile import LayerError, SRigLConfig, prune, sparse_layers, sparsify, unsparsify
from srigl_compile.nn.masked import MaskedLayer
from tests.helpers import ablate, assert_same
from tests.models import SmallCNN, make_encoder, make_gpt2
from tests.models import updater_mlp as mlp


class _NamedLinear(nn.Linear):
    """A user's subclass with a method of its own."""

    def describe(self) -> str:
        return f"{self.in_features}->{self.out_features}"


def _assert_plain_and_loadable(plain: nn.Module, original: nn.Module, sparse: nn.Module, *inputs) -> None:
    """No masked layer, the original's classes and state_dict keys, the sparse model's outputs; and its state_dict
    loads (strict) into a fresh copy of the original architecture, which then computes the same."""
    assert not any(isinstance(m, MaskedLayer) for m in plain.modules())
    assert [type(m) for m in plain.modules()] == [type(m) for m in original.modules()]
    assert plain.state_dict().keys() == original.state_dict().keys()
    assert_same(plain, sparse, *inputs)
    original.load_state_dict(plain.state_dict())
    assert_same(original, sparse, *inputs)


@pytest.mark.parametrize("make, shape", [(mlp, (3, 20)), (SmallCNN, (2, 3, 8, 8))])
def test_a_trained_sparse_model_comes_back_as_its_plain_modules(make, shape):
    torch.manual_seed(0)
    original = make().eval()
    sparse = sparsify(original, SRigLConfig(sparsity=0.8)).eval()
    first, layer = next(iter(sparse_layers(sparse)))
    ablate(sparse, {first: [0, 1]})
    plain = unsparsify(sparse)
    assert any(isinstance(m, MaskedLayer) for m in sparse.modules()), "a copy: the sparse model is unchanged"
    weight = dict(plain.named_modules())[first].weight
    assert torch.equal(weight != 0, layer.mask & (layer.weight != 0)) and not weight[:2].any()
    _assert_plain_and_loadable(plain, make(), sparse, torch.randn(shape))


def test_a_user_subclass_keeps_its_class_and_methods():
    torch.manual_seed(0)
    original = nn.Sequential(_NamedLinear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    sparse = sparsify(original, SRigLConfig(sparsity=0.5))
    plain = unsparsify(sparse, inplace=True)
    assert plain is sparse and type(plain[0]) is _NamedLinear and plain[0].describe() == "16->32"
    _assert_plain_and_loadable(plain, nn.Sequential(_NamedLinear(16, 32), nn.ReLU(), nn.Linear(32, 4)), sparse,
                               torch.randn(2, 16))


def test_attention_gets_its_packed_projection_back():
    """The sparse model stores MultiheadAttention's packed weight as in_proj.weight: its state_dict loaded into the
    dense model with strict=False left the old in_proj_weight in place (a probe: 3.5 off)."""
    sparse = sparsify(make_encoder(), SRigLConfig(sparsity=0.8), example_inputs=(torch.randn(2, 5, 32),)).eval()
    plain = unsparsify(sparse)
    assert all(type(m) is nn.MultiheadAttention and "in_proj_weight" in m._parameters
               for m in plain.modules() if isinstance(m, nn.MultiheadAttention))
    _assert_plain_and_loadable(plain, make_encoder(seed=1).eval(), sparse, torch.randn(2, 5, 32))


def test_gpt2s_conv1d_layers_come_back_and_save_pretrained_reloads(tmp_path):
    """sparsify rewrites GPT-2's Conv1D as nn.Linear: a sparse GPT-2's save_pretrained could not be read back by
    from_pretrained (a probe); unsparsified, it can."""
    model, ids = make_gpt2()
    sparse = sparsify(model.eval(), SRigLConfig(sparsity=0.8, distribution="uniform"),
                      example_inputs={"input_ids": ids}).eval()
    sparse.transformer.h[0].attn.c_attn.requires_grad_(False)  # (frozen: it stays frozen)
    plain = unsparsify(sparse)
    assert {type(m).__name__ for m in plain.modules()} == {type(m).__name__ for m in model.modules()}
    assert [p.requires_grad for p in plain.transformer.h[0].attn.c_attn.parameters()] == [False, False]
    assert all(p.requires_grad for p in plain.transformer.h[1].attn.c_attn.parameters())
    plain.save_pretrained(tmp_path / "gpt2")
    loaded = type(model).from_pretrained(tmp_path / "gpt2").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, sparse(input_ids=ids).logits, rtol=1e-5,
                                   atol=1e-5)


def test_a_pruned_model_unsparsifies_too():
    torch.manual_seed(0)
    trained = mlp().eval()
    pruned = prune(trained, SRigLConfig(sparsity=0.9), "magnitude")
    _assert_plain_and_loadable(unsparsify(pruned), mlp(), pruned, torch.randn(3, 20))


def test_bad_inputs_are_refused_before_anything_changes():
    with pytest.raises(TypeError, match="nn.Module"):
        unsparsify("model")
    with pytest.raises(LayerError, match="no sparse layers"):
        unsparsify(mlp())
    sparse = sparsify(mlp(), SRigLConfig(sparsity=0.8))
    name, layer = next(iter(sparse_layers(sparse)))
    with torch.no_grad():
        layer.weight[~layer.mask] = 0.01  # (an EMA's weights: the masked model computes with them)
    with pytest.raises(LayerError, match=rf"\['{name}'\] have non-zero weights outside their masks.*which "
                                         r"unsparsify would keep.*apply_mask_"):
        unsparsify(sparse, inplace=True)
    assert all(isinstance(m, MaskedLayer) for _, m in sparse_layers(sparse))


def test_plain_layers_keep_no_plan():
    """A plain model pickled needs no srigl_compile to load (a probe: srigl_plan was left on the layers)."""
    sparse = sparsify(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), SRigLConfig(sparsity=0.5))
    plain = unsparsify(sparse)
    assert not any(hasattr(m, "srigl_plan") for m in plain.modules())


def test_attention_out_proj_is_torchs_class_again():
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    sparse = sparsify(nn.Sequential(layer).eval(), SRigLConfig(sparsity=0.8),
                      example_inputs=(torch.randn(2, 5, 32),))
    plain = unsparsify(sparse)
    attention = plain[0].self_attn
    assert type(attention) is nn.MultiheadAttention
    assert type(attention.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
