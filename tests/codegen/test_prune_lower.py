"""prune / from_sparse_weights -> lower: the lowered model computes what the pruned (masked) model computes."""

import pytest
import torch

from srigl_compile import SRigLConfig, from_sparse_weights, lower, prune, sparse_layers
from tests.helpers import assert_same, randomize_bn
from tests.models import ResidualCNN, zeroed
from tests.models import prune_mlp as mlp

pytestmark = pytest.mark.tvm


@pytest.mark.parametrize("criterion, ablation", [("magnitude", False), ("wanda", True)])
def test_mlp(criterion, ablation):
    net = mlp()
    with torch.no_grad():
        net[2].weight[:10] *= 1e-3
    calibration = [torch.randn(64, 40)] if criterion == "wanda" else None
    pruned = prune(net, SRigLConfig(sparsity=0.9), criterion, calibration=calibration, ablation=ablation)
    assert bool((pruned[2].mask.sum(dim=1) == 0).any()) == ablation
    assert_same(lower(pruned, progress=False), pruned, torch.randn(3, 40))


def test_cnn_with_batchnorm():
    torch.manual_seed(0)
    net = randomize_bn(ResidualCNN()).eval()
    pruned = prune(net, SRigLConfig(sparsity=0.8), "wanda", calibration=[torch.randn(8, 3, 8, 8)], ablation=True)
    for batch in (1, 4):
        assert_same(lower(pruned, progress=False), pruned, torch.randn(batch, 3, 8, 8))


def test_imported_weights():
    net = zeroed(mlp(), {"0": 4, "2": 6})
    imported = from_sparse_weights(net)
    x = torch.randn(2, 40)
    assert_same(lower(imported, progress=False), imported, x)
    torch.testing.assert_close(imported(x), net(x), rtol=0, atol=0)


def test_hf_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=3)
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (4, 9))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    bert = transformers.BertForSequenceClassification(config).eval()
    pruned = prune(bert, SRigLConfig(sparsity=0.8, distribution="uniform"), "wanda", calibration=[inputs],
                   example_inputs=inputs)
    lowered = lower(pruned, example_inputs=inputs, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(lowered(**inputs).logits, pruned(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_llama_decoder_generates_the_pruned_models_tokens():
    from tests.models import DECODERS

    model, ids = DECODERS["llama"]()
    calibration = [{"input_ids": torch.randint(0, model.config.vocab_size, (2, 16))} for _ in range(2)]
    pruned = prune(model.eval(), SRigLConfig(sparsity=0.9, distribution="uniform"), "wanda",
                   calibration=calibration, example_inputs={"input_ids": ids})
    assert len(dict(sparse_layers(pruned))) == 15
    lowered = lower(pruned, example_inputs={"input_ids": ids}, progress=False)
    with torch.no_grad():
        expected = pruned.generate(ids[:1], max_new_tokens=12, do_sample=False)
        got = lowered.generate(ids[:1], max_new_tokens=12, do_sample=False)
    assert torch.equal(got, expected)
