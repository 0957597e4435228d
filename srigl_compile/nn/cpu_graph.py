"""``cpu_graph(model)``: a CPU model whose forward, once recorded for an input signature, is replayed as the list of
kernel calls and memory-writing aten ops that compute it (``runtime.call_record``), like a CUDA graph on a GPU.

Why: between a lowered model's kernels, Python runs the model's forward code, and after each kernel it runs with
cold caches. On the 2-core Xeon at batch 1, eager -> replayed, interleaved processes (``python benchmarks/ab.py
--base 3ffbdf4 --graph head --model resnet50|vit_b16 --rounds 5``): ResNet-50 25.3 -> 21.5 ms, ViT-B/16 57.8 ->
48.8 ms (1.18x both).

The rules, as for CUDA graphs:
- A recording is made on the first call with a new input signature (the tensors' shapes, strides, dtypes and
  devices; every other argument's value: plain values only, a call with any other object runs eagerly), after
  ``nn.settle`` has made that shape's measured decisions, and checked once: a replay on another input (the first
  one flipped along its last dimension) must match an eager forward on it, or ``ReplayError`` says so. Up to
  ``max_recordings`` recordings are kept; calls with other signatures run the model eagerly.
- A replay copies the inputs into the recording's own input tensors and returns new output tensors.
- State objects among the arguments (objects that declare their tensors static with ``is_compileable = True``, as
  transformers' ``StaticCache`` does; ``runtime.state_objects``) are replayed into as they are: a decoder step's
  replay writes its keys and values into the cache and advances its position, as the eager step does. A signature
  with one is first seen eagerly once (a call that replaces what the object holds, such as the lazy cache's first
  step, is not replayable); then recorded, every run of the recording starting from the object as the call found
  it; and replayed only while the object holds the same tensors. When the object dies, its recording waits for
  the next object of the same structure, which is given the recording's tensors (``nn.graph_states``): generate()
  makes a cache per call unless given one, and its steps replay without recording again. A forward that reads
  values into Python while updating one runs eagerly (a replay missing a guard could not take its update back),
  with a warning.
- ``model.forward = cpu_graph(model.forward)`` (a ``GraphedForward``, with the forward's own signature, which
  generate() reads) makes callers of the model replay, e.g. ``model.generate(...)``, as transformers does with
  ``torch.compile(model.forward)``. Calls that cannot replay say so once: a cache holding inference tensors (made
  under ``torch.inference_mode()``), calls changing what a cache holds (beam search's reordering, a sliding window's
  counter), the ``max_recordings`` limit reached.
- Values the forward reads into Python (``.item()``, ``bool(tensor)``, ``.tolist()``, ``.numpy()``: Hugging
  Face's attention masks decide on them) are guards: a replay computes each again where it was read, and a value
  other than the recorded one (NaN equals NaN) stops it, since the forward may decide otherwise on it; so does an
  op whose result has another shape. A call whose input misses the guards of every recording of its signature
  (``guard_misses`` counts them) is recorded as another variant of the signature (a padded attention mask beside
  an unpadded one), or runs eagerly once ``max_recordings`` recordings exist; ``MISSES_BEFORE_EAGER`` such calls
  in a row make the signature eager, with no replay tried (its replays kept failing, each after running up to its
  guard). A variant that cannot be recorded warns and closes the signature: its misses run eagerly. If the
  check's input (above) misses a guard, the replay is checked on the recorded input itself.
- Changing the model's parameters or buffers in place or replacing them (``load_state_dict``, with
  ``assign=True`` too; assigning a tensor attribute; ``.to()``) makes the next call record again. Replacing
  modules is not seen: record again with a new ``cpu_graph``.
- Calls that autograd would track (an input that requires grad, or parameters that require grad while grad mode is
  on) run eagerly: call under ``torch.no_grad()`` or ``torch.inference_mode()``. So do calls while a dropout or
  batch-norm module is in train mode (its draws and batch statistics), with a warning. Setting a module's public
  plain attribute (``training``, a scaling factor, a flag: ``replay_checks.Settings``) records again; objects the
  forward reads (a config) are not watched: record again with a new ``cpu_graph`` after changing one.
- ``torch.compile`` of a CpuGraph runs it as it is (its forward is ``torch.compiler.disable``d): compile the model
  or graph it, not both.
- A recording is replayed by one thread at a time, whichever thread made it (it owns its buffers: the recording
  thread's scratch buffers it used are its own afterwards, ``runtime.scratch``): a thread calling a signature while
  every recording of it replays elsewhere records a copy of its own (within ``max_recordings``), or runs eagerly.
  So threads may call one ``CpuGraph`` at once, and threads that come and go (a thread per request) share one
  recording. Recordings are made one at a time in the process (a lock: recording swaps the compiled functions
  process-wide). A ``CpuGraph`` called inside another's recording runs its model eagerly, so that the outer
  recording sees the kernels.
- A recording keeps the storage its calls touch (about what one eager forward uses): ``held_bytes``.
- A replay runs no Python: forward hooks run at a recording only (a warning names the hooked modules), and tensors
  a hook or the model keeps from the recorded call are the recording's buffers, which later replays overwrite.
- Where the first recording shows that a kernel's residual operand is never read again (a ResNet block's input,
  once its last convolution has added it), the forward is recorded again with that kernel writing its output over
  the residual (``call_record.may_write_over``): its stores then hit lines it has just read. Residuals that
  something else holds after the forward (a hook, a module attribute) are left alone. Should the second recording
  make other calls than the first, or its replay not equal the eager forward bit for bit, the forward is recorded
  once more without writing over.

Example:
    >>> graphed = cpu_graph(lower(model, example_inputs=(x,)))      # doctest: +SKIP
    >>> with torch.inference_mode():                                # doctest: +SKIP
    ...     y = graphed(x)            # records (after settling), then checks a replay
    ...     y = graphed(x2)           # same signature: replayed
"""

