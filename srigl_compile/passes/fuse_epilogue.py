"""FuseEpiloguePass: a layer's residual add and activation computed by its kernel, on the tile it writes.

In a lowered ResNet the ReLUs and residual adds after the convolutions are separate torch ops, each reading and
writing a whole activation (49 ReLUs and 16 adds: about a fifth of a batch-1 ResNet-50 forward); in a ViT the
GELUs after each MLP's first layer (12 of them, ~4 ms of a batch-1 ViT-B/16 forward); SiLUs likewise (EfficientNet,
YOLO, LLaMA-style MLPs); in a torch TransformerEncoderLayer its two residual adds (24 in ViT-B/16). Five rewrites:

- in an ``nn.Sequential`` (the model itself included), a condensed layer followed (past nn.Identity / eval
  Dropout children) by an ``nn.ReLU``, exact ``nn.GELU`` or ``nn.SiLU`` child that the captured forward calls
  once, as the only reader of the layer's output: the layer computes the activation and the child becomes
  nn.Identity;
- in ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` (whose forward does not trace), ``linear1``
  computes the layer's ReLU / exact GELU / SiLU ``activation``, which becomes ``no_activation`` (or nn.Identity);
- in ``nn.TransformerEncoderLayer``, ``linear2`` adds the feed-forward block's input and a batch_first condensed
  self-attention's ``out_proj`` the attention block's; the layer becomes ``nn.transformer_layers.ResidualEncoderLayer``
  (torch's forward with those adds passed to the layers as ``residual=``);
- in the forward of any other module that calls a condensed layer (its parent; not the model itself, which keeps
  its class and forward), the chain

    layer -> [nn.Identity (a folded BatchNorm) | nn.Dropout (eval)]* -> [add(., other)] -> [relu | gelu | silu]

  where each link is the only use of the one before (no GELU or SiLU after an add; ``other`` not the chain's own
  value), in a parent whose forward takes one input and updates none in place (``x += ...``, which a trace records
  out of place): the parent is rewritten as an ``fx.GraphModule`` (``traced_parent``: its class a base, its
  submodules, attributes and methods kept) whose layer call takes ``residual=other`` and whose add and activation
  nodes are gone;
- in the model's own forward (a torchvision ResNet's stem: ``self.relu(self.bn1(self.conv1(x)))``), a child
  layer followed (past pass-through modules) by an activation *module* that the forward calls once and only there
  (the only use of the chain before it): the layer computes it and the module becomes nn.Identity, so the forward
  runs unchanged; an activation *function* there (``F.relu``) stays in torch.

The layer's ``epilogue`` ("relu", "add", "add_relu", "gelu", "silu") says what it now computes (``set_epilogue_``),
and its kernel computes it (``runtime.spec.apply_epilogue`` is the reference). Which epilogues a layer kind may take
is the backend's (``Backend.epilogues``: on llvm all five for both). A Linear layer's add is fused only in an
encoder layer, where the residual has the layer's output shape by construction: a traced graph carries no shapes,
and a kernel adds a residual that broadcasts to its output, not one its output would broadcast to.

Contract.
    requires: condensed layers, after CondensePass, FoldBatchNormPass and PadAblatedRowsPass (a fold turns
              conv -> BatchNorm -> relu into conv -> Identity -> relu; a padded layer's kernel writes its whole
              output); inference (the model is returned in eval mode).
    ensures:  outputs unchanged: bit for bit with ReLU and adds (the kernel computes relu(layer + bias + other):
              the same float operations in the same order), to ~1e-6 relative with GELU and SiLU (the kernels'
              erf is a rational approximation, their exp a polynomial, each good to a few float32 ulps). Only
              layers that (1) their kernel can compute an epilogue for (``nn.lowered.can_fuse_epilogue``) and
              whose backend computes that epilogue, (2) are
              reachable under one name and called once in the model's graph (a torch transformer layer's linear1:
              one name; its layer may run any number of times), (3) sit in an nn.Sequential or a torch transformer
              layer, or in a parent other than the model itself that symbolic_trace can trace and whose forward
              takes one argument without a default, or directly in such a model before an activation module it
              calls once and nowhere else; the add's other
              operand is a tensor node, and an in-place add (``+=``, ``add_``) must update the layer's own output;
              an activation child of a Sequential is replaced only when it has one name. Everything else is left
              as it was.
    preserves: OUTPUT_SHAPES (no size changes). Not GRAPH: the graph loses nodes.
"""

