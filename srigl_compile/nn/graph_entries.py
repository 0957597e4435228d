"""A ``CpuGraph``'s recordings of one input signature (``Entry``: its guard variants, the parameters they were made
with, the lock of the thread replaying them), what a signature is (``signature``), the other input a recording
is checked on (``probe``), and the lock of the graphs' decisions to record (``ADMIT``)."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import torch

from ..runtime.call_record import PLAIN, GuardFailed, Recording, static_copy
from ..runtime.state_objects import is_state_object
from .replay_checks import Settings

__all__ = ["ADMIT", "Entry", "signature", "probe"]

# Decisions to record, taken with the count of recordings: threads recording at once would pass the limit together.
# Reentrant: settling a model may call another CpuGraph inside it, which records too.
ADMIT = threading.RLock()


@dataclasses.dataclass(eq=False)
class Entry:
    recordings: list[Recording]  # one per set of values the forward read into Python (guards), in recording order
    # the model's parameters and buffers: (the dict holding one, its name there, the tensor, its version)
    watched: tuple[tuple[dict, str, torch.Tensor, int | None], ...]
    settings: Settings  # every module's plain attributes (its train/eval flag among them) when recorded
    closed: bool = False  # no more variants (one could not be recorded): calls missing every guard run eagerly
    misses: int = 0  # calls in a row that missed every recording's guards with no variant added
    eager: bool = False  # ``MISSES_BEFORE_EAGER`` such calls: the signature runs eagerly, no replay tried
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)  # held by the thread replaying it

    @property
    def recording(self) -> Recording:
        """The first recording (the only one of a forward that reads no value into Python)."""
        return self.recordings[0]

    def stale(self) -> bool:
        """Whether a parameter or buffer was changed in place or replaced (``load_state_dict(assign=True)``,
        attribute assignment, ``.to()``), or a module's plain attribute was set (switched between train and eval, a
        scaling factor changed), since the recording."""
        return any(held.get(name) is not tensor or (version is not None and tensor._version != version)
                   for held, name, tensor, version in self.watched) or self.settings.changed()

    def replay(self, leaves) -> Any:
        """The outputs of the first recording whose guards these inputs pass; GuardFailed if none's do."""
        for recording in self.recordings[:-1]:
            try:
                return recording.replay(leaves)
            except GuardFailed:
                continue
        return self.recordings[-1].replay(leaves)


def signature(leaves, spec) -> tuple | None:
    """What a recording is valid for: the tensors' layouts, every plain leaf's value, and each
    state object (a static key/value cache, ``runtime.state_objects``; what it holds is checked apart, by
    ``CpuGraph._layouts``); None when a leaf is none of these (an object such as a growing cache, which the forward
    may change: such a call runs eagerly)."""
    key = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            key.append((leaf.shape, leaf.stride(), leaf.dtype, leaf.device, leaf.requires_grad))
        elif isinstance(leaf, PLAIN):
            key.append((type(leaf), leaf))
        elif is_state_object(leaf):
            key.append(("state", id(leaf)))
        else:
            return None
    return (spec, *key)


def probe(value: Any) -> Any:
    """Another input of the same layout: tensors flipped along their last dimension (keeping their values' set,
    e.g. valid token ids), with their strides."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    return static_copy(value).copy_(value.flip(-1))
