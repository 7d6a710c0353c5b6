"""Registry: named entries (predictors, volume openers) where a name can be registered only once."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any


class _Lazy(str):
    """A "module:attr" entry, imported when first looked up (so a module need not import the one it names)."""


class Registry:
    """Names -> objects: ``reg.register(name, obj)``, or ``@reg.register(name)`` as a decorator; ``name in reg``,
    ``reg[name]``, ``reg.get(name)``, and ``reg.names()`` / iteration in sorted order. A name is registered once."""

    def __init__(self, kind: str):
        self.kind = kind  # what an entry is, for messages: "predictor", "volume opener"
        self._entries: dict[str, Any] = {}

    def register(self, name: str, obj: Any = None):
        """Add ``obj`` under ``name`` and return it; without ``obj``, return a decorator that does so."""
        if obj is None:
            return lambda target: self.register(name, target)
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered ({self._entries[name]!r}); choose another name")
        self._entries[name] = obj
        return obj

    def register_lazy(self, name: str, target: str) -> None:
        """Add ``target``, a "module:attr" path, under ``name``; it is imported when first looked up."""
        self.register(name, _Lazy(target))

    def __getitem__(self, name: str) -> Any:
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}")
        obj = self._entries[name]
        if isinstance(obj, _Lazy):
            module, _, attr = obj.partition(":")
            obj = self._entries[name] = getattr(importlib.import_module(module), attr)
        return obj

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self._entries else default

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"
