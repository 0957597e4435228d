"""FuseEpiloguePass on condensed models (no kernels): which chains it fuses, and outputs unchanged."""

import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from srigl_compile import SRigLConfig, sparsify
from srigl_compile.errors import LayerError
from srigl_compile.nn.condensed import CondensedConv
from srigl_compile.passes.analysis import Analyses
from srigl_compile.passes.condense import condense
from srigl_compile.passes.fold_batchnorm import fold_batchnorm
from srigl_compile.passes.fuse_epilogue import FuseEpiloguePass
from srigl_compile.passes.lower import PadAblatedRowsPass
from srigl_compile.passes.manager import PassManager
from srigl_compile.runtime.spec import apply_epilogue
from tests.fusion import LLVM, condensed, fused_unchanged
from tests.helpers import randomize_bn


class Block(nn.Module):
    """Every chain the pass must fuse, and every one it must leave alone."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        conv = lambda k=1: nn.Conv2d(c, c, k, padding=k // 2)  # noqa: E731
        self.a, self.bn_a = conv(3), nn.BatchNorm2d(c)       # a -> bn (folded) -> F.relu             : relu
        self.b, self.drop = conv(), nn.Dropout(0.5)          # b -> dropout -> += x -> shared ReLU    : add_relu
        self.c = conv()                                      # torch.add(x, c) -> relu_ method        : add_relu
        self.d = conv()                                      # d + x, no activation                   : add
        self.e = conv()                                      # e used twice                           : none
        self.f = conv()                                      # x.add_(f): updates x, not f's output    : none
        self.g = conv()                                      # called twice                           : none
        self.relu = nn.ReLU()

    def forward(self, x):
        y = F.relu(self.bn_a(self.a(x)))
        out = self.drop(self.b(y))
        out += x
        y = self.relu(out)
        y = torch.add(y, self.c(y)).relu_()
        y = self.d(y) + y
        e = self.e(y)
        y = y + e * e
        z = y.clone()
        z.add_(self.f(y))
        return self.g(self.g(z))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)  # the model's own forward is never rewritten
        self.block = Block()

    def forward(self, x):
        return self.block(F.relu(self.stem(x)))


def _prepared(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    masked = randomize_bn(sparsify(Net(), SRigLConfig(sparsity=0.6, distribution="uniform", ablation=False)))
    return PassManager([PadAblatedRowsPass()]).run(fold_batchnorm(condense(masked))).eval()


def test_the_pass_fuses_exactly_the_chains_its_contract_allows_and_outputs_do_not_change():
    model = _prepared()
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        before = model(x)
    fuse = FuseEpiloguePass("direct", LLVM)
    fused = fuse(model).module
    assert fuse.fused == {"block.a": "relu", "block.b": "add_relu", "block.c": "add_relu", "block.d": "add"}
    assert type(fused) is Net and type(fused.block).__name__ == "Block", "the parent keeps its class name"
    assert isinstance(fused.block, torch.fx.GraphModule) and fused.block.a is model.block.a
    assert {n.target for n in fused.block.graph.nodes if n.op == "call_function"} >= {operator.mul}
    with torch.no_grad():
        torch.testing.assert_close(fused(x), before, rtol=0, atol=0)


def test_no_fusion_without_a_direct_kernel_route_nor_in_the_model_s_own_forward():
    model = _prepared()
    fuse = FuseEpiloguePass("im2col", LLVM)
    assert not fuse(model).modified and fuse.fused == {}, "im2col convolutions: torch computes the epilogue"
    assert "stem" not in FuseEpiloguePass("direct", LLVM)(_prepared()).module.block.code
    fuse = FuseEpiloguePass("direct", LLVM)
    fuse(_prepared())
    assert "stem" not in fuse.fused, "the model's own forward (F.relu after stem) is never rewritten"
    assert not FuseEpiloguePass("direct", {})(_prepared()).modified, "a backend without epilogues: nothing"


class Stem(nn.Module):
    """A torchvision-style model: its own forward applies activation modules to its layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True)
        self.conv2, self.act2 = nn.Conv2d(16, 16, 3, padding=1), nn.SiLU()  # act2 also runs on another tensor
        self.conv3, self.act3 = nn.Conv2d(16, 16, 1), nn.GELU()  # conv3's output is used twice
        self.conv4, self.act4 = nn.Conv2d(16, 8, 1), nn.ReLU()

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.act2(self.conv2(y)) + self.act2(y)
        z = self.conv3(y)
        y = self.act3(z) * z
        return self.act4(self.conv4(y))