from __future__ import annotations

import collections
import logging
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import TraceError
from ..nn.condensed import CondensedConv, CondensedLinear
from ..nn.condensed_attention import CondensedMultiheadAttention
from ..nn.forward_signature import takes_one_input, updates_inputs_in_place
from ..nn.lowered import can_fuse_epilogue
from ..nn.transformer_layers import ResidualEncoderLayer
from .analysis import GRAPH, OUTPUT_SHAPES, Analyses
from .base import Pass, PassResult, replace_submodule
from .graph_capture import module_calls, trace_module
from .traced_parent import traced_parent

__all__ = ["FuseEpiloguePass"]

log = logging.getLogger(__name__)

# in eval mode the identity; exactly these classes (a subclass may have a forward of its own)
_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)
_ADDS = (operator.add, torch.add)
_INPLACE_ADDS = (operator.iadd,)
_RELUS = (F.relu, torch.relu, torch.relu_)
_GELUS = (F.gelu,)
_SILUS = (F.silu,)
_TRANSFORMER_LAYERS = (nn.TransformerEncoderLayer, ResidualEncoderLayer, nn.TransformerDecoderLayer)  # act(linear1(x))


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _module(node: fx.Node, modules: dict) -> nn.Module | None:
    return modules.get(node.target) if node.op == "call_module" else None


def _pass_through_chain(call: fx.Node, modules: dict) -> list[fx.Node]:
    """``call`` and the pass-through module calls after it (nn.Identity, eval Dropout), each the only use of the
    one before."""
    chain = [call]
    while (user := _only_user(chain[-1])) is not None and type(_module(user, modules)) in _PASS_THROUGH:
        chain.append(user)
    return chain


def _read_only_by(calls: list, layer: str, activation: str, between: set[str]) -> bool:
    """Whether, in the captured graph's module ``calls`` (``graph_capture.module_calls``), the only reader of
    ``layer``'s output is ``activation``'s call, past calls of the modules ``between`` (each read only by the
    next; a pass-through module may leave no node, as in an exported graph)."""
    owner = {node: call.module for call in calls for node in call.nodes}
    by_name = {call.module: call for call in calls}
    call = by_name.get(layer)
    node = call.output if call is not None else None
    while node is not None and len(node.users) == 1:
        module = owner.get(next(iter(node.users)))
        if module == activation:
            return True
        node = by_name[module].output if module in between else None
    return False


def _residual_of(add: fx.Node, value: fx.Node) -> fx.Node | None:
    """The other operand when ``add`` adds ``value`` and another tensor node (no alpha, no in-place update of the
    other operand); else None (``value + value`` too: the kernel's output cannot be its own residual)."""
    inplace = (add.op == "call_function" and add.target in _INPLACE_ADDS) or \
        (add.op == "call_method" and add.target == "add_")
    plain = (add.op == "call_function" and add.target in _ADDS) or (add.op == "call_method" and add.target == "add")
    if not (inplace or plain) or add.kwargs or len(add.args) != 2:
        return None
    first, second = add.args
    if first is second:
        return None
    if first is value and isinstance(second, fx.Node):
        return second
    if second is value and isinstance(first, fx.Node) and not inplace:
        return first
    return None


def _activation_of(node: fx.Node, modules: dict) -> str:
    """"relu", "gelu" (exact) or "silu" when ``node`` applies it to its one input, else ""."""
    if node.op == "call_function" and node.target in _RELUS:
        return "relu" if len(node.args) == 1 and set(node.kwargs) <= {"inplace"} else ""
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return "relu" if len(node.args) == 1 and not node.kwargs else ""
    if node.op == "call_function" and node.target in _GELUS:
        exact = node.kwargs.get("approximate", "none") == "none" and set(node.kwargs) <= {"approximate"}
        return "gelu" if len(node.args) == 1 and exact else ""
    if node.op == "call_function" and node.target in _SILUS:
        return "silu" if len(node.args) == 1 and set(node.kwargs) <= {"inplace"} else ""
    return _activation_module(_module(node, modules))


