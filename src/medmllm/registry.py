"""Exact-name registries (readers, converters, encoders, projectors, tasks, protocols, rewards).

Lookups fail loudly: an unknown name lists the known ones, a duplicate registration raises.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from medmllm.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object map where names are exact (no case folding, no prefixes)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> T | Callable[[T], T]:
        """``reg.register("x", obj)`` or as a decorator ``@reg.register("x")``."""
        if obj is None:
            def deco(o: T) -> T:
                self.register(name, o)
                return o
            return deco
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if name in self._items:
            raise ConfigError(f"duplicate {self.kind} name {name!r}: already registered as {self._items[name]!r}")
        self._items[name] = obj
        return obj

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise ConfigError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)

    def __len__(self) -> int:
        return len(self._items)
