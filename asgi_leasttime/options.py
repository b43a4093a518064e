"""How the constructors judge their options, so the configuration file can name the key at fault.

Every option is declared once, by the keyword parameter of the constructor it belongs to: its name,
its type, its default and its validation. A constructor that refuses a value raises
:class:`OptionError` naming the parameter; the TOML layer (:mod:`asgi_leasttime.config`) reads the
parameters to know its keys and reports the constructor's own words under the key.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import math
import types
import typing
from typing import Any

__all__ = [
    "OptionError",
    "check_fields",
    "check_instance",
    "check_not_negative",
    "check_port",
    "check_positive",
]


class OptionError(ValueError):
    """A value an option does not take: ``option`` names the keyword parameter, ``reason`` says
    what is wrong with it (phrased to follow the option's name)."""

    def __init__(self, option: str, reason: str) -> None:
        super().__init__(f"{option}: {reason}")
        self.option = option
        self.reason = reason


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_positive(option: str, value: float | None) -> None:
    """A positive, finite number (``None`` passes: the option is unset)."""
    if value is None:
        return
    if not _is_number(value):
        raise OptionError(option, f"must be a positive number, not {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise OptionError(option, "must be a positive number")


def check_not_negative(option: str, value: float | None) -> None:
    """Zero or a positive, finite number (``None`` passes)."""
    if value is None:
        return
    if not _is_number(value):
        raise OptionError(option, f"must be a number, not {value!r}")
    if not (value >= 0 and math.isfinite(value)):
        raise OptionError(option, "must not be negative")


def check_port(option: str, value: int | None) -> None:
    """A TCP port (``None`` passes)."""
    if value is not None and not (
        isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536
    ):
        raise OptionError(option, "must be a TCP port (1-65535)")


def check_instance(option: str, value: object, kind: type) -> None:
    """An instance of ``kind``, or ``None`` (the option is off)."""
    if value is not None and not isinstance(value, kind):
        raise OptionError(option, f"must be a {kind.__name__} or None, not {value!r}")


def check_fields(options: Any) -> None:
    """Each field of an options dataclass has a value of its annotated type: ``interval="10"``
    is named here rather than failing later in a comparison. Called from ``__post_init__``,
    before the rules of each field."""
    kind: type = type(options)
    for name, accepted in _field_types(kind):
        value = getattr(options, name)
        if accepted and not _accepts(accepted, value):
            raise OptionError(name, f"must be {_described(accepted)}, not {value!r}")


@functools.cache
def _field_types(cls: type) -> tuple[tuple[str, tuple[type, ...]], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f.name, _runtime_types(hints[f.name])) for f in dataclasses.fields(cls))


def _runtime_types(annotation: Any) -> tuple[type, ...]:
    """The classes an annotation allows, for the simple ones options use; ``()`` for any."""
    if annotation is Any:
        return ()
    if annotation is float:
        return (int, float)
    if annotation is type(None):
        return (type(None),)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        found: list[type] = []
        for argument in typing.get_args(annotation):
            kinds = _runtime_types(argument)
            if not kinds:
                return ()
            found += kinds
        return tuple(found)
    if origin is typing.Literal:
        return tuple({type(value) for value in typing.get_args(annotation)})
    if origin is not None:
        annotation = origin
    if origin is collections.abc.Sequence:
        return (list, tuple)
    return (annotation,) if isinstance(annotation, type) else ()


def _accepts(accepted: tuple[type, ...], value: object) -> bool:
    if isinstance(value, bool) and bool not in accepted:
        return False  # True is an int to Python, not to a reader
    return isinstance(value, accepted)


_DESCRIPTIONS = {str: "a string", bool: "true or false", int: "an integer", float: "a number",
                 list: "a list", tuple: "a list", type(None): "None",
                 collections.abc.Mapping: "a mapping", dict: "a mapping"}  # fmt: skip


def _described(accepted: tuple[type, ...]) -> str:
    if int in accepted and float in accepted:
        accepted = tuple(kind for kind in accepted if kind is not int)
    names = [_DESCRIPTIONS.get(kind, kind.__name__) for kind in accepted]
    return " or ".join(dict.fromkeys(names))
