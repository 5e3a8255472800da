"""Named registries: backends, tasks, metrics and quantization rules are looked up by name.

A registry maps a name to an object or to a lazy "module:attr" spec that is imported on first
use, so naming a backend or metric in a case file never imports code it does not need. Unknown
names raise `RegistryError` listing the known ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from harness.factory import resolve

T = TypeVar("T")


class RegistryError(KeyError):
    """A name is not registered; the message lists the registered names."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Names -> objects (or "module:attr" specs resolved on first use), in registration order."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T | str] = {}

    def register(self, name: str, target: T | str, *, replace: bool = False) -> None:
        """Register `target` under `name`; a second registration of a name is an error unless
        `replace` (plugins overriding a built-in say so explicitly)."""
        if name in self._entries and not replace and self._entries[name] is not target:
            raise ValueError(f"{self.kind} '{name}' is already registered")
        self._entries[name] = target

    def get(self, name: str) -> T:
        """The object registered under `name` (imported now if it was registered as a spec)."""
        try:
            target = self._entries[name]
        except KeyError:
            raise RegistryError(f"unknown {self.kind} '{name}'; known: {', '.join(self._entries) or 'none'}") from None
        if isinstance(target, str):
            resolved: T = resolve(target)  # type: ignore[assignment]
            self._entries[name] = resolved
            return resolved
        return target

    def names(self) -> tuple[str, ...]:
        """Registered names in registration order."""
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)
