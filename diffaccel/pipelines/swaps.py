"""Processor swaps after :func:`diffaccel.apply`: never silent.

diffusers replaces attention processors in several places after a user installed their own:
``fuse_qkv_projections`` (SD3, UNet: ``set_attn_processor(Fused...())``), ``load_ip_adapter`` (IP-adapter
processors on the cross-attention or double-stream modules, ``processor.__class__()`` rebuilds elsewhere),
``set_default_attn_processor``, or a plain ``set_attn_processor``. The run hook calls :func:`check_processors` at
every denoiser forward (host-side Python over the recorded modules; skipped while ``torch.compile`` traces) and:

- takes over a **fused** stock processor (``FusedJointAttnProcessor2_0``, ``FusedAttnProcessor2_0``) that has an
  adapter: it becomes the module's recorded stock processor (so the adapter reproduces the fused projections) and
  diffaccel's processor goes back on the module, the method keeps running; one warning says so;
- leaves any other processor where it is and names it in one warning (the method no longer runs on those modules;
  ``diffaccel.apply`` again takes them back, ``diffaccel.remove`` restores stock).

A ``DiffAccelAttnProcessor()`` rebuilt without arguments (``processor.__class__()``) runs the installed processor
itself (:class:`~diffaccel.pipelines.processor.DiffAccelAttnProcessor`), so it is no swap. ``apply`` leaves modules
whose processor holds weights it cannot take over (IP-adapter processors: ``to_k_ip``/``to_v_ip`` live in the
processor module) on that processor, and says so once (:func:`announce_left`).
"""

from __future__ import annotations

from typing import Any

import torch

from diffaccel.pipelines.adapters.base import processor_wrapper, supported_processors
from diffaccel.pipelines.processor import DiffAccelAttnProcessor
from diffaccel.warn import warn_once


def is_rebuilt(processor: Any) -> bool:
    """A ``DiffAccelAttnProcessor()`` built without arguments (it defers to the installed processor)."""
    return isinstance(processor, DiffAccelAttnProcessor) and processor.rebuilt


def runs(current: Any, processor: DiffAccelAttnProcessor) -> bool:
    """``current`` runs ``processor``: it is it, a no-argument rebuild, or a weight-holding wrapper around it."""
    return current is processor or is_rebuilt(current) or getattr(current, "__dict__", {}).get("diffaccel_processor") is processor


def wrap_weighted(module: torch.nn.Module, processor: DiffAccelAttnProcessor) -> Any | None:
    """Install the registered wrapper around ``module``'s weight-holding processor (an IP-adapter processor);
    returns the original (the module's stock processor from now on), or ``None`` when none is registered."""
    original = module.processor
    wrap = processor_wrapper(type(original).__name__)
    if wrap is None:
        return None
    module.__dict__["_diffaccel_stock_processor"] = original
    module.__dict__.pop("_diffaccel_adapter", None)
    module.set_processor(wrap(original, processor))
    return original


def holds_weights(processor: Any) -> bool:
    """The processor is a module with parameters of its own (IP-adapter, custom-diffusion processors)."""
    return isinstance(processor, torch.nn.Module) and any(True for _ in processor.parameters())


def processors_to_leave(modules: dict[str, torch.nn.Module]) -> dict[str, Any]:
    """Modules whose current processor holds weights: replacing it would drop them from the module tree
    (``apply`` then wraps those it has a wrapper for and leaves the others)."""
    return {name: module.processor for name, module in modules.items() if holds_weights(module.processor)}


def _by_class(found: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, proc in found.items():
        out.setdefault(type(proc).__name__, []).append(name)
    return out


def announce_left(model: torch.nn.Module, left: dict[str, Any], processor: DiffAccelAttnProcessor) -> None:
    """One warning per processor class that :func:`diffaccel.apply` left in place."""
    for cls, names in _by_class(left).items():
        warn_once(
            f"swap-left:{type(model).__name__}:{cls}",
            f"diffaccel: {len(names)} attention module(s) of {type(model).__name__} run {cls}, which holds its own "
            f"weights (IP-adapter); diffaccel leaves them on it, so {getattr(processor.method, 'name', type(processor.method).__name__)!r} does not run there "
            f"(e.g. {names[0]}; IP-adapter attention is dense). The method runs on every other attention module.",
        )


def check_processors(model: torch.nn.Module, inst: Any) -> None:
    """Take over fused processors and name every other replacement once (see the module docstring)."""
    processor: DiffAccelAttnProcessor = inst.processor
    taken: dict[str, Any] = {}
    replaced: dict[str, Any] = {}
    known: set[str] | None = None
    for name in inst.stock:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        current = getattr(module, "processor", None)
        if current is None or runs(current, processor) or isinstance(current, DiffAccelAttnProcessor):
            continue
        if inst.left.get(name) is current:
            continue
        if known is None:
            known = set(supported_processors())
        cls = type(current).__name__
        if holds_weights(current) and processor_wrapper(cls) is not None:
            inst.stock[name] = wrap_weighted(module, processor)
            taken[name] = current
        elif cls.startswith("Fused") and cls in known and not holds_weights(current):
            module.__dict__["_diffaccel_stock_processor"] = current
            module.__dict__.pop("_diffaccel_adapter", None)
            module.set_processor(processor)
            inst.stock[name] = current
            taken[name] = current
        else:
            inst.left[name] = current
            replaced[name] = current
    method = getattr(processor.method, "name", type(processor.method).__name__)
    for cls, names in _by_class(taken).items():
        warn_once(
            f"swap-taken:{type(model).__name__}:{cls}",
            f"diffaccel: {len(names)} attention module(s) of {type(model).__name__} were switched to {cls} after "
            f"diffaccel.apply (fuse_qkv_projections, load_ip_adapter); diffaccel reproduces {cls} there and keeps "
            f"running {method!r} (IP-adapter attention dense; diffaccel.remove restores {cls}).",
        )
    for cls, names in _by_class(replaced).items():
        cross = all(getattr(model.get_submodule(n), "is_cross_attention", False) for n in names)
        warn_once(
            f"swap-replaced:{type(model).__name__}:{cls}",
            f"diffaccel: {len(names)} attention module(s) of {type(model).__name__} now run {cls}, installed after "
            f"diffaccel.apply (load_ip_adapter, set_default_attn_processor or set_attn_processor; e.g. {names[0]}): "
            f"{method!r} no longer runs there"
            + (" (cross-attention, which diffaccel keeps dense anyway)" if cross else "")
            + ". diffaccel.apply(model, method) again takes them back; diffaccel.remove(model) restores stock.",
        )