def _activation_module(module) -> str:
    """"relu" for nn.ReLU, "gelu" for an exact nn.GELU, "silu" for nn.SiLU (the function forms:
    ``_activation_function``), else ""."""
    if type(module) is nn.ReLU:
        return "relu"
    if type(module) is nn.SiLU:
        return "silu"
    return "gelu" if type(module) is nn.GELU and module.approximate == "none" else ""


def _activation_function(function) -> str:
    """What a transformer layer's ``activation`` attribute computes ("relu", "gelu", "silu" or "")."""
    if function in _RELUS:
        return "relu"
    if function in _SILUS:
        return "silu"
    return "gelu" if function in _GELUS else _activation_module(function)


def no_activation(x: torch.Tensor) -> torch.Tensor:
    """The activation of a transformer layer whose ``linear1`` computes it (module level: pickled by name)."""
    return x


def _fuse_one(graph: fx.Graph, call: fx.Node, modules: dict, allowed: frozenset[str]) -> str:
    """Rewrite the chain after ``call`` (a layer's call node) in ``graph`` into a call computing the longest
    epilogue in ``allowed``; the epilogue fused ("" when none)."""
    chain = _pass_through_chain(call, modules)
    end = chain[-1]
    epilogue, residual, nodes = "", None, []
    user = _only_user(end)
    if user is not None and "add" in allowed and (residual := _residual_of(user, end)) is not None:
        epilogue, end = "add", user
        nodes.append(user)
        user = _only_user(end)
    activation = _activation_of(user, modules) if user is not None else ""
    fused = {"relu": "add_relu" if epilogue else "relu", "gelu": "" if epilogue else "gelu",
             "silu": "" if epilogue else "silu"}.get(activation, "")
    if fused and fused in allowed:  # (no "add_gelu" / "add_silu": such an activation stays in torch)
        epilogue, end = fused, user
        nodes.append(user)
    if not epilogue:
        return ""
    with graph.inserting_before(end):
        kwargs = dict(call.kwargs, residual=residual) if residual is not None else dict(call.kwargs)
        fused = graph.call_module(call.target, call.args, kwargs)
    end.replace_all_uses_with(fused)
    for node in reversed(chain + nodes):
        graph.erase_node(node)
    return epilogue


_KINDS = {CondensedLinear: "linear", CondensedConv: "conv"}


