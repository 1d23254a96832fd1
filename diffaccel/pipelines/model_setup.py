"""Pipeline-side setup that some methods need on the model, registered per method class.

Methods hold no model code (house rule), yet a few need the model changed when they are applied: CLEAR runs on
distilled attention projections that must be loaded into the transformer. Such a method declares it here, in the
pipeline layer, with a :class:`ModelSetup` keyed by its class; :func:`diffaccel.apply` calls
:func:`setup_model` for every denoiser and :func:`warn_lingering` to say when a model still holds another
method's changes. Guidance methods that wrap the denoiser call (SoftPAG) register an installer with
:func:`register_denoiser_wrapper`, which :func:`diffaccel.apply` calls instead of installing processors itself,
so the installer knows no method by name (review 2026-12, finding 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from diffaccel.methods.base import AttentionMethod
from diffaccel.methods.clear import ClearMethod
from diffaccel.methods.paro import ParoMethod
from diffaccel.pipelines.clear_weights import installed_clear_weights, load_clear_weights
from diffaccel.warn import warn_once


@dataclass(frozen=True)
class ModelSetup:
    """What the pipeline layer does on a model for one method class.

    Attributes:
        setup: ``setup(method, model)``, called by :func:`diffaccel.apply` on every denoiser before the processors
            are installed.
        leftover: ``leftover(model)`` describes changes ``setup`` made that outlive :func:`diffaccel.remove`
            (``None`` when the model holds none); another method applied on such a model gets a warning.
        note_module: ``note_module(method, attn)``, called once per attention module by processors installed
            without :func:`diffaccel.apply` (a bare ``set_attn_processor``), to tell the method what the module
            holds; ``None`` when the method needs nothing per module.
    """

    setup: Callable[[Any, torch.nn.Module], None]
    leftover: Callable[[torch.nn.Module], str | None] | None = None
    note_module: Callable[[Any, torch.nn.Module], None] | None = None


_SETUPS: dict[type, ModelSetup] = {}
_WRAPPERS: dict[type, Callable[..., Any]] = {}


def register_model_setup(method_class: type, setup: ModelSetup) -> None:
    """Register the model setup of ``method_class`` (and its subclasses)."""
    _SETUPS[method_class] = setup


def model_setup_for(method: Any) -> ModelSetup | None:
    """The setup registered for ``method``'s class or its nearest registered base class."""
    for cls in type(method).__mro__:
        if cls in _SETUPS:
            return _SETUPS[cls]
    return None


def setup_model(method: AttentionMethod, model: torch.nn.Module) -> None:
    """Run ``method``'s registered model setup on ``model`` (no-op for methods without one)."""
    entry = model_setup_for(method)
    if entry is not None:
        entry.setup(method, model)


def warn_lingering(method: AttentionMethod, model: torch.nn.Module) -> None:
    """Warn once when ``model`` still holds changes another method's setup made (they outlive ``remove()``)."""
    for cls, entry in _SETUPS.items():
        if entry.leftover is None or isinstance(method, cls):
            continue
        what = entry.leftover(model)
        if what is not None:
            warn_once(
                f"{cls.__name__}-leftover",
                f"{type(model).__name__} still holds {what}; method {getattr(method, 'name', method)!r} runs on it. "
                "Reload the model for its original weights.",
            )


def register_denoiser_wrapper(method_class: type, install: Callable[..., Any]) -> None:
    """Register ``install(pipe_or_model, method_or_none, **config)`` for a method that wraps the denoiser call.

    The class must set ``wraps_denoiser = True``; :func:`diffaccel.apply` hands such methods (by name or
    instance) to ``install`` and returns what it returns (the installed processor).
    """
    if not getattr(method_class, "wraps_denoiser", False):
        raise TypeError(f"{method_class.__name__} must set wraps_denoiser = True to register a denoiser wrapper")
    _WRAPPERS[method_class] = install


def denoiser_wrapper_for(method_class: type) -> Callable[..., Any] | None:
    """The installer registered for ``method_class`` (walking base classes), or ``None``."""
    _load_builtin_wrappers()
    for cls in method_class.__mro__:
        if cls in _WRAPPERS:
            return _WRAPPERS[cls]
    return None


def _load_builtin_wrappers() -> None:
    """Import the built-in guidance installers (SoftPAG) so they register themselves: ``import diffaccel`` is
    lazy, so nothing else is sure to have imported them before the first lookup (plugin registration)."""
    import diffaccel.pipelines.guidance  # noqa: F401


# ---------------------------------------------------------------------------------------------- CLEAR


def _clear_setup(method: ClearMethod, model: torch.nn.Module) -> None:
    """Install ``config.weights`` (distilled projections), note weights already installed, tell the method."""
    cfg = method.config
    info = installed_clear_weights(model)
    if cfg.weights is not None:
        info = load_clear_weights(model, cfg.weights, radius=cfg.radius, filename=cfg.weights_file)
    if info is not None:
        method.note_distilled(info.radius)


def _clear_leftover(model: torch.nn.Module) -> str | None:
    if installed_clear_weights(model) is None:
        return None
    return "CLEAR's distilled attention projections (load_clear_weights changed them in place)"


def _clear_note_module(method: ClearMethod, attn: torch.nn.Module) -> None:
    info = installed_clear_weights(attn)
    if info is not None:
        method.note_distilled(info.radius)


register_model_setup(ClearMethod, ModelSetup(_clear_setup, _clear_leftover, _clear_note_module))


# ---------------------------------------------------------------------------------------------- PARO


def model_config_hash(model: torch.nn.Module) -> str:
    """A short hash of a denoiser's config (class name + public config entries): what a PARO plan was measured on.

    Private entries (``_name_or_path``, ``_diffusers_version``...) are left out, so a hub id and a saved copy of it
    hash alike.
    """
    import hashlib
    import json

    config = getattr(model, "config", None) or {}
    public = {k: v for k, v in dict(config).items() if not str(k).startswith("_")}
    text = json.dumps({"class": type(model).__name__, "config": public}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_id(model: torch.nn.Module) -> str:
    """The model's hub id or folder when diffusers recorded it, else its class name."""
    config = getattr(model, "config", None) or {}
    return str(dict(config).get("_name_or_path") or type(model).__name__)


def _paro_setup(method: ParoMethod, model: torch.nn.Module) -> None:
    """Tell the method which model it runs on, so a plan calibrated on another model is refused."""
    method.note_model(model_id(model), model_config_hash(model))


register_model_setup(ParoMethod, ModelSetup(_paro_setup))
