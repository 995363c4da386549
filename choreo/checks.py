"""Argument checks shared by the configs and entry points.

Each message names the argument, the rule and the bad value: ``"ToTConfig.voters must be an integer >= 1, got 0"``.
A bool is never an integer here (``True`` is not a token count), and numpy integers are: a checked value comes back
as a Python ``int``, so it can reach JSON provenance.
"""

from __future__ import annotations

import math
import numbers
import operator

__all__ = ["check_int", "check_int_fields", "check_sampling", "check_sampling_fields", "is_int", "is_real"]


def is_int(x) -> bool:
    """True for an integer (numpy's included), False for a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_real(x) -> bool:
    """True for a real number (an integer included), False for a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_int(name: str, value, *, minimum: int = 1, maximum: int | None = None, optional: bool = False) -> int | None:
    """``value`` as a Python int, or ValueError naming ``name`` unless it is an integer in ``minimum..maximum``.

    ``optional``: None is allowed and comes back as None. Example: ``check_int("limit", 0)`` raises
    ``ValueError("limit must be an integer >= 1, got 0")``.
    """
    if optional and value is None:
        return None
    if not is_int(value) or value < minimum or (maximum is not None and value > maximum):
        rule = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        none = " or None" if optional else ""
        raise ValueError(f"{name} must be an integer {rule}{none}, got {value!r}")
    return operator.index(value)


def check_int_fields(config, names, *, minimum: int = 1, maximum: int | None = None, optional: bool = False) -> None:
    """``check_int`` on each named field of a (frozen) dataclass, stored back as a Python int.

    Messages name the field as ``ClassName.field``.
    """
    for name in names:
        value = check_int(f"{type(config).__name__}.{name}", getattr(config, name), minimum=minimum,
                          maximum=maximum, optional=optional)
        object.__setattr__(config, name, value)


_UNSET = object()  # an argument not given (None is a value, and refused)


def check_sampling(*, temperature=_UNSET, top_p=_UNSET, prefix: str = "") -> None:
    """ValueError unless ``temperature`` (when given) is a finite number >= 0 and ``top_p`` (when given) a number in
    (0, 1]; messages name them after ``prefix`` ("ToTConfig." names the fields of a config)."""
    if temperature is not _UNSET and (not is_real(temperature) or not 0 <= temperature < math.inf):
        raise ValueError(f"{prefix}temperature must be a finite number >= 0, got {temperature!r}")
    if top_p is not _UNSET and (not is_real(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"{prefix}top_p must be a number in (0, 1], got {top_p!r}")


def check_system_field(config) -> None:
    """A (frozen) dataclass's ``system`` prompt: a non-empty string (ValueError naming ``ClassName.system``), since
    every call of its workflow attends to it."""
    if not isinstance(config.system, str) or not config.system.strip():
        raise ValueError(f"{type(config).__name__}.system must be a non-empty system prompt, got {config.system!r}")


def check_sampling_fields(config) -> None:
    """The sampling fields a (frozen) dataclass has, checked as ``choreo.Call`` checks them (``check_sampling``), so
    that a config that could not run is refused when it is made, not at its first call. Messages name the field as
    ``ClassName.field``."""
    check_sampling(temperature=getattr(config, "temperature", _UNSET), top_p=getattr(config, "top_p", _UNSET),
                   prefix=f"{type(config).__name__}.")
