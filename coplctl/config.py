"""Type checks for config dataclasses: a value from ``--set``, a spec or a JSON file that does not fit its
field's annotation is one clear error naming the field, never a crash later in a run."""

from __future__ import annotations

import dataclasses
import math
import types
import typing

from coplctl.errors import CoplError


def _coerce(value, tp, where: str):
    """``value`` as an instance of annotation ``tp`` (ints widen to floats, lists to tuples), or raise."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except CoplError as e:
                errors.append(e)
        raise errors[0]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise CoplError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise CoplError(f"{where}: expected a whole number, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise CoplError(f"{where}: expected a finite number, got {value!r}")
            return float(value)
        raise CoplError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise CoplError(f"{where}: expected text, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise CoplError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else typing.Any
        items = [v if item is typing.Any else _coerce(v, item, where) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if isinstance(value, dict):
            return value
        raise CoplError(f"{where}: expected a mapping, got {value!r}")
    return value  # other annotations (dataclasses, Any): checked by their owner


def check_fields(obj, owner: str) -> None:
    """Check (and normalise in place) every field of dataclass ``obj`` against its annotation."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if f.name in hints:
            setattr(obj, f.name, _coerce(getattr(obj, f.name), hints[f.name], f"{owner} option {f.name}"))
