"""One-time warnings: a fallback is announced once per cause, never silently taken.

In the command line (:func:`install_cli_warnings`) every warning prints as one line ``warning: ...`` on stderr,
without the file, line number and source line that Python's default format adds.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, TextIO

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


def format_warning_line(message: Warning | str, category: type[Warning]) -> str:
    """``warning: <message>`` on one line (whitespace collapsed); other libraries' warnings name their category."""
    text = " ".join(str(message).split())
    if issubclass(category, DiffAccelWarning):
        return f"warning: {text}"
    return f"warning ({category.__name__}): {text}"


def _show_one_line(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, file: TextIO | None = None,
    line: str | None = None,
) -> None:
    stream = sys.stderr if file is None else file
    try:
        stream.write(format_warning_line(message, category) + "\n")
    except OSError:  # a closed stream: nothing to do, as warnings.showwarning does
        pass


def install_cli_warnings() -> Any:
    """Print every warning as one ``warning: ...`` line (the command line's format); returns the previous hook."""
    previous = warnings.showwarning
    warnings.showwarning = _show_one_line
    return previous
