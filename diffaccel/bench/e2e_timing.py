"""Timers of the end-to-end benchmark: whole steps, and the attention calls inside one step.

On CUDA every interval is a pair of CUDA events read after one synchronisation at the end of the step, so the
timers add no host sync inside the step; on the CPU intervals are ``time.perf_counter`` wall clock (labelled as such
in the report). :class:`AttentionTimer` hooks every attention module of the denoiser (forward pre/post hooks: the
whole module call, projections, norms, RoPE and output projection included) and, for diffaccel methods, the method
call itself (:class:`TimedMethod`, q/k/v to attention output), so a step splits into attention and the rest.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["AttentionTimer", "Interval", "TimedMethod", "time_call"]


class Interval:
    """Accumulates the intervals between :meth:`start` and :meth:`stop` pairs; :meth:`total_ms` reads them."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self._events: list[tuple[Any, Any]] = []
        self._open: list[Any] = []
        self._seconds = 0.0
        self.count = 0

    def reset(self) -> None:
        self._events.clear()
        self._open.clear()
        self._seconds = 0.0
        self.count = 0

    def start(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._open.append(event)
        else:
            self._open.append(time.perf_counter())

    def stop(self) -> None:
        begun = self._open.pop()
        self.count += 1
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((begun, end))
        else:
            self._seconds += time.perf_counter() - begun

    def total_ms(self) -> float:
        """Milliseconds of every closed interval (on CUDA, after the caller synchronised)."""
        if self.cuda:
            return float(sum(a.elapsed_time(b) for a, b in self._events))
        return 1e3 * self._seconds


class TimedMethod:
    """A method wrapped so that each call is one :class:`Interval`; every other attribute is the method's own."""

    def __init__(self, method: Any, interval: Interval) -> None:
        self.__dict__["_method"] = method
        self.__dict__["_interval"] = interval

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._interval.start()
        try:
            return self._method(*args, **kwargs)
        finally:
            self._interval.stop()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_method"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.__dict__["_method"], name, value)


class AttentionTimer:
    """Forward hooks on ``modules`` that time each attention module call into ``self.modules``."""

    def __init__(self, modules: dict[str, torch.nn.Module], cuda: bool) -> None:
        self.attention = Interval(cuda)
        self.method = Interval(cuda)
        self._handles: list[Any] = []
        for module in modules.values():
            self._handles.append(module.register_forward_pre_hook(lambda *_: self.attention.start()))
            self._handles.append(module.register_forward_hook(lambda *_: self.attention.stop()))

    def reset(self) -> None:
        self.attention.reset()
        self.method.reset()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def time_call(call: Callable[[], Any], cuda: bool) -> float:
    """Milliseconds of one ``call()``: CUDA events between two synchronisations on CUDA, wall clock on the CPU."""
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        return float(start.elapsed_time(end))
    begin = time.perf_counter()
    call()
    return 1e3 * (time.perf_counter() - begin)