def test_in_the_model_s_own_forward_an_activation_module_called_once_moves_into_its_layer():
    torch.manual_seed(3)
    masked = randomize_bn(sparsify(Stem(), SRigLConfig(sparsity=0.6, distribution="uniform", ablation=False)))
    model = PassManager([PadAblatedRowsPass()]).run(fold_batchnorm(condense(masked))).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
    fuse = FuseEpiloguePass("direct", LLVM)
    fused = fuse(model).module
    assert fuse.fused == {"conv1": "relu", "conv4": "relu"}
    assert type(fused) is Stem and type(fused.relu) is nn.Identity and type(fused.act4) is nn.Identity
    assert (type(fused.act2), type(fused.act3)) == (nn.SiLU, nn.GELU)  # called twice; its input used twice
    with torch.no_grad():
        torch.testing.assert_close(fused(x), before, rtol=0, atol=0)


def test_in_a_sequential_a_relu_child_moves_into_the_layer_before_it():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(12, 32), nn.Dropout(0.1), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                        nn.Identity(), nn.Linear(32, 4), nn.ReLU())
    shared = nn.ReLU()
    net.append(nn.Linear(4, 4))
    net.append(shared)
    net.extra = shared  # the same ReLU under two names: left alone
    masked = sparsify(net, SRigLConfig(sparsity=0.5, distribution="uniform", ablation=False))
    model = PassManager([PadAblatedRowsPass()]).run(condense(masked)).eval()
    x = torch.randn(5, 12)
    with torch.no_grad():
        before = model(x)
    fuse = FuseEpiloguePass("direct", LLVM)
    fused = fuse(model).module
    assert fuse.fused == {"0": "relu", "3": "relu", "6": "relu"}
    assert type(fused) is nn.Sequential and [type(fused[i]) for i in (2, 4, 7)] == [nn.Identity] * 3
    assert type(fused[9]) is nn.ReLU and fused[9] is fused.extra and not fused[8].epilogue
    with torch.no_grad():
        torch.testing.assert_close(fused(x), before, rtol=0, atol=0)
    linear_only = FuseEpiloguePass("direct", {"conv": LLVM["conv"]})
    assert not linear_only(PassManager([PadAblatedRowsPass()]).run(condense(masked)).eval()).modified


@pytest.mark.parametrize("epilogue", ["relu", "add", "add_relu", "gelu", "silu"])
def test_condensed_layers_compute_their_epilogue_as_the_reference_says(epilogue):
    torch.manual_seed(1)
    layer = condense(sparsify(nn.Sequential(nn.Conv2d(4, 6, 3, padding=1)), SRigLConfig(sparsity=0.5)))[0]
    x, residual = torch.randn(2, 4, 5, 5), torch.randn(2, 6, 5, 5)
    plain = layer(x)
    layer.set_epilogue_(epilogue)
    got = layer(x, residual=residual if "add" in epilogue else None)
    want = apply_epilogue(plain, epilogue, residual)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    unbatched = layer(x[0], residual=residual[0] if "add" in epilogue else None)
    torch.testing.assert_close(unbatched, want[0], rtol=1e-5, atol=1e-6)  # (a batch of one sums in another order)
    with pytest.raises(LayerError, match="tanh"):
        layer.set_epilogue_("tanh")
    linear = condense(sparsify(nn.Sequential(nn.Linear(4, 6)), SRigLConfig(sparsity=0.5)))[0]
    x, residual = torch.randn(2, 3, 4), torch.randn(2, 3, 6)
    plain = linear(x)
    linear.set_epilogue_(epilogue)
    torch.testing.assert_close(linear(x, residual=residual if "add" in epilogue else None),
                               apply_epilogue(plain, epilogue, residual), rtol=0, atol=0)


def test_a_layer_reachable_under_two_names_is_not_fused():
    model = _prepared()
    model.block.alias = model.block.a  # the same module twice: its epilogue would apply to both
    fuse = FuseEpiloguePass("direct", LLVM)
    fuse(model)
    assert "block.a" not in fuse.fused and isinstance(model.block.a, CondensedConv) and not model.block.a.epilogue


