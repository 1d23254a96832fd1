"""One demo engine shared by the demo's test modules, so tiny-flux is built once per test session."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def shared_comparer():
    from diffaccel.demo.compare import Comparer

    return Comparer(device="cpu")
