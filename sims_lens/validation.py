"""Checks of user-given settings: the run configuration, and each oracle's and learner's own table.

Every failure is a :class:`ConfigError` (a ``ValueError``) with one message in one shape,
``KEY = VALUE is not allowed; use ALLOWED``, where ``KEY`` is the configuration key as the user
writes it (``samples_per_prompt``, ``oracles.self_judge.batch_size``), so the command line can
print it as one ``error:`` line.
"""

from __future__ import annotations

import math
import sys
import typing
from collections.abc import Sequence
from dataclasses import fields
from typing import Any


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key and the allowed values."""


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise :class:`ConfigError` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key} = {value!r} is not allowed; use {allowed}")


def is_int(value: Any) -> bool:
    """An integer that is not a boolean."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float that is not a boolean."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_int(owner: str, minimum: int, **values: Any) -> None:
    """Each of ``values`` is an integer >= ``minimum`` (keys reported as ``owner.key``)."""
    for key, value in values.items():
        require(is_int(value) and value >= minimum, _key(owner, key), value, f"an integer >= {minimum}")


def check_number(owner: str, minimum: float | None = None, *, above: bool = False, **values: Any) -> None:
    """Each of ``values`` is a finite number, >= ``minimum`` (> with ``above``) when given."""
    for key, value in values.items():
        ok = is_number(value)
        if ok and minimum is not None:
            ok = value > minimum if above else value >= minimum
        bound = "" if minimum is None else f" {'>' if above else '>='} {minimum:g}"
        require(ok, _key(owner, key), value, f"a finite number{bound}")


def check_choice(owner: str, key: str, value: Any, choices: Sequence[str]) -> None:
    """``value`` is one of ``choices``."""
    require(value in choices, _key(owner, key), value, f"one of {list(choices)}")


def check_text(owner: str, **values: Any) -> None:
    """Each of ``values`` is non-empty text."""
    for key, value in values.items():
        require(isinstance(value, str) and bool(value.strip()), _key(owner, key), value, "non-empty text")


def check_field_types(config: Any, prefix: str = "") -> None:
    """Each dataclass field holds its declared scalar type (booleans are not integers, numbers are finite)."""
    hints = typing.get_type_hints(type(config))
    for f in fields(config):
        value = getattr(config, f.name)
        hint = hints[f.name]
        key = prefix + f.name
        if hint is bool:
            require(isinstance(value, bool), key, value, "true or false")
        elif hint is int:
            require(is_int(value), key, value, "an integer")
        elif hint in (float, float | None):
            require(is_number(value) or (value is None and hint is not float), key, value, "a finite number")
        elif hint is str:
            require(isinstance(value, str), key, value, "text (a quoted string in TOML)")


def rename_key(settings: dict[str, Any], old: str, new: str, where: str = "") -> None:
    """Move a renamed key's value to its new name in place, with a one-line note on stderr."""
    if old not in settings:
        return
    prefix = f"{where}." if where else ""
    if new in settings:
        raise ConfigError(f"{prefix}{old} and {prefix}{new} are both set; {old!r} is the old name of {new!r}, keep one")
    settings[new] = settings.pop(old)
    print(f"note: configuration key {prefix}{old} is now called {prefix}{new}; please rename it", file=sys.stderr)


def _key(owner: str, key: str) -> str:
    return f"{owner}.{key}" if owner else key
