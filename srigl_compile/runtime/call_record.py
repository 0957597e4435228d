"""Record one eager forward of a CPU model as the list of calls that compute it, and replay that list.

Why: a lowered model's forward is mostly compiled kernels, but between two kernels Python runs the model's and the
layers' forward code (~30 us a layer with warm caches). The kernels stream megabytes through the caches, so in a
real forward that code runs cold: on the 2-core Xeon, ResNet-50 at batch 1 spends ~5 ms of a ~26 ms forward
between kernels (the same code alone: 1.8 ms). A recording keeps only what computes: each kernel call with its
arguments, and each aten op that writes memory. Replaying it runs the same kernels on the same buffers in the same
order, without the Python around them.

What a recording holds:
- every call of a registered kernel handle's compiled function (a ``*_fn`` attribute, ``runtime.registry``) made
  by the recording thread, with its arguments;
- every aten op (seen by a ``TorchDispatchMode``) that writes tensor memory: in-place ops and ops with ``out=``
  are replayed as they are; ops returning a new tensor are replayed and their result copied into the tensor they
  returned when recorded. Views, ``empty`` allocations and metadata-only ops (``set_``, ``resize_``...) are not
  replayed: their results alias storage that the recording keeps.

Writing over dead residuals: an op whose kernel adds a residual asks ``may_write_over`` first. While recording,
the answer is no, and the recording notes the question; ``dead_residuals`` then finds the residuals that were
produced by the forward and are never read after their kernel's call (``runtime.liveness``, from the byte ranges
each call reads and writes), and ``nn.cpu_graph`` records the forward again, answering yes for those: the kernel
writes its output where it has just read the residual. Eager calls are always answered no.

Tensor arguments are kept as private aliases (same storage, offset, sizes, strides), so a recording keeps alive
exactly the storage its calls touch. While recording, ``runtime.scratch`` does not count these aliases as users
of a recycled result, so the forward recycles result buffers as it would eagerly (replaying in the same order,
the reuse is the same), and a recording holds about what one eager forward uses.

Values read into Python (``.item()``, ``bool(tensor)``, ``torch.equal``, ``.tolist()``, ``.numpy()``: the forward
may decide on them, as Hugging Face's attention masks do) are kept as guards among the calls
(``runtime.value_guards``): a replay computes each again where it was read and compares it with the recorded value
(NaN equal to NaN); another value raises
``GuardFailed`` (the forward might have taken another path), and the caller runs that call eagerly. So does an op
whose result has another shape than when recorded (a custom op whose output shape follows values). The first
guard that fails is computed by calls that all precede any decision taken on a read value, so it is computed
right.

Refused, with a ``ReplayError`` before anything is kept: an op whose output shape depends on tensor values
(``nonzero``, indexing by a boolean mask; a gather by integer index tensors replays), an op that writes into the
forward's inputs, tensors on other devices than the CPU, and outputs holding anything but tensors, plain values
(``PLAIN``) and the state objects it was given (``runtime.state_objects``; a replay returns the call's own): a
growing key/value cache object would come back as recorded.

Functional aten ops with one result and an out= overload (``mul.Tensor`` -> ``mul.out``) replay through it,
writing into the recorded result instead of allocating a new one and copying it over. Ops that make their results
from plain values alone (``arange``, ``scalar_tensor``: a decoder step's positions and mask bounds) are left out
when no later call writes their results: those hold what a replay would write (``liveness.never_rewritten``).

Example:
    >>> rec = record(model, (x,), {})                   # doctest: +SKIP
    >>> y = rec.replay([x2])                            # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from torch.utils.weak import WeakIdKeyDictionary

from ..errors import ReplayError
from . import registry, scratch
from .liveness import Access, dead_after, extent, extents, never_rewritten, producer
from .out_overloads import out_overload
from .value_guards import Guard, GuardFailed, contents, reading_contents, value_read

__all__ = ["Recording", "record", "static_copy", "PLAIN", "GuardFailed", "may_write_over", "dead_residuals",
           "recording_here"]

# ops that change a tensor's metadata (or storage) and not the memory it shows: later calls were recorded with
# aliases made after them, so replaying them would change nothing a replay reads
_METADATA_ONLY = frozenset({"set_", "resize_", "resize_as_", "as_strided_", "squeeze_", "unsqueeze_", "transpose_",
                            "t_", "swapaxes_", "swapdims_", "detach_", "requires_grad_", "_coalesced_"})
_ALLOCATIONS = frozenset({"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like"})
# values a recording may take or return besides tensors: immutable, so the recorded ones are the values themselves
PLAIN = (type(None), bool, int, float, complex, str, torch.dtype, torch.device)


def _alias(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor of the recording's own on ``tensor``'s storage, offset, sizes and strides (made outside the
    recording's dispatch mode)."""
    with _disable_current_modes(), torch.inference_mode(False), torch.no_grad():
        return torch.empty(0, dtype=tensor.dtype).set_(tensor.untyped_storage(), tensor.storage_offset(),
                                                       tensor.shape, tensor.stride())


