"""Checks for config dataclasses, in one place: a value from ``--set``, a spec or a JSON file that does not
fit its field's annotation (type, range, choices) is one clear error naming the field, raised when the
config is built (before any work starts), never a crash or a silent NaN later in a run.

Ranges and choices ride on the annotations::

    epochs: Annotated[int, Range(min=1)] = 300
    lr: Annotated[float, Range(min=0, min_open=True)] | None = None
    variant: Annotated[str, OneOf("paper", "official")] = "paper"
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing

from coplctl.core.errors import CoplError


@dataclasses.dataclass(frozen=True)
class Range:
    """Allowed interval of a number: ``min``/``max`` inclusive unless ``min_open``/``max_open``."""

    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False

    def check(self, value, where: str) -> None:
        lo = self.min is not None and (value <= self.min if self.min_open else value < self.min)
        hi = self.max is not None and (value >= self.max if self.max_open else value > self.max)
        if lo or hi:
            raise CoplError(f"{where}: {value!r} is out of range; {self.describe()}")

    def describe(self) -> str:
        parts = []
        if self.min is not None:
            parts.append(f"{'above' if self.min_open else 'at least'} {self.min:g}")
        if self.max is not None:
            parts.append(f"{'below' if self.max_open else 'at most'} {self.max:g}")
        return "it must be " + " and ".join(parts)


#: Common ranges.
POSITIVE = Range(min=0, min_open=True)
NON_NEGATIVE = Range(min=0)
AT_LEAST_1 = Range(min=1)
FRACTION = Range(min=0, max=1, max_open=True)  # a share in [0, 1)
PROBABILITY = Range(min=0, max=1)


@dataclasses.dataclass(frozen=True)
class OneOf:
    """Allowed values of a text (or other) field."""

    choices: tuple

    def __init__(self, *choices):
        object.__setattr__(self, "choices", tuple(choices))

    def check(self, value, where: str) -> None:
        if value not in self.choices:
            raise CoplError(f"{where}: unknown {value!r}; choose {', '.join(map(str, self.choices))}")


def _coerce(value, tp, where: str):
    """``value`` as an instance of annotation ``tp`` (ints widen to floats, lists to tuples), or raise."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        value = _coerce(value, args[0], where)
        for rule in tp.__metadata__:
            if value is not None and hasattr(rule, "check"):
                rule.check(value, where)
        return value
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
    hints = typing.get_type_hints(type(obj), include_extras=True)
    for f in dataclasses.fields(obj):
        if f.name in hints:
            setattr(obj, f.name, _coerce(getattr(obj, f.name), hints[f.name], f"{owner} option {f.name}"))
