"""One-time warnings: a fallback is announced once per cause, never silently taken."""

from __future__ import annotations

import warnings

_seen: set[str] = set()


class DiffAccelWarning(UserWarning):
    """A requested path was replaced by another (a fallback); the message says which and why."""


def warn_once(key: str, message: str) -> None:
    """Emit ``message`` as a :class:`DiffAccelWarning` the first time ``key`` is seen in this process."""
    if key in _seen:
        return
    _seen.add(key)
    warnings.warn(message, DiffAccelWarning, stacklevel=3)


def reset_warnings() -> None:
    """Forget which warnings were emitted (for tests)."""
    _seen.clear()
