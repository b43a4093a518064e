"""How the constructors judge their options, so the configuration file can name the key at fault.

Every option is declared once, by the keyword parameter of the constructor it belongs to: its name,
its type, its default and its validation. A constructor that refuses a value raises
:class:`OptionError` naming the parameter; the TOML layer (:mod:`asgi_leasttime.config`) reads the
parameters to know its keys and reports the constructor's own words under the key.
"""

from __future__ import annotations

import math

__all__ = ["OptionError", "check_not_negative", "check_port", "check_positive"]


class OptionError(ValueError):
    """A value an option does not take: ``option`` names the keyword parameter, ``reason`` says
    what is wrong with it (phrased to follow the option's name)."""

    def __init__(self, option: str, reason: str) -> None:
        super().__init__(f"{option}: {reason}")
        self.option = option
        self.reason = reason


def check_positive(option: str, value: float | None) -> None:
    """A positive, finite number (``None`` passes: the option is unset)."""
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise OptionError(option, "must be a positive number")


def check_not_negative(option: str, value: float | None) -> None:
    """Zero or a positive, finite number (``None`` passes)."""
    if value is not None and not (value >= 0 and math.isfinite(value)):
        raise OptionError(option, "must not be negative")


def check_port(option: str, value: int | None) -> None:
    """A TCP port (``None`` passes)."""
    if value is not None and not 0 < value < 65536:
        raise OptionError(option, "must be a TCP port (1-65535)")
