"""cpu_graph on lowered models: a replay runs the recorded kernel calls and equals the lowered model's eager forward
and the masked model on new inputs (ResNet with fused epilogues, planar and strided convolutions, batch chunks; a
ViT with attention, layer norm and GELU kernels); changed operands record again."""

import pytest
import torch

from srigl_compile import ReplayError, SRigLConfig, cpu_graph, lower, sparsify
from srigl_compile.codegen.backends.llvm import LlvmConfig
from srigl_compile.nn.lowered import LoweredConv, LoweredLinear
from srigl_compile.nn.settle import settle
from srigl_compile.zoo import ResNet, SmallViT
from tests.helpers import kernel_calls_writing_over, randomize_bn

pytestmark = pytest.mark.tvm


def _models(name):
    torch.manual_seed(0)
    if name == "resnet":
        net, x = ResNet(10, blocks=(1, 2), width=8), torch.randn(2, 3, 32, 32)
        masked = randomize_bn(sparsify(net, SRigLConfig(sparsity=0.8))).eval()
    else:
        net, x = SmallViT((3, 16, 16), 10), torch.randn(2, 3, 16, 16)
        masked = sparsify(net, SRigLConfig(sparsity=0.8, distribution="uniform"), example_inputs=(x,)).eval()
    # no dense forms: a replay must run a kernel for every layer (a trial under load may choose torch's dense path)
    return masked, lower(masked, LlvmConfig(dense_fallback=False, progress=False), example_inputs=(x,)), x


@pytest.mark.parametrize("name", ["resnet", "vit"])
@pytest.mark.parametrize("batch", [1, 3])
def test_replays_run_the_kernels_and_equal_the_eager_forward(name, batch):
    masked, lowered, x = _models(name)
    graphed = cpu_graph(lowered)
    shape = (batch, *x.shape[1:])
    with torch.inference_mode():
        for seed in range(3):
            x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
            got = graphed(x)
            torch.testing.assert_close(got, lowered(x), rtol=0, atol=0)
            torch.testing.assert_close(got, masked(x), rtol=1e-4, atol=1e-4)
    (entry,) = graphed._entries.values()
    kernels = [call for call in entry.recording.calls if type(call.fn).__module__.startswith("tvm")]
    layers = [m for m in lowered.modules() if isinstance(m, (LoweredConv, LoweredLinear))]
    assert len(kernels) >= len(layers) and graphed.replays == 3


@pytest.mark.parametrize("name", ["resnet", "vit"])
def test_layers_that_chose_their_dense_form_replay_it(name):
    """Every dense form settled and then told to choose dense: the recording holds torch's dense calls where the
    kernels were, and replays equal the eager forward bit for bit."""
    masked, _, x = _models(name)
    lowered = lower(masked, example_inputs=(x,), progress=False)
    with torch.inference_mode():
        settle(lowered, x)
    forms = [m.__dict__["_dense_form"] for m in lowered.modules() if m.__dict__.get("_dense_form") is not None]
    assert forms, "90%-sparse test models keep near-dense layers (the stem, attention) with dense forms"
    for form in forms:
        for key in form.choices:
            form.choices[key] = True
    graphed = cpu_graph(lowered)
    with torch.inference_mode():
        for seed in range(2):
            x = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
            got = graphed(x)
            torch.testing.assert_close(got, lowered(x), rtol=0, atol=0)
            torch.testing.assert_close(got, masked(x), rtol=1e-4, atol=1e-4)
    (entry,) = graphed._entries.values()
    dense = [call for call in entry.recording.calls if "mm" in str(call.fn) or "convolution" in str(call.fn)]
    assert len(dense) >= len(forms) and graphed.replays == 2


def test_changed_operands_record_again():
    masked, lowered, x = _models("resnet")
    graphed = cpu_graph(lowered)
    with torch.no_grad():
        graphed(x)
        layer = next(m for m in lowered.modules() if isinstance(m, LoweredConv) and m.direct)
        layer.values.mul_(-1.0)  # read by the kernel as it is
        torch.testing.assert_close(graphed(x), lowered(x), rtol=0, atol=0)
        layer.indices.copy_(layer.indices.flip(-1))  # other columns: the layer's offsets are derived anew
        torch.testing.assert_close(graphed(x), lowered(x), rtol=0, atol=0)
    assert graphed.replays == 3


