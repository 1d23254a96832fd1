"""pytest plugin: run diffusers' own model tests with diffaccel's processors installed on every model they build.

Not part of the package and not run in diffaccel's CI: it is how the compatibility claim of issue 11 ("diffusers'
``tests/models/`` pass with diffaccel applied, as many as stock") is checked. Every instance of a denoiser class
diffaccel supports (``diffaccel.pipelines.adapters.supported_families()``, subclasses included) gets
``diffaccel.apply(model, METHOD)`` at the end of its constructor, so every model a test builds (directly, through
``from_config`` or ``from_pretrained``) runs diffaccel's processors.

Usage (a checkout of diffusers' tests outside the project, e.g. ``/work/diffusers-tests``)::

    cd /work/diffusers-tests
    PYTHONPATH=/path/to/diffaccel DIFFACCEL_TESTS_METHOD=dense \
        python -m pytest -p tools.diffusers_model_tests tests/models/transformers/test_models_transformer_flux.py

``DIFFACCEL_TESTS_METHOD`` picks the method (default ``dense``); ``DIFFACCEL_TESTS_METHOD=off`` loads the plugin
but patches nothing (the stock run, for the same command line). The session summary prints how many models were
given diffaccel.
"""

from __future__ import annotations

import functools
import os
from typing import Any

_COUNT = {"applied": 0, "failed": 0}
_PATCHED: list[tuple[type, Any]] = []


def _method() -> str:
    return os.environ.get("DIFFACCEL_TESTS_METHOD", "dense")


def _patch_class(cls: type) -> None:
    original = cls.__dict__.get("__init__")
    if original is None or getattr(original, "_diffaccel_patched", False):
        return

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        depth = self.__dict__.get("_diffaccel_init_depth", 0)
        self.__dict__["_diffaccel_init_depth"] = depth + 1
        try:
            original(self, *args, **kwargs)
        finally:
            self.__dict__["_diffaccel_init_depth"] = depth
        if depth == 0:  # the outermost constructor of a subclass chain applies once
            self.__dict__.pop("_diffaccel_init_depth", None)
            import diffaccel

            try:
                diffaccel.apply(self, _method())
            except Exception:
                _COUNT["failed"] += 1
                raise
            _COUNT["applied"] += 1

    __init__._diffaccel_patched = True  # type: ignore[attr-defined]
    _PATCHED.append((cls, original))
    cls.__init__ = __init__  # type: ignore[method-assign]


def pytest_configure(config: Any) -> None:
    if _method() == "off":
        return
    import diffusers

    from diffaccel.pipelines.adapters import supported_families

    names = set(supported_families())
    for name in sorted(names):
        cls = getattr(diffusers, name, None)
        if isinstance(cls, type):
            _patch_class(cls)


def pytest_unconfigure(config: Any) -> None:
    for cls, original in _PATCHED:
        cls.__init__ = original  # type: ignore[method-assign]
    _PATCHED.clear()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _method() == "off":
        terminalreporter.write_line("diffaccel: plugin off (stock run)")
        return
    terminalreporter.write_line(
        f"diffaccel: apply(model, {_method()!r}) on {_COUNT['applied']} models "
        f"({_COUNT['failed']} raised at apply); patched classes: {', '.join(c.__name__ for c, _ in _PATCHED)}"
    )
