"""A registry of named, configurable parts: the learners and the oracles are each one of these.

A part is a class whose constructor arguments are its settings (a TOML table maps onto them);
``resources`` are constructor arguments handed over by the caller (the language model an oracle
may use), never user settings. ``make`` turns a name and a settings table into an instance, with
one clear error for an unknown name, an unknown setting or a missing one.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from sims_lens.validation import ConfigError

T = TypeVar("T")
C = TypeVar("C", bound=type)


class Registry(Generic[T]):
    """Name -> class of one sort of part (``"learner"``, ``"oracle"``)."""

    def __init__(self, noun: str, resources: tuple[str, ...] = ()) -> None:
        self.noun = noun
        self.resources = resources
        self._classes: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[C], C]:
        """Class decorator adding a class under ``name``."""

        def decorate(cls: C) -> C:
            if name in self._classes:
                raise ValueError(f"{self.noun} {name!r} is already registered")
            self._classes[name] = cls
            return cls

        return decorate

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._classes)

    def get(self, name: str) -> Callable[..., T]:
        """The class registered as ``name``."""
        if name not in self._classes:
            raise ConfigError(f"unknown {self.noun} {name!r}; known {self.noun}s: {self.names()}")
        return self._classes[name]

    def settings(self, name: str) -> list[str]:
        """The setting names ``name`` accepts (its constructor's arguments, less resources)."""
        return sorted(p for p in inspect.signature(self.get(name)).parameters if p not in self.resources)

    def make(self, name: str, settings: Mapping[str, Any] | None = None, **resources: Any) -> T:
        """Build ``name`` from its settings; ``resources`` go to the constructors that take them."""
        cls = self.get(name)
        given = dict(settings or {})
        if not all(isinstance(key, str) for key in given):
            raise ConfigError(f"{self.noun} {name!r}: setting names must be strings, got {sorted(map(repr, given))}")
        prepare = getattr(cls, "prepare_settings", None)  # a part may reshape nested settings first
        if callable(prepare):
            given = dict(prepare(given))
        params = inspect.signature(cls).parameters
        allowed = self.settings(name)
        unknown = sorted(key for key in given if key not in params or key in self.resources)
        if unknown:
            raise ConfigError(f"unknown setting(s) {unknown} for {self.noun} {name!r}; allowed settings: {allowed}")
        missing = sorted(
            p.name
            for p in params.values()
            if p.default is inspect.Parameter.empty and p.name not in given and p.name not in self.resources
        )
        if missing:
            raise ConfigError(f"{self.noun} {name!r} needs the setting(s) {missing}; allowed settings: {allowed}")
        handed = {key: value for key, value in resources.items() if key in params}
        return cls(**given, **handed)
