"""State objects: arguments of a forward that hold tensors the forward updates in place at fixed addresses, such as
Hugging Face's static key/value caches, which ``nn.cpu_graph`` can then replay.

Why: a decoder step takes its cache as an object, not as tensors. A replay can repeat the step only if the cache
keeps the same tensors from call to call and the step writes into them (``index_copy_`` of the new keys, a position
counter's ``add_``); the recording then holds those tensors like parameters, and each replay updates them as the
step would. An object says its tensors stay put with ``is_compileable = True`` (Hugging Face's flag for
``StaticCache``, meant for CUDA graphs); a ``DynamicCache``, which grows by concatenating new tensors, does not.

- ``Layout(obj)``: what a recording of a call taking ``obj`` is valid for: every tensor the object holds (the same
  tensor, storage address and layout) and every other value, walked through attributes, lists, tuples and dicts;
  ``holds()`` checks it again before each replay. ``structure``: the same but for which tensors (their shapes,
  strides, dtypes and which of them share storage): an object of the same structure can be given the tensors a
  recording holds (``adopt``), so that a new cache replays what a dead one recorded (generate() makes a cache a
  call).
- ``Snapshot``: the objects' attributes and tensor contents, put back with ``restore()``. Recording runs the forward
  several times (warm-up, a check on another input, the recording itself); each run would advance the cache, so
  each starts from the snapshot, and the call's one step is the last.

Example:
    >>> snap = Snapshot([cache]); model(x, cache); snap.restore()      # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from .call_record import PLAIN

__all__ = ["is_state_object", "Layout", "Snapshot"]

DEPTH = 4  # nesting walked: cache -> its list of layers -> a layer -> its tensors (and one more level of headroom)


def is_state_object(value: Any) -> bool:
    """Whether ``value`` declares that its tensors stay at fixed addresses across calls (``is_compileable``)."""
    return not isinstance(value, (torch.Tensor, *PLAIN, torch.nn.Module)) \
        and getattr(value, "is_compileable", False) is True


def _walk(value: Any, depth: int, seen: set[int]) -> Iterator[tuple[str, Any]]:
    """(kind, item) for everything ``value`` holds: ("tensor", t), ("plain", v), ("object", o) for each object,
    list or dict whose contents are walked (``DEPTH`` levels down), ("opaque", o) for anything else."""
    if isinstance(value, torch.Tensor):
        yield "tensor", value
    elif isinstance(value, PLAIN):
        yield "plain", value
    elif id(value) in seen or depth > DEPTH or not _container(value):
        yield "opaque", value
    else:
        seen.add(id(value))
        yield "object", value
        for child in _children(value):
            yield from _walk(child, depth + 1, seen)


def _container(value: Any) -> bool:
    return isinstance(value, (list, tuple, dict)) or (hasattr(value, "__dict__")
                                                        and not isinstance(value, torch.nn.Module))


def _children(value: Any) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    return [item for pair in (value if isinstance(value, dict) else vars(value)).items() for item in pair]


class Layout:
    """What a state object holds now: every container walked (its contents' identities) and every tensor's
    storage and layout. ``holds()`` tells, in a few microseconds a tensor, whether the object still holds all of it
    unchanged but for tensor contents: then a recording made with it may be replayed on it."""

    def __init__(self, obj: Any) -> None:
        # (container, its contents then); an object's attribute dict stands for it, so that a layout does not
        # keep the object alive (``nn.cpu_graph`` drops an object's recordings when it dies)
        self.containers: list[tuple[Any, list]] = []
        self.tensors: list[tuple[torch.Tensor, tuple]] = []  # (tensor, its storage address and layout then)
        structure, storages = [], {}
        for kind, item in _walk(obj, 0, set()):
            if kind == "object":
                container = item if isinstance(item, (list, tuple, dict)) else vars(item)
                self.containers.append((container, _children(container)))
                structure.append((kind, type(item)))
            elif kind == "tensor":
                self.tensors.append((item, _tensor_layout(item)))
                storage = storages.setdefault(item.untyped_storage().data_ptr(), len(storages))
                structure.append((kind, storage, item.storage_offset(), *_tensor_layout(item)[1:], item.device,
                                  item.is_inference(), item.requires_grad))
            else:  # (plain values by value; anything else, which a forward may read, must be the same object)
                structure.append((kind, type(item), item) if kind == "plain" else (kind, id(item)))
        self.structure = tuple(structure)
        self.inference = any(tensor.is_inference() for tensor, _ in self.tensors)

    def holds(self) -> bool:
        for container, contents in self.containers:
            now = _children(container)
            if len(now) != len(contents) or any(a is not b and not (isinstance(a, PLAIN) and a == b)
                                                for a, b in zip(now, contents)):
                return False
        return all(_tensor_layout(tensor) == then for tensor, then in self.tensors)

    def adopt(self, new: Layout) -> bool:
        """Make the object ``new`` was taken of hold this layout's tensors in place of its own, their contents
        copied from its own, where both have one ``structure`` and its tensors sit in lists and attributes (not
        tuples, which cannot be rebound). Returns whether it did (nothing is changed where it does not)."""
        if new.structure != self.structure or any(
                isinstance(child, torch.Tensor) and (isinstance(container, tuple) or (isinstance(container, dict)
                                                                                      and slot % 2 == 0))
                for container, children in new.containers for slot, child in enumerate(children)):
            return False  # (a tensor in a tuple or as a dict's key)
        with torch.no_grad():
            for (container, children), (_, held) in zip(new.containers, self.containers):
                for slot, (child, mine) in enumerate(zip(children, held)):
                    if isinstance(child, torch.Tensor) and child is not mine:
                        mine.copy_(child)
                        if isinstance(container, list):
                            container[slot] = mine
                        elif slot % 2:  # (a dict's children are key, value, key, value, ...)
                            container[children[slot - 1]] = mine
        return True


def _tensor_layout(tensor: torch.Tensor) -> tuple:
    return tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype


class Snapshot:
    """The state of some objects now: their attributes (and lists' and dicts' items) and their tensors' contents,
    so that ``restore()`` undoes what forwards did to them since (in place, or by replacing attributes)."""

    def __init__(self, objects: list[Any]) -> None:
        self._containers: list[tuple[Any, Any]] = []
        self._tensors: list[tuple[torch.Tensor, torch.Tensor]] = []
        seen: set[int] = set()
        with torch.inference_mode(False), torch.no_grad():
            for obj in objects:
                for kind, item in _walk(obj, 0, seen):
                    if kind == "tensor":
                        self._tensors.append((item, item.clone()))
                    elif kind == "object":
                        self._containers.append((item, _contents(item)))

    def restore(self) -> None:
        for container, contents in self._containers:
            if isinstance(container, list):
                container[:] = contents
            elif isinstance(container, dict):
                container.clear()
                container.update(contents)
            elif not isinstance(container, tuple):
                vars(container).clear()
                vars(container).update(contents)
        with torch.no_grad():
            for tensor, saved in self._tensors:
                with torch.inference_mode(tensor.is_inference()):
                    tensor.copy_(saved)


def _contents(container: Any) -> Any:
    if isinstance(container, (list, tuple)):
        return list(container)
    if isinstance(container, dict):
        return dict(container)
    return dict(vars(container))
