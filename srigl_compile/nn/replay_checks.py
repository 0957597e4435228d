"""What ``nn.cpu_graph`` checks around a recording: the model's parameters and buffers and its modules' plain
settings (watched for changes), the modules whose hooks a replay would skip, and whether a replay's outputs match an
eager forward's."""

from __future__ import annotations

import enum
import operator
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from .._warnings import warn_user
from ..runtime.call_record import GuardFailed, Recording
from .condensed_tensors import version_of

__all__ = ["watched", "Settings", "replayed", "hooked_modules", "matches"]


def watched(model: torch.nn.Module) -> tuple[tuple[dict, str, torch.Tensor, int | None], ...]:
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


# What a forward may read as a setting, which a replay repeats as it was: values, not objects it could mutate.
_PLAIN = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.memory_format,
          enum.Enum)

def _plain(value: Any) -> bool:
    return isinstance(value, _PLAIN) or (type(value) is tuple and all(isinstance(v, _PLAIN) for v in value))


def _public_plain(names_values) -> list[str]:
    return [name for name, value in names_values if name[0] != "_" and _plain(value)]


_DISJOINT = type({}.keys()).isdisjoint


class Settings:
    """Every module's public plain attributes (``training``, a scaling factor, ``eps``, a flag) when made: a forward
    reads them into Python, so a recording holds what they were. Private ones (``_name``) are the modules' own
    bookkeeping, which eager calls may change. Checked before every replay (~20 us for ResNet-50's 86 modules that
    have some), so read with one C call a module."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._getters, self._dicts, self._shadowable, self._keys, by_class = [], [], [], [], {}
        for module in model.modules():
            held, kind = module.__dict__, type(module)
            if names := _public_plain(held.items()):
                self._getters.append(operator.itemgetter(*names))
                self._dicts.append(held)
            if kind not in by_class:  # (nn.Module's own, dump_patches and call_super_init, are torch's business)
                by_class[kind] = _public_plain((name, getattr(kind, name, None))
                                               for name in dir(kind) if not hasattr(torch.nn.Module, name))
            # the class's own: setting one on the module puts it in the module's dict
            if shadowable := frozenset(name for name in by_class[kind] if name not in held):
                self._shadowable.append(shadowable)
                self._keys.append(held.keys())
        self._values = self._read()

    def _read(self) -> list:
        return list(map(operator.call, self._getters, self._dicts))

    def changed(self) -> bool:
        """Whether one was set or deleted since (set on a module where its class held it, too)."""
        try:
            return self._read() != self._values or not all(map(_DISJOINT, self._keys, self._shadowable))
        except KeyError:  # (one was deleted)
            return True


def replayed(recording: Recording, leaves: list[Any]) -> Any:
    """A replay's outputs, or None where a guard failed (which no expected output matches)."""
    try:
        return recording.replay(leaves)
    except GuardFailed:
        return None


def hooked_modules(model: torch.nn.Module) -> list[str]:
    """The modules with forward (pre-)hooks, "(global)" for hooks on every module."""
    from torch.nn.modules import module as torch_module

    hooked = [name or type(model).__name__ for name, m in model.named_modules()
              if m._forward_hooks or m._forward_pre_hooks]
    return (["(global)"] if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
            else []) + hooked


def matches(expected: Any, got: Any, exact: bool = False) -> bool:
    """The same leaves, tensors of the same shape and dtype and close (equal when ``exact``): a forward that took
    another path may return other shapes, which is a mismatch, not an error."""
    tolerance = {"rtol": 0.0, "atol": 0.0} if exact else {"rtol": 1e-4, "atol": 1e-5}
    wanted, got = tree_flatten(expected)[0], tree_flatten(got)[0]
    return len(wanted) == len(got) and all(not isinstance(want, torch.Tensor) or _close(want, have, tolerance)
                                           for want, have in zip(wanted, got))


def _close(want: torch.Tensor, have: Any, tolerance: dict) -> bool:
    return isinstance(have, torch.Tensor) and (want.shape, want.dtype) == (have.shape, have.dtype) \
        and torch.allclose(want, have, equal_nan=True, **tolerance)