class FuseEpiloguePass(Pass):
    """Fuse each condensed layer's residual add and ReLU into its kernel (see the module's contract).

    Args:
        conv_route: the backend's convolution route (``Backend.conv_route``).
        epilogues: what the backend's kernels compute, per op kind (``Backend.epilogues``).
    """

    preserves = frozenset({OUTPUT_SHAPES})

    def __init__(self, conv_route: str, epilogues: dict[str, frozenset[str]]) -> None:
        self.conv_route = conv_route
        self.epilogues = epilogues
        self.fused: dict[str, str] = {}  # layer name -> epilogue
        self._calls: collections.Counter = collections.Counter()  # module name -> its calls in the graph
        self._module_calls: list = []  # (graph_capture.ModuleCall, the captured forward's)

    def _allowed(self, layer: nn.Module) -> frozenset[str]:
        return self.epilogues.get(_KINDS.get(type(layer), ""), frozenset())

    def _candidates(self, model: nn.Module, analyses: Analyses) -> dict[str, list[str]]:
        """parent name -> names (relative to it) of the layers it may fuse."""
        layers = [name for name, m in model.named_modules() if type(m) in _KINDS and not m.epilogue
                  and self._allowed(m) and can_fuse_epilogue(m, self.conv_route)]
        if not layers:
            return {}
        try:
            self._module_calls = module_calls(analyses.get(GRAPH, model))
        except TraceError as err:
            log.info("no epilogue fusion (the graph cannot be captured: %s)", err)
            return {}
        self._calls = calls = collections.Counter(c.module for c in self._module_calls)
        names_of = collections.Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
        parents: dict[str, list[str]] = {}
        for name in layers:
            if calls[name] == 1 and names_of[id(model.get_submodule(name))] == 1:
                parent, _, child = name.rpartition(".")
                parents.setdefault(parent, []).append(child)
        return parents

    def _fuse_sequential(self, model: nn.Module, parent_name: str, children: list[str], names_of) -> None:
        """A layer child followed by an nn.ReLU / exact nn.GELU / nn.SiLU child (past pass-through children)
        computes it, where the captured forward reads the layer's output only through them (a forward that loops
        over the Sequential may also keep the layer's own output: a feature extractor's pre-activation features)."""
        parent = model.get_submodule(parent_name)
        keys = list(parent._modules)
        qualified = (lambda key: f"{parent_name}.{key}") if parent_name else (lambda key: key)
        for child in children:
            layer, start = parent._modules[child], keys.index(child) + 1
            at = start
            while at < len(keys) and type(parent._modules[keys[at]]) in _PASS_THROUGH:
                at += 1
            module = parent._modules[keys[at]] if at < len(keys) else None
            activation = _activation_module(module)
            # (called once: the forward may also call the child itself, self.seq[1](y), which must keep it)
            called_once = at < len(keys) and self._calls[qualified(keys[at])] == 1
            if activation and called_once and not _read_only_by(self._module_calls, qualified(child),
                                                                 qualified(keys[at]),
                                                                 {qualified(key) for key in keys[start:at]}):
                log.info("%s: its output is read outside the activation after it, which stays in torch",
                         qualified(child))
                continue
            if activation and names_of[id(module)] == 1 and called_once and activation in self._allowed(layer):
                layer.set_epilogue_(activation)
                parent._modules[keys[at]] = nn.Identity()
                self.fused[f"{parent_name}.{child}" if parent_name else child] = activation

    def _fuse_root_activations(self, model: nn.Module, children: list[str], names_of) -> None:
        """In the model's own forward, a child layer followed (past pass-through modules, each the only use of the
        one before) by an activation module that the forward calls there and nowhere else computes it; the module
        becomes nn.Identity and the forward runs as it was."""
        if not takes_one_input(model):
            log.info("the model's forward takes more than one input: its own activations stay in torch")
            return
        try:
            graph = trace_module(model)
        except Exception as err:  # fx raises many types on code it cannot follow
            log.info("the model's forward is not traceable: its own activations stay in torch (%s)",
                     f"{type(err).__name__}: {err}".splitlines()[0][:200])
            return
        modules = dict(model.named_modules())
        calls = collections.Counter(n.target for n in graph.nodes if n.op == "call_module")
        for node in [n for n in graph.nodes if n.op == "call_module" and n.target in children]:
            user = _only_user(_pass_through_chain(node, modules)[-1])
            module = _module(user, modules) if user is not None else None
            activation, layer = _activation_module(module), modules[node.target]
            if activation and calls[user.target] == 1 and names_of[id(module)] == 1 and \
                    activation in self._allowed(layer):
                layer.set_epilogue_(activation)
                replace_submodule(model, user.target, nn.Identity())
                self.fused[node.target] = activation

    def _fusable(self, layer, epilogue: str, names_of) -> bool:
        """Whether ``layer`` (a module, or None) can take ``epilogue`` here: a condensed layer under one name, with
        none yet, whose kernel and backend compute it."""
        return type(layer) in _KINDS and not layer.epilogue and names_of[id(layer)] == 1 and \
            can_fuse_epilogue(layer, self.conv_route) and epilogue in self._allowed(layer)

    def _fuse_encoder_residuals(self, model: nn.Module, names_of) -> None:
        """torch's TransformerEncoderLayer adds each block's input to its output: ``linear2`` adds the feed-forward
        block's, and a batch_first condensed self-attention's ``out_proj`` the attention block's (not batch_first,
        its output is transposed after out_proj); the layer becomes a ``ResidualEncoderLayer``, whose forward
        passes them. The residual has the layer's output shape by construction, which a traced graph (no shapes)
        cannot promise: elsewhere Linear layers' adds stay in torch."""
        for name, layer in model.named_modules():
            if type(layer) not in (nn.TransformerEncoderLayer, ResidualEncoderLayer):
                continue
            attention = layer.self_attn
            out_proj = attention.out_proj if isinstance(attention, CondensedMultiheadAttention) and \
                attention.batch_first else None
            fused = [(child, module) for child, module in (("linear2", layer.linear2), ("self_attn.out_proj", out_proj))
                     if self._fusable(module, "add", names_of)]
            for child, module in fused:
                module.set_epilogue_("add")
                self.fused[f"{name}.{child}" if name else child] = "add"
            if fused:
                layer.__class__ = ResidualEncoderLayer

    def _fuse_transformer_layers(self, model: nn.Module, names_of) -> None:
        """torch's transformer layers apply ``self.activation`` to ``self.linear1``'s output, once per call (their
        forward, with its fast-path checks, does not trace, and needs no graph: it is torch's): linear1 computes
        a ReLU / exact GELU / SiLU activation, which becomes ``no_activation`` (nn.Identity for a module; the native
        fast path, which would bypass the layers, stays off)."""
        for name, parent in model.named_modules():
            if type(parent) not in _TRANSFORMER_LAYERS:
                continue
            layer, activation = parent.linear1, _activation_function(parent.activation)
            if activation and self._fusable(layer, activation, names_of):
                layer.set_epilogue_(activation)
                parent.activation = nn.Identity() if isinstance(parent.activation, nn.Module) else no_activation
                parent.activation_relu_or_gelu = 0
                self.fused[f"{name}.linear1" if name else "linear1"] = activation

    def call(self, model: nn.Module, analyses: Analyses) -> PassResult:
        self.fused = {}
        names_of = collections.Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
        self._fuse_transformer_layers(model, names_of)
        self._fuse_encoder_residuals(model, names_of)
        candidates = self._candidates(model, analyses)
        for parent_name in [p for p in candidates if type(model.get_submodule(p)) is nn.Sequential]:
            self._fuse_sequential(model, parent_name, candidates.pop(parent_name), names_of)
        if "" in candidates:  # the model's own children: activation modules only, its forward is never rewritten
            self._fuse_root_activations(model, candidates.pop(""), names_of)
        # Deepest parents first: rewriting a parent turns its nested children into plain containers. The model
        # itself is never rewritten: it keeps its class and forward.
        for parent_name in sorted((p for p in candidates if p), key=lambda name: -name.count(".")):
            children = candidates[parent_name]
            parent = model.get_submodule(parent_name)
            if not takes_one_input(parent):  # (a trace would fix its branches on the others: a probe found
                # `if identity is None` raising once rewritten, an optional tensor's add dropped silently)
                log.info("%s: its forward takes more than one input, whose branches a trace would fix: its layers "
                         "keep their epilogues in torch", parent_name)
                continue
            if updates_inputs_in_place(parent):  # (its trace would not: a probe found the caller's tensor unchanged)
                log.info("%s: its forward may update its input in place (x += ..., which its trace would not), or "
                         "its source cannot be read to tell: its layers keep their epilogues in torch", parent_name)
                continue
            try:
                graph = trace_module(parent)
            except Exception as err:  # fx raises many types on code it cannot follow: that parent stays as it is
                log.info("%s: not traceable, its layers keep their epilogues in torch (%s)", parent_name,
                         f"{type(err).__name__}: {err}".splitlines()[0][:200])
                continue
            modules = dict(parent.named_modules())
            fused = {}
            for node in [n for n in graph.nodes if n.op == "call_module" and n.target in children]:
                allowed = self._allowed(modules[node.target])
                if type(modules[node.target]) is CondensedLinear:  # (its adds: see _fuse_encoder_residuals)
                    allowed = allowed - {"add", "add_relu"}
                if (epilogue := _fuse_one(graph, node, modules, allowed)):
                    fused[node.target] = epilogue
            if not fused:
                continue
            for node in graph.nodes:  # postponed annotations are strings, which GraphModule cannot pickle
                node.type = None
            graph.lint()
            rewritten = traced_parent(parent, graph)
            rewritten.train(parent.training)
            for child, epilogue in fused.items():
                rewritten.get_submodule(child).set_epilogue_(epilogue)
                self.fused[f"{parent_name}.{child}"] = epilogue
            replace_submodule(model, parent_name, rewritten)
        if self.fused:
            log.info("fused %d epilogues: %s", len(self.fused), collections.Counter(self.fused.values()))
        return PassResult(model, modified=bool(self.fused))