@dataclasses.dataclass
class _Call:
    fn: Callable
    args: tuple
    kwargs: dict
    results: tuple = ()  # where a functional op's results are copied (its results when recorded)
    kernel: bool = False  # a compiled function: its last tensor argument is its output, written whole
    into: Callable | None = None  # the functional op's out= overload: writes its one result in place

    def __post_init__(self) -> None:
        if self.results and not self.kernel:
            self.into = out_overload(self.fn, self.results)

    def constant(self) -> bool:
        """An aten op computing its results from plain values alone, deterministically (``arange``,
        ``scalar_tensor``): every replay would write what the recording wrote."""
        return bool(self.results) and not self.kernel and isinstance(self.fn, torch._ops.OpOverload) and \
            torch.Tag.nondeterministic_seeded not in self.fn.tags and \
            not any(isinstance(leaf, torch.Tensor) for leaf in tree_flatten((self.args, self.kwargs))[0])

    def access(self) -> Access:
        """The bytes this call reads and writes (``runtime.liveness``): a kernel reads its tensors but the last
        one, which it overwrites; a functional op reads its arguments and overwrites its results; an in-place op
        reads (and writes) everything it takes."""
        tensors = [t for t in tree_flatten((self.args, self.kwargs))[0] if isinstance(t, torch.Tensor)]
        reads, outs = (tensors[:-1], tensors[-1:]) if self.kernel and tensors else (tensors, list(self.results))
        whole = [t for t in outs if t.is_contiguous()]  # (a strided output keeps what its gaps held)
        return Access(extents(reads), extents(whole), extents(t for t in outs if not t.is_contiguous()))

    def __call__(self) -> None:
        if self.into is not None:
            self.into(*self.args, **self.kwargs, out=self.results[0])
            return
        out = self.fn(*self.args, **self.kwargs)
        if self.results:
            for target, value in zip(self.results, (t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))):
                if target.shape != value.shape:  # (an op whose output shape follows values, e.g. a custom op's)
                    raise GuardFailed(f"{self.fn} returned shape {tuple(value.shape)}, recorded {tuple(target.shape)}")
                target.copy_(value)


@dataclasses.dataclass(frozen=True)
class _Passed:
    """Where a recording had a state object: the call's own object, found at ``index`` among its leaves (a
    recording keeps no state object alive)."""

    index: int


def _shape_from_index_shapes(func, args) -> bool:
    """aten.index with integer index tensors only: its output's shape follows their shapes, not their values (the
    op is tagged dynamic-shape for boolean masks)."""
    return func.overloadpacket is torch.ops.aten.index and all(
        index is None or (isinstance(index, torch.Tensor) and not index.dtype.is_floating_point
                          and index.dtype not in (torch.bool, torch.uint8)) for index in args[1])


