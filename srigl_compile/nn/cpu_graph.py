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
  on) run eagerly: call under ``torch.no_grad()`` or ``torch.inference_mode()``.
- Each thread records and replays its own recordings (a recording's temporaries are its thread's scratch buffers,
  ``runtime.scratch``), so threads may call one ``CpuGraph`` at once; recordings are made one at a time in the
  process (a lock: recording swaps the compiled functions process-wide). A ``CpuGraph`` called inside another's
  recording runs its model eagerly, so that the outer recording sees the kernels.
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

import dataclasses
import threading
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map

from .._warnings import warn_user
from ..errors import ReplayError
from ..runtime.call_record import (
    PLAIN,
    GuardFailed,
    Recording,
    dead_residuals,
    record,
    recording_here,
    static_copy,
)
from .condensed_tensors import version_of
from .settle import settle

__all__ = ["CpuGraph", "cpu_graph"]

MAX_RECORDINGS = 8  # recordings kept per model (each holds about one forward's buffers)
MISSES_BEFORE_EAGER = 4  # calls of a signature in a row missing every guard, at the limit: then eager at once
_EAGER = object()  # (no replay: run the call eagerly)
# Decisions to record, taken with the count of recordings: threads recording at once would pass the limit together.
# Reentrant: settling a model may call another CpuGraph inside it, which records too.
_ADMIT = threading.RLock()


@dataclasses.dataclass(eq=False)
class _Entry:
    recordings: list[Recording]  # one per set of values the forward read into Python (guards), in recording order
    # the model's parameters and buffers: (the dict holding one, its name there, the tensor, its version)
    watched: tuple[tuple[dict, str, torch.Tensor, int | None], ...]
    closed: bool = False  # no more variants (one could not be recorded): calls missing every guard run eagerly
    misses: int = 0  # calls in a row that missed every recording's guards with no variant added
    eager: bool = False  # ``MISSES_BEFORE_EAGER`` such calls: the signature runs eagerly, no replay tried

    @property
    def recording(self) -> Recording:
        """The first recording (the only one of a forward that reads no value into Python)."""
        return self.recordings[0]

    def stale(self) -> bool:
        """Whether a parameter or buffer was changed in place or replaced (``load_state_dict(assign=True)``,
        attribute assignment, ``.to()``) since the recording."""
        return any(held.get(name) is not tensor or (version is not None and tensor._version != version)
                   for held, name, tensor, version in self.watched)

    def replay(self, leaves) -> Any:
        """The outputs of the first recording whose guards these inputs pass; GuardFailed if none's do."""
        for recording in self.recordings[:-1]:
            try:
                return recording.replay(leaves)
            except GuardFailed:
                continue
        return self.recordings[-1].replay(leaves)


def _signature(leaves, spec) -> tuple | None:
    """What a recording is valid for: the calling thread, the tensors' layouts and every other leaf's value; None
    when a leaf is neither a tensor nor a plain value (an object such as a key/value cache, which the forward may
    change: such a call runs eagerly)."""
    key = [threading.get_ident()]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            key.append((leaf.shape, leaf.stride(), leaf.dtype, leaf.device, leaf.requires_grad))
        elif isinstance(leaf, PLAIN):
            key.append((type(leaf), leaf))
        else:
            return None
    return (spec, *key)


