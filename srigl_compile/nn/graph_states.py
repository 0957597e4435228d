"""A ``CpuGraph``'s signatures whose calls take state objects (``runtime.state_objects``, a static key/value
cache): whether such a call may replay (``steady``), the eager call that finds out (``observe``), and what becomes
of a signature's recording when its object dies (``forget``).

A dead object's recording is kept (``ORPHANS`` of them) for the next object of the same structure: ``observe``
gives it the recording's tensors (``Layout.adopt``, their contents copied from its own) and the recording
replays for it. Why: Hugging Face's generate() makes a new static cache a call, and recording each again cost more
than its replays saved: a 16-token generate() of ``benchmarks/decoder.py``'s lowered llama_1024 took 0.100 s
eagerly and 0.145 s graphed, every call; adopted, 0.085-0.093 s after the first (quiet 2-core Xeon,
``benchmarks/cpu_runs/2026-12-06f_xeon/generate_calls_llama_1024.txt``).
"""

from __future__ import annotations

import collections
import contextlib
import weakref
from typing import Any

from ..runtime.state_objects import Layout
from .graph_entries import ADMIT, Entry

__all__ = ["StateSignatures", "ORPHANS"]

ORPHANS = 2  # recordings kept whose object died (each holds a cache's tensors and a forward's buffers)


class StateSignatures:
    """What a graph knows of its signatures with state objects (module docstring). Its methods take the
    ``CpuGraph`` (not imported here: it imports this), whose entries they change."""

    def __init__(self) -> None:
        # what the objects held when a call was seen to leave them so (a cache's first call allocates it: not so),
        # whether a recording could write into their tensors, and the signature with the objects' structures
        # for their identities (an orphan's key)
        self.layouts: dict[tuple, tuple[list[Layout], bool, tuple]] = {}
        self.unsteady: dict[tuple, int] = {}  # calls that changed what the objects hold
        # recordings whose one object died, by that signature with its structure: (entry, the object's layout)
        self.orphans: collections.OrderedDict[tuple, tuple[Entry, Layout]] = collections.OrderedDict()

    def steady(self, key: tuple) -> bool:
        """Whether calls of this signature may replay: a call was seen to leave its state objects holding what
        they held (a cache's first call allocates it), they hold it still, and a recording can write into them."""
        seen = self.layouts.get(key)
        return seen is not None and seen[1] and all(layout.holds() for layout in seen[0])

    def observe(self, graph, key: tuple, states: list, args: tuple, kwargs: dict) -> Any:
        """Run the call eagerly, and note whether it left its state objects holding what they held: then the
        signature's next call replays an orphan's recording given to them, or records (an earlier recording,
        made while they held other tensors, is dropped)."""
        layouts = [Layout(state) for state in states]
        out = graph._call(*args, **kwargs)
        with ADMIT:
            graph._entries.pop(key, None)
            graph._spares.pop(key, None)
            if not all(layout.holds() for layout in layouts):
                self.layouts.pop(key, None)
                self.unsteady[key] = self.unsteady.get(key, 0) + 1
                if self.unsteady[key] == 2:  # (the first may be a lazy cache allocating itself)
                    graph._warn_once(
                        "unsteady", f"cpu_graph: calls change what the {type(states[0]).__name__} holds besides its "
                        "tensors' contents (new tensors: beam search reordering a cache; Python values: a sliding "
                        "window's counter), which a replay cannot repeat: they run eagerly")
                return out
            replayable = not any(layout.inference for layout in layouts)
            if not replayable:
                graph._warn_once("inference", f"cpu_graph: the {type(states[0]).__name__} holds tensors made under "
                                 "torch.inference_mode() (a cache allocated by its first call there), which a "
                                 "recording cannot write into: calls with it run eagerly. Call under "
                                 "torch.no_grad() instead")
            if key not in self.layouts:  # (an object's recording goes with it, or to the orphans: the recording
                for state in states:     # holds the object's tensors)
                    with contextlib.suppress(TypeError):  # (an object without weak references keeps them)
                        weakref.finalize(state, _forget, weakref.ref(graph), key)
            orphan_key = (key[:1] + tuple(item for item in key[1:] if item[:1] != ("state",)),
                          tuple(layout.structure for layout in layouts))
            orphan = self.orphans.pop(orphan_key, None) if replayable and len(states) == 1 else None
            if orphan is not None and not orphan[0].stale() and orphan[1].adopt(layouts[0]):
                layouts = [Layout(states[0])]  # (holding the recording's tensors now)
                graph._entries[key] = orphan[0]
            self.layouts[key] = (layouts, replayable, orphan_key)
        return out

    def forget(self, graph, key: tuple) -> None:
        """An object of the signature died: its recording becomes an orphan (if it had one object), the rest
        goes."""
        entry = graph._entries.pop(key, None)
        graph._spares.pop(key, None)
        seen = self.layouts.pop(key, None)
        self.unsteady.pop(key, None)
        if entry is not None and seen is not None and len(seen[0]) == 1 and not entry.eager:
            self.orphans[seen[2]] = (entry, seen[0][0])
            self.orphans.move_to_end(seen[2])
            while len(self.orphans) > ORPHANS:
                self.orphans.popitem(last=False)

    def entries(self) -> list[Entry]:
        return [entry for entry, _ in self.orphans.values()]


def _forget(graph_ref: weakref.ref, key: tuple) -> None:
    """(weakref.finalize's callback, which must not keep the graph alive.)"""
    graph = graph_ref()
    if graph is not None:
        with ADMIT:
            graph._states.forget(graph, key)