from __future__ import annotations

import functools
import inspect
import threading
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map

from .._warnings import warn_user
from ..errors import ReplayError
from ..runtime.call_record import (
    GuardFailed,
    dead_residuals,
    record,
    recording_here,
)
from ..runtime.state_objects import Snapshot, is_state_object
from ..runtime.value_guards import Guard
from .graph_entries import ADMIT, Entry, signature
from .graph_entries import probe as probe_input
from .graph_states import StateSignatures
from .replay_checks import Settings, hooked_modules, matches, replayed, watched
from .settle import settle

__all__ = ["CpuGraph", "GraphedForward", "cpu_graph"]

MAX_RECORDINGS = 8  # recordings kept per model (each holds about one forward's buffers)
MISSES_BEFORE_EAGER = 4  # calls of a signature in a row missing every guard, at the limit: then eager at once
_EAGER = object()  # (no replay: run the call eagerly)


class CpuGraph(torch.nn.Module):
    """See the module docstring. ``model`` stays a submodule (its state dict is this module's, under "model.")."""

    def __init__(self, model: torch.nn.Module, max_recordings: int = MAX_RECORDINGS, call=None) -> None:
        super().__init__()
        if isinstance(max_recordings, bool) or not isinstance(max_recordings, int) or max_recordings < 1:
            raise ReplayError(f"max_recordings must be >= 1, got {max_recordings!r} (an integer count of recordings)")
        self.model = model
        self.max_recordings = max_recordings
        # what computes a forward eagerly: the model, or its original forward method when the graph replaces it
        # (``GraphedForward``: the model's own calls then reach the graph, which passes them on while it records)
        self.__dict__["_call"] = call if call is not None else model  # (not a submodule a second time)
        self._entries: dict[tuple, Entry] = {}  # a signature's recordings
        self._spares: dict[tuple, list[Entry]] = {}  # copies for threads calling while the first one replays
        self._states = StateSignatures()  # signatures with state objects
        self._warned: set[str] = set()  # (warnings given once a graph)
        self._replays = [0]  # (a list: nn.Module.__setattr__ would cost ~5 us a call)
        self._guard_misses = [0]
        self._busy = threading.local()  # .active: this thread is recording (settling calls the model itself)

    @property
    def replays(self) -> int:
        """Calls answered by a replay (a call that records is answered by its first replay too; the others ran
        eagerly)."""
        return self._replays[0]

    @property
    def guard_misses(self) -> int:
        """Calls that ran eagerly because a value the forward reads into Python differed from the recorded one."""
        return self._guard_misses[0]

    @property
    def held_bytes(self) -> int:
        """Bytes of storage the recordings keep alive (parameters included)."""
        storages = {}  # (the model's parameters, which every recording holds, once)
        for entry in (*self._all_entries(), *self._states.entries()):
            for recording in entry.recordings:
                storages.update(recording.storages)
        return sum(storages.values())

    def _tracked(self, leaves: list[Any]) -> bool:
        """Whether autograd would track this call."""
        if not torch.is_grad_enabled():
            return False
        return any(isinstance(v, torch.Tensor) and v.requires_grad for v in leaves) or any(
            p.requires_grad for p in self.model.parameters())

    # torch.compile runs it as it is: tracing the replay machinery failed in dynamo's own terms
    @torch.compiler.disable
    def forward(self, *args, **kwargs):
        if getattr(self._busy, "active", False):  # (settling a model whose forward is this graph)
            return self._call(*args, **kwargs)
        if not kwargs and all(type(arg) is torch.Tensor for arg in args):  # (the common call, without pytree's cost)
            leaves, spec, states = args, len(args), []
        else:
            leaves, spec = tree_flatten((args, kwargs))
            states = [leaf for leaf in leaves if is_state_object(leaf)]
        key = signature(leaves, spec)
        if key is None or self._tracked(leaves) or recording_here():  # (inside another graph's recording: eager,
            return self._call(*args, **kwargs)                           # so that it sees the kernels)
        if self._training():
            return self._call(*args, **kwargs)
        if states and not self._states.steady(key):
            return self._states.observe(self, key, states, args, kwargs)
        entry = self._claim(key)
        if entry is None:
            with ADMIT:  # (the count and the recording together: threads recording at once keep the limit)
                entry = self._claim(key)
                if entry is None:
                    if self._recordings() >= self.max_recordings:
                        self._warn_once("limit", f"cpu_graph: max_recordings={self.max_recordings} recordings "
                                        "exist; calls of new input signatures run eagerly from now on (recordings "
                                        "go only with their state objects: a kept generate() output keeps its "
                                        "cache's). Raise max_recordings, or make a new cpu_graph")
                        return self._call(*args, **kwargs)
                    entry = self._record(args, kwargs, states)
                    if not entry.eager:
                        entry.lock.acquire()
                    if key in self._entries:  # (another thread replays the first: a copy of one's own)
                        self._spares.setdefault(key, []).append(entry)
                    else:
                        self._entries[key] = entry
        if entry.eager:  # (claimed without its lock: it replays nothing)
            return self._call(*args, **kwargs)
        try:
            return self._replay(entry, leaves, states, args, kwargs)
        finally:
            entry.lock.release()

    def _training(self) -> bool:
        """Whether a dropout or batch-norm module is in train mode: its draws and batch statistics (updated by every
        run while recording) a replay must not repeat, so such calls run eagerly, with a warning. (Other modules'
        flags are recorded: switching one records again.)"""
        if not any(m.training for m in self._stateful()):
            return False
        self._warn_once("training", "cpu_graph: the model is in train mode (dropout, batch statistics): calls run "
                        "eagerly; call model.eval() to replay")
        return True

    def _stateful(self) -> list[torch.nn.Module]:
        """The model's dropout and batch-norm modules, found once."""
        found = self.__dict__.get("_stateful_modules")
        if found is None:
            kinds = (torch.nn.modules.dropout._DropoutNd, torch.nn.modules.batchnorm._NormBase)
            found = self.__dict__["_stateful_modules"] = [m for m in self.model.modules() if isinstance(m, kinds)]
        return found

    def _claim(self, key: tuple) -> Entry | None:
        """A recording of this signature no other thread is replaying, locked for this one (an eager one, which
        replays nothing, unlocked); None if there is none free (or the model's parameters changed since they were
        recorded: they are dropped)."""
        first = self._entries.get(key)
        if first is None:
            return None
        if first.stale():
            with ADMIT:
                if self._entries.get(key) is first:
                    del self._entries[key]
                    self._spares.pop(key, None)
            return None
        if first.eager:
            return first
        return next((entry for entry in (first, *self._spares.get(key, ())) if entry.lock.acquire(blocking=False)),
                    None)

    def _replay(self, entry: Entry, leaves, states: list, args: tuple, kwargs: dict) -> Any:
        """Replay a claimed recording (``_another_variant`` where the inputs miss its guards)."""
        try:
            out = entry.replay(leaves)
        except GuardFailed as err:  # (the forward reads other values than every recording did: it may decide
            if states:              # otherwise; with state objects only an op's shape can miss: see _record)
                raise ReplayError(f"a replay that updates {type(states[0]).__name__} stopped part way ({err}): the "
                                  "object may hold a partial step; run this model eagerly") from err
            self._guard_misses[0] += 1
            out = self._another_variant(entry, args, kwargs, leaves)
            if out is _EAGER:
                return self._call(*args, **kwargs)
        entry.misses = 0
        self._replays[0] += 1
        return out

    def _warn_once(self, what: str, message: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            warn_user(message)

    def _another_variant(self, entry: Entry, args: tuple, kwargs: dict, leaves) -> Any:
        """Record this call as another variant of its signature and replay it; ``_EAGER`` where none is added: the
        limit of recordings reached or the signature closed (after ``MISSES_BEFORE_EAGER`` such calls in a row,
        the signature runs eagerly with no replay tried: its replays kept failing), or this variant cannot be
        recorded (it does what a replay cannot: the signature is closed)."""
        with ADMIT:
            if entry.closed or self._recordings() >= self.max_recordings:
                entry.misses += 1
                entry.eager = entry.misses >= MISSES_BEFORE_EAGER
                return _EAGER
            try:
                entry.recordings += self._record(args, kwargs).recordings
            except ReplayError as err:
                entry.closed = True
                warn_user(f"cpu_graph: an input of a recorded signature takes a path that cannot be recorded ({err}); "
                          "such calls run eagerly")
                return _EAGER
        try:
            return entry.recordings[-1].replay(leaves)
        except GuardFailed:  # (values that change from call to call on the same input)
            return _EAGER

    def _all_entries(self) -> list[Entry]:
        """The entries replayed (orphans, kept for a new state object, not among them)."""
        return [*self._entries.values(), *(entry for spares in self._spares.values() for entry in spares)]

    def _recordings(self) -> int:
        return sum(len(entry.recordings) for entry in self._all_entries())

    def __getstate__(self):
        """Without the recordings (they hold compiled functions and this process's buffers): a copy or a
        pickled-and-loaded CpuGraph records again at its first calls."""
        state = dict(self.__dict__)
        state["_entries"], state["_spares"], state["_states"] = {}, {}, StateSignatures()
        state["_replays"], state["_guard_misses"] = [0], [0]
        state["_busy"] = None
        return state

    def __setstate__(self, state) -> None:
        state["_busy"] = threading.local()
        super().__setstate__(state)

    def _record(self, args: tuple, kwargs: dict, states: list | tuple = ()) -> Entry:
        """Settle, record and check one signature (module docstring). With ``states`` (state objects among the
        arguments), every run starts from them as the call found them, and they are left so: the caller's replay
        then makes the call's one step."""
        if hooked := hooked_modules(self.model):
            warn_user(f"cpu_graph: forward hooks on {hooked[:5]} run while a forward is recorded, not at its "
                      "replays (a replay runs no Python), and the tensors a hook keeps from the recorded call are "
                      "the recording's buffers, which later replays overwrite. Call the model itself where the "
                      "hooks must run")
        fresh = Snapshot(list(states)).restore if states else _nothing
        run, objects = self._call, tuple(states)
        self._busy.active = True
        hook = self.model.register_forward_pre_hook(lambda *_: fresh()) if states else None
        try:
            with torch.no_grad():
                settle(self.model, *args, **kwargs)  # (its calls start fresh through the hook)
                if hook:
                    hook.remove()
                    hook = None
                # the eager probe first: after recording, the buffers the recording holds are not recycled, and an
                # eager forward then would allocate its own (ResNet-50 at batch 64: ~1 GB more)
                probe_args, probe_kwargs = tree_map(probe_input, (args, kwargs))
                fresh()
                expected = run(*probe_args, **probe_kwargs)
                probe = tree_flatten((probe_args, probe_kwargs))[0]
                fresh()
                recording = record(run, args, kwargs, objects=objects)
                try:
                    fresh()
                    recording.replay(probe)
                except GuardFailed:  # the probe reads other values (the forward's decisions): check on the call
                    fresh()
                    expected, probe = run(*args, **kwargs), tree_flatten((args, kwargs))[0]
                if plan := dead_residuals(recording):  # recorded again, the kernels writing over those residuals
                    structure = recording.structure()
                    del recording  # (first: its buffers are then recycled by the second one)
                    fresh()
                    recording = record(run, args, kwargs, write_over=plan, objects=objects)
                    # the same calls, and a replay equal to the eager forward bit for bit, or recorded without the
                    # plan (a forward that took another path the second time: the plan may not hold for it)
                    fresh()
                    if recording.structure() != structure or not matches(expected, replayed(recording, probe),
                                                                          exact=True):
                        del recording
                        fresh()
                        recording = record(run, args, kwargs, objects=objects)
                fresh()
                if not matches(expected, replayed(recording, probe)):
                    raise ReplayError("a replay of the recorded forward does not match the eager forward on another "
                                      "input: the forward computes something outside the kernels and aten ops a "
                                      "recording sees, or takes another path from call to call (state it changes, "
                                      "a counter); run this model eagerly")
        finally:
            self._busy.active = False
            if hook:
                hook.remove()
            fresh()
        entry = Entry([recording], watched(self.model), Settings(self.model))
        if states and any(isinstance(call, Guard) for call in recording.calls):
            # a replay that misses a guard has run the calls before it, the objects' updates among them: it could
            # not be taken back and run eagerly instead
            warn_user(f"cpu_graph: the forward reads tensor values into Python while it updates a "
                      f"{type(states[0]).__name__}; calls with it run eagerly")
            entry.eager = True
        return entry


def _nothing() -> None:
    pass


class GraphedForward:
    """A model's forward method replayed by a ``CpuGraph``, to be set as the model's ``forward`` (as Hugging Face
    does with ``torch.compile(model.forward)``): code that calls the model itself, such as ``generate()``, then
    runs the replays. Not a module, so that setting it registers nothing. ``graph`` counts the replays."""

    def __init__(self, graph: CpuGraph, forward) -> None:
        self.graph = graph
        # the forward's own signature, name and docs: generate() reads which arguments the forward takes (an
        # attention mask from pad tokens, logits_to_keep), and took another path with (*args, **kwargs)
        functools.update_wrapper(self, forward)

    def __call__(self, *args, **kwargs):
        return self.graph(*args, **kwargs)

    def __repr__(self) -> str:
        return f"GraphedForward({type(self.graph.model).__name__}.forward)"


def cpu_graph(model: torch.nn.Module, max_recordings: int = MAX_RECORDINGS) -> CpuGraph | GraphedForward:
    """``model`` (a CPU model, e.g. a lowered one) wrapped to record and replay its forward per input signature
    (module docstring). Nothing is recorded until the first call. Given a model's bound ``forward`` instead, a
    ``GraphedForward`` to set in its place, so that ``model.generate(...)`` and other callers of the model replay:
    ``model.forward = cpu_graph(model.forward)``.

    Raises:
        ReplayError: ``max_recordings`` < 1, a method of something else than a module's forward (and, at a
            call, a forward a replay cannot repeat).
    """
    if isinstance(model, GraphedForward):
        raise ReplayError("cpu_graph got a forward that is already a cpu_graph's (model.forward was set to one); "
                          "use it as it is")
    if inspect.ismethod(model) and isinstance(model.__self__, torch.nn.Module):
        if model.__name__ != "forward":
            raise ReplayError(f"cpu_graph takes a module or its bound forward, got its method {model.__name__}")
        return GraphedForward(CpuGraph(model.__self__, max_recordings, call=model), model)
    if not isinstance(model, torch.nn.Module):
        raise ReplayError(f"cpu_graph takes a torch.nn.Module or its bound forward (model.forward), got "
                          f"{type(model).__name__}")
    return CpuGraph(model, max_recordings)
