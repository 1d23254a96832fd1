"""Errors a user can act on. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class DiffAccelError(Exception):
    """Base class for errors caused by user input (bad method, config, model, size)."""


class ConfigError(DiffAccelError, ValueError):
    """A method or run configuration value is not allowed; the message names the parameter and the allowed range."""


class UnknownMethodError(DiffAccelError, KeyError):
    """A method name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnsupportedModelError(DiffAccelError, TypeError):
    """A model family or attention class that no adapter supports."""


class LayoutError(DiffAccelError, ValueError):
    """The token layout of an attention call cannot be determined or is inconsistent."""


class ModelLoadError(DiffAccelError, OSError):
    """A model id or folder that cannot be loaded."""