def _probe(value: Any) -> Any:
    """Another input of the same layout: tensors flipped along their last dimension (keeping their values' set,
    e.g. valid token ids), with their strides."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    return static_copy(value).copy_(value.flip(-1))


class CpuGraph(torch.nn.Module):
    """See the module docstring. ``model`` stays a submodule (its state dict is this module's, under "model.")."""

    def __init__(self, model: torch.nn.Module, max_recordings: int = MAX_RECORDINGS) -> None:
        super().__init__()
        if isinstance(max_recordings, bool) or not isinstance(max_recordings, int) or max_recordings < 1:
            raise ReplayError(f"max_recordings must be >= 1, got {max_recordings!r} (an integer count of recordings)")
        self.model = model
        self.max_recordings = max_recordings
        self._entries: dict[tuple, _Entry] = {}
        self._replays = [0]  # (a list: nn.Module.__setattr__ would cost ~5 us a call)
        self._guard_misses = [0]

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
        for entry in self._entries.values():
            for recording in entry.recordings:
                storages.update(recording.storages)
        return sum(storages.values())

    def _tracked(self, leaves: list[Any]) -> bool:
        """Whether autograd would track this call."""
        if not torch.is_grad_enabled():
            return False
        return any(isinstance(v, torch.Tensor) and v.requires_grad for v in leaves) or any(
            p.requires_grad for p in self.model.parameters())

    def forward(self, *args, **kwargs):
        if not kwargs and all(type(arg) is torch.Tensor for arg in args):  # (the common call, without pytree's cost)
            leaves, spec = args, len(args)
        else:
            leaves, spec = tree_flatten((args, kwargs))
        key = _signature(leaves, spec)
        if key is None or self._tracked(leaves) or recording_here():  # (inside another graph's recording: eager,
            return self.model(*args, **kwargs)                           # so that it sees the kernels)
        entry = self._entries.get(key)
        if entry is None or entry.stale():
            with _ADMIT:  # (the count and the recording together: threads recording at once keep the limit)
                entry = self._entries.get(key)
                if entry is None or entry.stale():
                    if entry is None and self._recordings() >= self.max_recordings:
                        return self.model(*args, **kwargs)
                    entry = self._entries[key] = self._record(args, kwargs)
        if entry.eager:
            return self.model(*args, **kwargs)
        try:
            out = entry.replay(leaves)
        except GuardFailed:  # (the forward reads other values than every recording did: it may decide otherwise)
            self._guard_misses[0] += 1
            out = self._another_variant(entry, args, kwargs, leaves)
            if out is _EAGER:
                return self.model(*args, **kwargs)
        entry.misses = 0
        self._replays[0] += 1
        return out

    def _another_variant(self, entry: _Entry, args: tuple, kwargs: dict, leaves) -> Any:
        """Record this call as another variant of its signature and replay it; ``_EAGER`` where none is added: the
        limit of recordings reached or the signature closed (after ``MISSES_BEFORE_EAGER`` such calls in a row,
        the signature runs eagerly with no replay tried: its replays kept failing), or this variant cannot be
        recorded (it does what a replay cannot: the signature is closed)."""
        with _ADMIT:
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

    def _recordings(self) -> int:
        return sum(len(entry.recordings) for entry in self._entries.values())

    def __getstate__(self):
        """Without the recordings (they hold compiled functions and this process's buffers): a copy or a
        pickled-and-loaded CpuGraph records again at its first calls."""
        state = dict(self.__dict__)
        state["_entries"], state["_replays"], state["_guard_misses"] = {}, [0], [0]
        return state

    def _record(self, args: tuple, kwargs: dict) -> _Entry:
        """Settle, record and check one signature (module docstring)."""
        if hooked := _hooked_modules(self.model):
            warn_user(f"cpu_graph: forward hooks on {hooked[:5]} run while a forward is recorded, not at its "
                      "replays (a replay runs no Python), and the tensors a hook keeps from the recorded call are "
                      "the recording's buffers, which later replays overwrite. Call the model itself where the "
                      "hooks must run")
        with torch.no_grad():
            settle(self.model, *args, **kwargs)
            # the eager probe first: after recording, the buffers the recording holds are not recycled, and an eager
            # forward then would allocate its own (ResNet-50 at batch 64: ~1 GB more)
            probe_args, probe_kwargs = tree_map(_probe, (args, kwargs))
            expected = self.model(*probe_args, **probe_kwargs)
            probe = tree_flatten((probe_args, probe_kwargs))[0]
            recording = record(self.model, args, kwargs)
            try:
                recording.replay(probe)
            except GuardFailed:  # the probe reads other values (the forward's decisions): check on the call itself
                expected, probe = self.model(*args, **kwargs), tree_flatten((args, kwargs))[0]
            if plan := dead_residuals(recording):  # recorded again, the kernels writing over those residuals
                structure = recording.structure()
                del recording  # (first: its buffers are then recycled by the second one)
                recording = record(self.model, args, kwargs, write_over=plan)
                # the same calls, and a replay equal to the eager forward bit for bit, or recorded without the plan
                # (a forward that took another path the second time: the plan may not hold for it)
                if recording.structure() != structure or not _matches(expected, _replayed(recording, probe),
                                                                      exact=True):
                    del recording
                    recording = record(self.model, args, kwargs)
            if not _matches(expected, _replayed(recording, probe)):
                raise ReplayError("a replay of the recorded forward does not match the eager forward on another "
                                  "input: the forward computes something outside the kernels and aten ops a "
                                  "recording sees, or takes another path from call to call (state it changes, "
                                  "a counter); run this model eagerly")
        return _Entry([recording], _watched(self.model))


def _watched(model: torch.nn.Module) -> tuple[tuple[dict, str, torch.Tensor, int | None], ...]:
    """Every parameter and buffer of ``model`` where it is held, with its version. Tensors made under
    torch.inference_mode() have none: a replay cannot see them changed in place (a warning says so)."""
    watched = tuple((held, name, tensor, version_of(tensor))
                    for module in model.modules() for held in (module._parameters, module._buffers)
                    for name, tensor in held.items() if tensor is not None)
    unseen = sum(version is None for *_, version in watched)
    if unseen:
        warn_user(f"cpu_graph: {unseen} parameters / buffers of the model were made under torch.inference_mode(), "
                  "which gives them no version counter: replays cannot see them changed in place (load_state_dict "
                  "under inference_mode). Load or copy the model outside inference mode, or record again with a "
                  "new cpu_graph after changing them")
    return watched


def _replayed(recording: Recording, leaves: list[Any]) -> Any:
    """A replay's outputs, or None where a guard failed (which no expected output matches)."""
    try:
        return recording.replay(leaves)
    except GuardFailed:
        return None


def _hooked_modules(model: torch.nn.Module) -> list[str]:
    """The modules with forward (pre-)hooks, "(global)" for hooks on every module."""
    from torch.nn.modules import module as torch_module

    hooked = [name or type(model).__name__ for name, m in model.named_modules()
              if m._forward_hooks or m._forward_pre_hooks]
    return (["(global)"] if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
            else []) + hooked


def _matches(expected: Any, got: Any, exact: bool = False) -> bool:
    """The same leaves, tensors of the same shape and dtype and close (equal when ``exact``): a forward that took
    another path may return other shapes, which is a mismatch, not an error."""
    tolerance = {"rtol": 0.0, "atol": 0.0} if exact else {"rtol": 1e-4, "atol": 1e-5}
    wanted, got = tree_flatten(expected)[0], tree_flatten(got)[0]
    return len(wanted) == len(got) and all(not isinstance(want, torch.Tensor) or _close(want, have, tolerance)
                                           for want, have in zip(wanted, got))


def _close(want: torch.Tensor, have: Any, tolerance: dict) -> bool:
    return isinstance(have, torch.Tensor) and (want.shape, want.dtype) == (have.shape, have.dtype) \
        and torch.allclose(want, have, equal_nan=True, **tolerance)


def cpu_graph(model: torch.nn.Module, max_recordings: int = MAX_RECORDINGS) -> CpuGraph:
    """``model`` (a CPU model, e.g. a lowered one) wrapped to record and replay its forward per input signature
    (module docstring). Nothing is recorded until the first call.

    Raises:
        ReplayError: ``max_recordings`` < 1 (and, at a call, a forward a replay cannot repeat).
    """
    if not isinstance(model, torch.nn.Module):
        raise ReplayError(f"cpu_graph takes a torch.nn.Module, got {type(model).__name__}")
    return CpuGraph(model, max_recordings)
