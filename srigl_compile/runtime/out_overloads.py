"""The out= overload of a functional aten op (``mul.Tensor`` -> ``mul.out``), through which a replay writes the
op's result into the tensor it returned when recorded (``runtime.call_record``)."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["out_overload"]

_OUT_OVERLOADS: dict = {}  # op overload -> its out= overload, or None


def out_overload(func, results: tuple) -> Callable | None:
    """An aten op's overload that takes the same arguments and writes its one tensor result into ``out=`` (mul.Tensor
    -> mul.out), where the result keeps the layout the op gave it: a replay then runs the op on the recorded result
    instead of allocating one and copying it over (a decoder step's ~500 small ops). None for other ops, whose
    results a replay copies (and checks the shape of: a custom op's may follow values)."""
    if len(results) != 1 or getattr(func, "namespace", None) != "aten" or not results[0].is_contiguous():
        return None
    if func not in _OUT_OVERLOADS:
        names = [(arg.name, str(arg.type)) for arg in func._schema.arguments]
        packet = func.overloadpacket
        found = None
        for overload in packet.overloads():
            candidate = getattr(packet, overload)
            outs = [arg for arg in candidate._schema.arguments if arg.is_out]
            if len(outs) == 1 and outs[0].name == "out" and len(candidate._schema.returns) == 1 and \
                    [(arg.name, str(arg.type)) for arg in candidate._schema.arguments if not arg.is_out] == names:
                found = candidate
                break
        _OUT_OVERLOADS[func] = found
    return _OUT_OVERLOADS[func]