class _Block(torch.nn.Module):
    def __init__(self, width, last=1):  # last=3: the add's convolution crops its output grid (a basic block)
        super().__init__()
        self.conv1 = torch.nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(width, width, last, padding=last // 2)

    def forward(self, x):
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + x)


class _Net(torch.nn.Module):
    """A stem and a block whose last 1x1 convolution adds the block's input; ``keep`` says what else uses it."""

    def __init__(self, keep, width=16, last=1):
        super().__init__()
        self.stem, self.block, self.keep = torch.nn.Conv2d(3, width, 3, padding=1), _Block(width, last), keep

    def forward(self, x):
        h = self.stem(x)
        y = self.block(h)
        if self.keep == "output":
            return y, h
        return y * h if self.keep == "read" else y


@pytest.mark.parametrize("keep", ["none", "output", "read"])
def test_a_residual_never_read_again_is_written_over(keep):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    masked = sparsify(_Net(keep), SRigLConfig(sparsity=0.7, distribution="uniform")).eval()
    # (kernels only: a layer this small could run its dense form instead)
    lowered = lower(masked, LlvmConfig(dense_fallback=False, progress=False), example_inputs=(x,))
    assert lowered.block.conv2.epilogue == "add_relu"  # (the add is the kernel's: the case under test)
    graphed = cpu_graph(lowered)
    with torch.inference_mode():
        for seed in range(3):
            x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
            before = x.clone()
            torch.testing.assert_close(graphed(x), lowered(x), rtol=0, atol=0)
            assert torch.equal(x, before)
    (entry,) = graphed._entries.values()
    assert len(entry.recording.residuals) == 1  # the one kernel with a residual asked
    # only where nothing reads the block's input after the add does the kernel write over it
    assert len(kernel_calls_writing_over(entry.recording)) == (1 if keep == "none" else 0)


def _answers(monkeypatch) -> list[bool]:
    """What the convolutions' ``may_write_over`` answers, call by call (recordings and eager calls alike)."""
    from srigl_compile.runtime import conv_op

    answers, real = [], conv_op.may_write_over
    monkeypatch.setattr(conv_op, "may_write_over", lambda residual: answers.append(real(residual)) or answers[-1])
    return answers