class GeluMLP(nn.Module):
    """GELU chains: exact ones fuse, the tanh approximation and a GELU after a residual add do not."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.fc4 = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16), \
            nn.Linear(16, 16)
        self.act = nn.GELU()

    def forward(self, x):
        h = F.gelu(self.fc1(x))                      # gelu
        h = self.act(self.fc2(h))                    # gelu (an exact nn.GELU module)
        h = F.gelu(self.fc3(h), approximate="tanh")  # not the exact GELU: none
        return F.gelu(self.fc4(h) + h)               # after an add (a Linear takes no residual anyway): none


class GeluNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = GeluMLP()
        self.seq = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(approximate="tanh"))

    def forward(self, x):
        return self.seq(self.mlp(x))


def test_exact_gelus_fuse_in_traced_parents_and_sequentials_and_outputs_do_not_change():
    fuse, fused = fused_unchanged(condensed(GeluNet()), torch.randn(3, 8))
    assert fuse.fused == {"mlp.fc1": "gelu", "mlp.fc2": "gelu", "seq.0": "gelu"}
    assert type(fused.seq[1]) is nn.Identity and type(fused.seq[3]) is nn.GELU
    relu_only = FuseEpiloguePass("direct", {"linear": frozenset({"relu"})})
    assert not relu_only(condensed(GeluNet())).modified, "a backend whose kernels compute no GELU: nothing"


class SiluMLP(nn.Module):
    """SiLU chains: the function and the module fuse, a SiLU after a residual add does not."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.act = nn.SiLU()

    def forward(self, x):
        h = F.silu(self.fc1(x))        # silu
        h = self.act(self.fc2(h))      # silu (an nn.SiLU module)
        return F.silu(self.fc3(h) + h)  # after an add: none


def test_silus_fuse_in_traced_parents_and_sequentials_and_outputs_do_not_change():
    model = condensed(nn.Sequential(SiluMLP(), nn.Linear(16, 16), nn.SiLU(inplace=True)))
    fuse, fused = fused_unchanged(model, torch.randn(3, 8))
    assert fuse.fused == {"0.fc1": "silu", "0.fc2": "silu", "1": "silu"}
    assert type(fused[2]) is nn.Identity
    gelu_only = FuseEpiloguePass("direct", {"linear": frozenset({"gelu"})})
    model = condensed(nn.Sequential(SiluMLP(), nn.Linear(16, 16), nn.SiLU(inplace=True)))
    assert not gelu_only(model).modified, "a backend whose kernels compute no SiLU: nothing"


@pytest.mark.parametrize("activation", ["gelu", "relu", nn.GELU(), F.relu, F.silu, nn.SiLU()])
def test_a_transformer_layer_s_linear1_computes_its_activation(activation):
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, activation=activation,
                                                               batch_first=True), 2, enable_nested_tensor=False)
    x = torch.randn(2, 5, 8)
    model = condensed(nn.Sequential(nn.Linear(8, 16), encoder), x)
    with torch.no_grad():
        before = model(x)
    fuse = FuseEpiloguePass("direct", LLVM)
    fused = fuse(model, Analyses(x)).module  # (the encoder's graph: torch.export on the example input)
    name = {"gelu": "gelu", F.silu: "silu"}.get(activation, "") or \
        {nn.GELU: "gelu", nn.SiLU: "silu"}.get(type(activation), "relu")
    assert {key: value for key, value in fuse.fused.items() if key.endswith("linear1")} == \
        {f"1.layers.{i}.linear1": name for i in (0, 1)}
    for layer in fused[1].layers:
        assert layer.linear1.epilogue == name and layer.activation(x) is x and not layer.activation_relu_or_gelu
    with torch.no_grad():
        torch.testing.assert_close(fused(x), before, rtol=0, atol=0)


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_layers_add_their_residuals_in_their_layers(norm_first, batch_first):
    """linear2 adds the feed-forward block's input, a batch_first self-attention's out_proj the attention block's
    (not batch_first: its output is transposed after out_proj, so torch adds it); outputs bit for bit as before,
    with masks and is_causal passed through; a Linear's add elsewhere (a traced graph) stays in torch."""
    from srigl_compile.nn.transformer_layers import ResidualEncoderLayer

    torch.manual_seed(7)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    x = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)  # 3 sequences of 5 tokens
    model = condensed(nn.Sequential(nn.Linear(16, 16), encoder), x)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    with torch.no_grad():
        before = [model(x), model[1](x, src_key_padding_mask=pad), model[1](x, mask=causal, is_causal=True)]
    fuse = FuseEpiloguePass("direct", LLVM)
    fused = fuse(model, Analyses(x)).module
    adds = {name: epilogue for name, epilogue in fuse.fused.items() if epilogue == "add"}
    children = ("linear2", "self_attn.out_proj") if batch_first else ("linear2",)
    assert adds == {f"1.layers.{i}.{child}": "add" for i in (0, 1) for child in children}
    assert all(type(encoder_layer) is ResidualEncoderLayer for encoder_layer in fused[1].layers)
    with torch.no_grad():
        after = [fused(x), fused[1](x, src_key_padding_mask=pad), fused[1](x, mask=causal, is_causal=True)]
    for got, want in zip(after, before):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_an_encoder_layer_training_with_dropout_adds_after_the_dropout():
    """Dropout comes before the residual add: in training the layers add nothing and torch adds after dropout,
    drawing the same random masks as torch's own forward."""
    torch.manual_seed(8)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.3, batch_first=True), 1,
                                    enable_nested_tensor=False)
    x = torch.randn(2, 5, 16)
    model = condensed(nn.Sequential(encoder), x)
    fused = FuseEpiloguePass("direct", LLVM)(model, Analyses(x)).module
    reference = condensed(nn.Sequential(encoder), x)
    fused.train(), reference.train()
    for encoder_layer in reference[0].layers:  # the same layers with their adds in torch
        assert type(encoder_layer) is nn.TransformerEncoderLayer
    torch.manual_seed(9)
    want = reference(x)
    torch.manual_seed(9)
    torch.testing.assert_close(fused(x), want, rtol=0, atol=0)
    fused.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), reference(x), rtol=0, atol=0)