class _Recorder(TorchDispatchMode):
    """Collects the calls (module docstring); ``holds`` counts its aliases per storage for ``runtime.scratch``."""

    def __init__(self, input_storages: set[int], write_over: Mapping[int, tuple[int, int]] | None = None) -> None:
        super().__init__()
        self.calls: list[_Call] = []
        self.holds: dict[int, int] = {}
        # a recorded tensor -> its alias; weak, so that the recording does not keep the forward's tensors alive
        self.aliases = WeakIdKeyDictionary()
        self.kept: list[torch.Tensor] = []  # every alias made
        self.input_storages = input_storages
        self.thread = threading.get_ident()
        self.in_op = False  # inside an aten op: a kernel it calls is part of the op, not a call of its own
        # residual operands an op asked to write its output over (``may_write_over``): (call index, alias)
        self.residuals: list[tuple[int, torch.Tensor]] = []
        self.write_over = write_over or {}  # ``dead_residuals``: question -> (call index, its value's producer)
        self.accesses: list[Access] = []  # (of the calls so far, made as questions need them)

    def keep(self, value: Any) -> Any:
        """``value`` with every tensor replaced by the recording's alias of it (one alias per tensor)."""
        def swap(item):
            if not isinstance(item, torch.Tensor):
                return item
            if item.device.type != "cpu":
                raise ReplayError(f"a CPU graph records CPU models only, the forward used a {item.device.type} "
                                  "tensor; on a GPU use torch.cuda.graphs")
            alias = self.aliases.get(item)
            if alias is None:
                alias = self.aliases[item] = _alias(item)
                self.kept.append(alias)
                storage = alias.untyped_storage()._cdata
                self.holds[storage] = self.holds.get(storage, 0) + 1
            return alias
        return tree_map(swap, value)

    def forget(self, value: Any) -> None:
        """Drop the alias of ``value`` (a tensor whose metadata changed), so that its next use gets a new one."""
        if isinstance(value, torch.Tensor):
            self.aliases.pop(value, None)

    def read_contents(self, tensor: torch.Tensor) -> None:
        """A tensor's values read into Python without the dispatcher (``.tolist()``, ``.numpy()``): a guard on its
        contents."""
        if threading.get_ident() == self.thread and not self.in_op:
            with _disable_current_modes(), torch.inference_mode(False), torch.no_grad():
                recorded = tensor.detach().clone()
            self.calls.append(Guard(contents, (self.keep(tensor),), {}, recorded))

    def kernel(self, fn: Callable, args: tuple) -> None:
        if threading.get_ident() == self.thread and not self.in_op:
            self.calls.append(_Call(fn, self.keep(args), {}, kernel=True))

    def residual(self, operand: torch.Tensor) -> bool:
        """Note the question; yes only for one the plan says yes to, asked at the same call and about a value
        the same call produced as when the plan was made: a forward whose Python state reorders its layers
        between recordings must not get a yes meant for another operand (a parameter, say)."""
        asked = len(self.calls)
        self.residuals.append((asked, self.keep(operand)))
        plan = self.write_over.get(len(self.residuals) - 1)
        if plan is None or plan[0] != asked or (target := extent(operand)) is None:
            return False
        self.accesses.extend(call.access() for call in self.calls[len(self.accesses):])
        return producer(self.accesses, asked, target) == plan[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        tags = set(func.tags)
        if torch.Tag.dynamic_output_shape in tags and not _shape_from_index_shapes(func, args):
            raise ReplayError(f"the forward calls {func}, whose output shape depends on tensor values (a replay "
                              "keeps the recorded shape); run this model eagerly")
        mutates = [arg.name for arg in func._schema.arguments if arg.alias_info is not None and arg.alias_info.is_write]
        bound = dict(zip((arg.name for arg in func._schema.arguments), args)) | kwargs
        if mutates and name not in _METADATA_ONLY:
            for arg_name in mutates:
                target = bound.get(arg_name)
                if isinstance(target, torch.Tensor) and target.untyped_storage()._cdata in self.input_storages:
                    raise ReplayError(f"the forward writes into its input ({func}); a replay writes into a copy, "
                                      "so the caller's tensor would not change: clone the input first in forward")
        self.in_op = True
        try:
            out = func(*args, **kwargs)
        finally:
            self.in_op = False
        if torch.Tag.data_dependent_output in tags or (
                out is not None and not any(isinstance(t, torch.Tensor) for t in tree_flatten(out)[0])):
            if type(out) not in (bool, int, float, complex):
                raise value_read(func)
            self.calls.append(Guard(func, self.keep(args), self.keep(kwargs), out))  # (a value read into Python)
            return out
        if name in _METADATA_ONLY:  # the tensor shows other memory or sizes now: its next use gets a new alias
            for arg_name in mutates:
                self.forget(bound.get(arg_name))
            return out
        if func.is_view or name in _ALLOCATIONS:
            return out
        if mutates:
            self.calls.append(_Call(func, self.keep(args), self.keep(kwargs)))
        else:
            results = tuple(t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
            self.calls.append(_Call(func, self.keep(args), self.keep(kwargs), self.keep(results)))
        return out


_RECORDING = threading.local()  # .recorder: the recorder of this thread's forward, while one records
# One recording at a time in the process: the compiled functions are swapped for recording proxies process-wide
# (``registry.wrapped_functions``), so a second thread's recording would restore them under the first one's feet.
_RECORD_LOCK = threading.Lock()


def recording_here() -> bool:
    """Whether this thread is recording a forward (a CPU graph called inside another's recording runs eagerly,
    so that the outer one sees its kernels)."""
    return getattr(_RECORDING, "recorder", None) is not None


def may_write_over(residual: torch.Tensor) -> bool:
    """Whether the kernel call about to be made may write its output over ``residual``, its residual operand (a
    tensor of its output's layout on the residual's own storage): yes only while a CPU graph records its final
    forward, for a residual that an earlier recording of it showed is never read again (``dead_residuals``). The
    stores then land on lines the kernel has just read instead of fetching cold ones first: ResNet-50's stage-1
    1x1 convolution with its residual add, inside a forward, 1.11 -> 0.89 ms a call. Every other call: no."""
    recorder = getattr(_RECORDING, "recorder", None)
    return recorder is not None and recorder.residual(residual)


def dead_residuals(recording: Recording) -> dict[int, tuple[int, int]]:
    """The residual operands of ``recording`` (numbered in the order ``may_write_over`` was asked) that a kernel
    may overwrite: produced whole earlier in the forward, read by no other operand of their call, never read
    after it (nor part of an output) before being overwritten whole (``runtime.liveness``), and held by nothing
    else once the forward returned (a forward hook keeping a layer's output, say); each with the call
    it was asked at and the call that produced it (what ``record(write_over=...)`` checks again)."""
    accesses = [call.access() for call in recording.calls]
    outputs = extents(t for t in tree_flatten(recording.outputs)[0] if isinstance(t, torch.Tensor))
    dead = {}
    for number, (asked, operand) in enumerate(recording.residuals):
        if number in recording.held:
            continue
        target = extent(operand)
        if target is None or not operand.is_contiguous():
            continue
        # the op's call that reads the operand: the first one after the question that reads its bytes (the kernel,
        # or the copy of a residual into a padded grid; a pack of another operand may come first) ...
        index = next((i for i in range(asked, len(accesses)) if any(e.overlaps(target) for e in accesses[i].reads)),
                     None)
        # ... through that operand alone: a call reading the same bytes through another one (y = conv(x) + x) would
        # read what the op had written over them
        if index is None or sum(e.overlaps(target) for e in accesses[index].reads) != 1:
            continue
        made = producer(accesses, index, target)
        if made is not None and dead_after(accesses, index, target, outputs):
            dead[number] = (asked, made)
    return dead


def _recording_kernels(recorder: _Recorder):
    """Every registered handle's compiled functions record their calls meanwhile."""
    def proxy(handle, name, fn):
        def call(*args):
            recorder.kernel(fn, args)
            return fn(*args)
        return call
    return registry.wrapped_functions(proxy)


def _overlaps(tensor: torch.Tensor) -> bool:
    """Whether two elements of ``tensor`` may share memory (e.g. an ``expand``ed tensor): some dimension's stride
    does not pass the farthest element the smaller-strided dimensions reach. Sound, not exact: a few interleaved
    layouts that do not overlap are flagged too (and copied contiguous)."""
    reach = 0
    for stride, size in sorted((stride, size) for stride, size in zip(tensor.stride(), tensor.shape) if size > 1):
        if stride <= reach:
            return True
        reach += (size - 1) * stride
    return False


def static_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` with its strides (contiguous where elements overlap: nothing can be written through
    such a layout)."""
    if _overlaps(tensor):
        return tensor.clone(memory_format=torch.contiguous_format)
    return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype).copy_(tensor)


@dataclasses.dataclass(eq=False)
class Recording:
    """One recorded forward: its static inputs (the tensors a replay copies its inputs into), calls, and outputs.

    Attributes:
        held_bytes: bytes of the storage its calls touch and it keeps alive (parameters included).
    """

    inputs: list[Any]  # the recorded forward's flattened inputs: static tensors, other leaves as they were
    calls: list[_Call | Guard]
    outputs: Any  # aliases of the forward's output tensors (tree)
    held_bytes: int
    residuals: list[tuple[int, torch.Tensor]] = dataclasses.field(default_factory=list)  # (``may_write_over``)
    storages: Mapping[int, int] = dataclasses.field(default_factory=dict)  # the storages it holds -> their bytes
    held: frozenset[int] = frozenset()  # the residuals something outside the recording held after the forward

    def structure(self) -> list[tuple]:
        """Each call's function and tensor shapes: what two recordings of one forward share."""
        return [(call.fn, tuple(tuple(t.shape) for t in tree_flatten((call.args, call.kwargs))[0]
                                if isinstance(t, torch.Tensor))) for call in self.calls]

    def replay(self, leaves) -> Any:
        """The forward's outputs for these flattened inputs (same shapes, strides and dtypes as recorded), as new
        tensors.

        Raises:
            GuardFailed: the inputs give another value where the forward read one into Python (run it eagerly).
        """
        for static, value in zip(self.inputs, leaves):
            if isinstance(static, torch.Tensor) and static is not value:
                static.copy_(value)
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self._run(leaves)
        return self._run(leaves)

    def _run(self, leaves) -> Any:
        for call in self.calls:
            call()
        if type(self.outputs) is torch.Tensor:  # (the common output, without pytree's cost)
            return self.outputs.clone()
        return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else
                        leaves[t.index] if isinstance(t, _Passed) else t, self.outputs)

    def __len__(self) -> int:
        return len(self.calls)


def record(fn: Callable, args: tuple, kwargs: dict,
           write_over: Mapping[int, tuple[int, int]] | None = None, objects: tuple = ()) -> Recording:
    """Call ``fn(*args, **kwargs)`` once (without gradients) on static copies of the tensor inputs, recording it
    (module docstring). The copies keep the inputs' sizes, strides and dtypes. ``write_over``: the residual
    operands (``dead_residuals`` of an earlier recording of the same call) whose kernels write over them.
    ``objects``: state objects among the arguments (``runtime.state_objects``), whose tensors a replay updates as
    the forward did, so that the forward may return them as they are.

    Raises:
        ReplayError: the forward does something a replay cannot repeat (module docstring).
    """
    if recording_here():
        raise ReplayError("record() was called inside a forward this thread is recording; call the inner model "
                          "eagerly there (a CpuGraph does so by itself)")
    leaves, spec = tree_flatten((args, kwargs))
    for value in leaves:
        if isinstance(value, torch.Tensor) and value.device.type != "cpu":
            raise ReplayError(f"a CPU graph records CPU models only, got a {value.device.type} input; on a GPU use "
                              "torch.cuda.graphs")
    with torch.inference_mode(False), torch.no_grad():
        statics = [static_copy(v) if isinstance(v, torch.Tensor) else v for v in leaves]
    recorder = _Recorder({v.untyped_storage()._cdata for v in statics if isinstance(v, torch.Tensor)}, write_over)
    static_args, static_kwargs = tree_unflatten(statics, spec)
    with _RECORD_LOCK:
        _RECORDING.recorder = recorder
        try:
            with torch.inference_mode(False), torch.no_grad(), scratch.held_by_recording(recorder.holds), \
                    _recording_kernels(recorder), reading_contents(recorder.read_contents), recorder:
                out = fn(*static_args, **static_kwargs)
        finally:
            _RECORDING.recorder = None
    odd = next((leaf for leaf in tree_flatten(out)[0] if not isinstance(leaf, (torch.Tensor, *PLAIN))
                and not any(leaf is obj for obj in objects)), None)
    if odd is not None:
        raise ReplayError(f"the forward returns a {type(odd).__name__}, which a replay would return as it was "
                          "recorded, with its tensors overwritten by later replays; return tensors (e.g. a decoder "
                          "with use_cache=False), or run this model eagerly")
    # residuals something besides the recording still holds now that the forward has returned (a hook, a module
    # attribute): writing over them would change what that holder sees
    held = frozenset(number for number, (_, operand) in enumerate(recorder.residuals) if (
        users := scratch.users_besides(operand, recorder.holds.get(operand.untyped_storage()._cdata, 0))) is None
        or users > 0)
    # the state objects: their tensors are bound as they are, and a replay returns the call's own objects (a
    # recording keeps none alive)
    passed = {id(v): _Passed(i) for i, v in enumerate(leaves) if any(v is obj for obj in objects)}
    outputs = tree_map(lambda leaf: passed.get(id(leaf), leaf), recorder.keep(out))
    statics = [passed.get(id(v), v) if not isinstance(v, torch.Tensor) else v for v in statics]
    storages = {alias.untyped_storage()._cdata: alias.untyped_storage().nbytes()
                for alias in recorder.kept}
    scratch.give_up(storages)  # (the recording's own from now on: any thread may replay it)
    return Recording(statics, _without_constants(recorder.calls), outputs, sum(storages.values()),
                     recorder.residuals, storages, held)


def _without_constants(calls: list) -> list:
    """The calls but the constant ones whose results nothing rewrites (they hold what a replay would write: a
    decoder step's ``arange`` / ``scalar_tensor``, ~30 us each in a replay)."""
    candidates = [i for i, call in enumerate(calls) if isinstance(call, _Call) and call.constant()]
    if not candidates:
        return calls
    accesses = [call.access() if isinstance(call, _Call) else Access() for call in calls]
    in_place = [isinstance(call, _Call) and not call.kernel and not call.results for call in calls]
    fixed = never_rewritten(accesses, in_place, candidates)
    return [call for i, call in enumerate(calls) if i not in fixed]