@pytest.mark.parametrize("keep", ["none", "output", "read"])
def test_a_cropped_convolution_writes_its_result_over_a_dead_residual(keep, monkeypatch):
    """The add's 3x3 convolution copies the residual into its padded output grid, and its crop may then write the
    result over the residual: only where nothing reads it after the block."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    masked = sparsify(_Net(keep, last=3), SRigLConfig(sparsity=0.7, distribution="uniform")).eval()
    lowered = lower(masked, LlvmConfig(dense_fallback=False, progress=False), example_inputs=(x,))
    assert lowered.block.conv2.epilogue == "add_relu"
    answers = _answers(monkeypatch)
    graphed = cpu_graph(lowered)
    with torch.inference_mode():
        for seed in range(3):
            x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
            before = x.clone()
            got = graphed(x)
            torch.testing.assert_close(got, lowered(x), rtol=0, atol=0)
            torch.testing.assert_close(got, masked(x), rtol=1e-4, atol=1e-4)
            assert torch.equal(x, before)
    (entry,) = graphed._entries.values()
    assert len(entry.recording.residuals) == 1
    # the final recording's one question, then the three eager calls': yes only for a dead residual, in the recording
    assert answers[-4:] == [keep == "none", False, False, False] and answers.count(True) == (keep == "none")


def test_basic_blocks_write_over_their_inputs(monkeypatch):
    """A ResNet-18's blocks: each second 3x3 convolution adds the block's input (or its shortcut's output)."""
    from srigl_compile.zoo import CifarResNet18

    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    masked = randomize_bn(sparsify(CifarResNet18(10, width=8), SRigLConfig(sparsity=0.9))).eval()
    lowered = lower(masked, LlvmConfig(dense_fallback=False, progress=False), example_inputs=(x,))
    answers = _answers(monkeypatch)
    graphed = cpu_graph(lowered)
    with torch.inference_mode():
        for seed in range(3):
            x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
            got = graphed(x)
            torch.testing.assert_close(got, lowered(x), rtol=0, atol=0)
            torch.testing.assert_close(got, masked(x), rtol=1e-4, atol=1e-4)
    (entry,) = graphed._entries.values()
    asked = len(entry.recording.residuals)  # (not the last stages' blocks: planar outputs are not written over)
    # the final recording's questions, then the three eager forwards' (each asks as many)
    assert asked >= 6 and answers[-4 * asked:] == [True] * asked + [False] * 3 * asked, "every residual is dead"
    assert answers.count(True) == asked


@pytest.mark.parametrize("name", ["resnet", "vit"])
def test_model_blocks_write_over_their_inputs(name):
    """ResNet blocks whose residual is their input; a ViT's attention and MLP outputs (the residual stream)."""
    masked, _, x = _models(name)
    # (kernels only: layers this small could run their dense forms instead)
    lowered = lower(masked, LlvmConfig(dense_fallback=False, progress=False), example_inputs=(x,))
    graphed = cpu_graph(lowered)
    # the ViT's 17 tokens an image in whole tiles of rows (64 images): outputs laid out as their residuals
    shape = (64, *x.shape[1:]) if name == "vit" else x.shape
    with torch.inference_mode():
        for seed in range(2):
            x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(graphed(x), lowered(x), rtol=0, atol=0)
    (entry,) = graphed._entries.values()
    assert len(kernel_calls_writing_over(entry.recording)) >= 2


class _Shifted(torch.nn.Module):
    """A 1x1 convolution adding a learned map: a parameter as its residual."""

    def __init__(self, width):
        super().__init__()
        self.conv, self.pos = torch.nn.Conv2d(width, width, 1), torch.nn.Parameter(torch.randn(1, width, 8, 8))

    def forward(self, x):
        return self.conv(x) + self.pos


class _Reordering(torch.nn.Module):
    """Runs its two residual layers in the other order on every call (the same result): a recording made again
    sees its questions in another order."""

    def __init__(self, width=16):
        super().__init__()
        self.stem, self.a, self.b, self.calls = torch.nn.Conv2d(3, width, 3, padding=1), _Block(width), \
            _Shifted(width), 0

    def forward(self, x):
        h = self.stem(x)
        g = torch.relu(h)
        self.calls += 1
        y, z = (self.a(h), self.b(g)) if self.calls % 2 else (None, self.b(g))
        return y + z if y is not None else self.a(h) + z


def _lowered(net, x):
    masked = sparsify(net, SRigLConfig(sparsity=0.7, distribution="uniform")).eval()
    return lower(masked, LlvmConfig(dense_fallback=False, progress=False), example_inputs=(x,))


def test_a_forward_that_reorders_its_layers_never_writes_over_a_parameter():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    lowered = _lowered(_Reordering(), x)
    assert lowered.b.conv.epilogue == "add"
    pos = lowered.b.pos.detach().clone()
    with torch.inference_mode():
        expected = lowered(x)
        torch.testing.assert_close(cpu_graph(lowered)(x), expected, rtol=0, atol=0)
        assert torch.equal(lowered.b.pos, pos)
        torch.testing.assert_close(lowered(x), expected, rtol=0, atol=0)


def test_threads_recording_at_once_and_graphs_inside_graphs():
    import threading

    from srigl_compile.runtime import registry

    torch.manual_seed(0)
    lowered = _lowered(_Net("none"), torch.randn(2, 3, 8, 8))
    graphed, failures, barrier = cpu_graph(lowered), [], threading.Barrier(2)

    def worker(batch):
        with torch.inference_mode():
            x = torch.randn(batch, 3, 8, 8)
            barrier.wait()  # (both record at once: one waits for the other's recording)
            try:
                torch.testing.assert_close(graphed(x), lowered(x), rtol=0, atol=0)
            except Exception as err:  # (collected: an assert in a thread would not fail the test)
                failures.append(err)

    threads = [threading.Thread(target=worker, args=(batch,)) for batch in (1, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures and len(graphed._entries) == 2
    assert not [name for handle in registry.registered_handles() for name, fn in vars(handle).items()
                if name.endswith("_fn") and "_recording_kernels" in getattr(fn, "__qualname__", "")]
    outer = cpu_graph(torch.nn.Sequential(cpu_graph(lowered), torch.nn.ReLU()))  # (the inner one runs eagerly)
    with torch.inference_mode():
        for seed in range(2):
            x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(outer(x), torch.relu(lowered(x)), rtol=0, atol=0)


def test_a_recording_replays_on_other_threads_while_its_thread_runs_eager_calls():
    """A recording owns the scratch buffers it used (padded images, tiles): the thread that made it runs eager
    calls on buffers of its own meanwhile, as another thread replays it (threads that come and go share it)."""
    import threading

    masked, lowered, x = _models("resnet")
    graphed = cpu_graph(lowered)
    inputs = [torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)) for seed in range(6)]
    with torch.inference_mode():
        want = [lowered(x) for x in inputs]
        graphed(inputs[0])  # (recorded on this thread)
    failures, stop = [], threading.Event()

    def replay():
        with torch.inference_mode():
            while not stop.is_set():
                for x, y in zip(inputs, want):
                    try:
                        torch.testing.assert_close(graphed(x), y, rtol=0, atol=0)
                    except Exception as err:  # (collected: an assert in a thread would not fail the test)
                        failures.append(err)

    thread = threading.Thread(target=replay)
    thread.start()
    with torch.inference_mode():
        for _ in range(10):
            for x, y in zip(inputs[::-1], want[::-1]):
                torch.testing.assert_close(lowered(x), y, rtol=0, atol=0)
    stop.set()
    thread.join()
    assert not failures and graphed._recordings() == 1 and graphed.replays > 1


class _Alternating(torch.nn.Module):
    """The same function on every call, but which tensor it reads after the block alternates: the block's input
    (live after the block) or a copy of it (then the input is dead)."""

    def __init__(self, width=16):
        super().__init__()
        self.stem, self.block, self.calls = torch.nn.Conv2d(3, width, 3, padding=1), _Block(width), 0

    def forward(self, x):
        h = self.stem(x)
        self.calls += 1
        copy = h.clone()
        return self.block(h) + 1e-6 * (copy if self.calls % 2 else h)


def test_residuals_held_elsewhere_or_read_on_another_path_are_not_written_over():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    lowered = _lowered(_Net("none"), x)
    kept = []
    lowered.stem.register_forward_hook(lambda module, inputs, output: kept.append(output))  # holds the residual
    graphed = cpu_graph(lowered)
    with torch.inference_mode():
        with pytest.warns(UserWarning, match=r"forward hooks on \['stem'\]"):
            torch.testing.assert_close(graphed(x), lowered(x), rtol=0, atol=0)
    (entry,) = graphed._entries.values()
    assert not kernel_calls_writing_over(entry.recording)  # (without the hook: 1, test_a_residual_never_read_again_...)
    alternating = _lowered(_Alternating(), x)  # planned on one path, recorded again on the other
    alternating.calls = 0  # (settling and the probe take two calls: the first recording reads the copy)
    graphed = cpu_graph(alternating)
    with torch.inference_mode():
        for seed in range(3):
            x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(graphed(x), alternating(x), rtol=0, atol=0)  # (both paths: one function)


class _LateLayer(torch.nn.Module):
    """Runs its second convolution from its third call on: settling and the probe skip it, the recording does
    not (its first call at the size, computing the size's offsets, is inside the recording)."""

    def __init__(self, width=16):
        super().__init__()
        self.a, self.b, self.calls = torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.Conv2d(width, width, 3), 0

    def forward(self, x):
        self.calls += 1
        h = self.a(x)
        return self.b(h) if self.calls > 2 else h


def test_a_forward_taking_another_path_while_recording_is_named_so():
    x = torch.randn(1, 3, 8, 8)
    net = _LateLayer()
    net.calls = 10  # (sparsifying and lowering trace the forward that runs both layers)
    lowered = _lowered(net, x)
    assert isinstance(lowered.b, LoweredConv)
    lowered.calls = 0
    x = torch.randn(1, 3, 11, 9)  # (a size the layers have not run at)
    with torch.inference_mode(), pytest.raises(ReplayError, match="takes another path from call to call"):
        cpu_graph(lowered)(x)
    with torch.inference_mode():
        assert lowered(x).shape == (1, 16, 9, 7), "the model runs eagerly as before"