class _Shift(nn.Identity):
    """An nn.Identity subclass with a forward of its own: not a pass-through."""

    def forward(self, x):
        return x - 1


class _ReusedRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.shifted = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), _Shift(), nn.ReLU())

    def forward(self, x):
        return self.seq(x) + self.seq[1](x - 0.5) + self.shifted(x)  # (the first ReLU called twice)


def test_sequential_activations_called_elsewhere_or_after_a_subclass_stay_in_torch():
    """Probes found both fused: the second call of the ReLU lost it (error 7.9), and the ReLU moved before a
    subclass of nn.Identity that shifts its input (error 2.7)."""
    fuse, fused = fused_unchanged(condensed(_ReusedRelu()), torch.randn(2, 8, 6, 5))
    assert fuse.fused == {} and [type(m) for m in fused.seq] == [CondensedConv, nn.ReLU]


class _OptionalIdentity(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x, identity=None):
        if identity is None:  # (a trace, whose identity is a Proxy, takes the other branch)
            identity = x
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + identity)


class _OptionalExtra(_OptionalIdentity):
    def forward(self, x, extra=None):
        y = self.conv2(torch.relu(self.conv1(x)))
        return y + extra if isinstance(extra, torch.Tensor) else y  # (a Proxy is no tensor: the add was dropped)


class _CallsBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = _OptionalIdentity(), _OptionalExtra()

    def forward(self, x):
        return self.b(self.a(x), x * 0.5)


def test_parents_whose_forward_takes_more_than_one_input_are_not_rewritten():
    """A probe found a block with ``identity=None`` raising once rewritten, and one adding an optional tensor
    dropping the add silently (3.4 off): their branches were fixed by the trace."""
    fuse, fused = fused_unchanged(condensed(_CallsBlocks()), torch.randn(2, 8, 6, 5))
    assert fuse.fused == {} and type(fused.a) is _OptionalIdentity and type(fused.b) is _OptionalExtra


class _AddThen(nn.Module):
    """A residual add followed by an activation that has no fused form after an add (no add_gelu / add_silu)."""

    def __init__(self, activation) -> None:
        super().__init__()
        self.conv, self.activation = nn.Conv2d(8, 8, 3, padding=1), activation

    def forward(self, x):
        return self.activation(self.conv(x) + x)


@pytest.mark.parametrize("activation", [F.gelu, F.silu])
def test_an_add_before_an_activation_without_an_add_form_fuses_the_add_alone(activation):
    """A mutant that fused the GELU in place of the add dropped the skip connection (4.1 off) and passed every
    test: none had an add before a GELU or SiLU."""
    fuse, fused = fused_unchanged(condensed(nn.Sequential(_AddThen(activation))), torch.randn(2, 8, 6, 6))
    assert fuse.fused == {"0.conv": "add"}
