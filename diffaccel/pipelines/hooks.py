"""Install and remove diffaccel on a pipeline or a denoiser: processors, stock-processor records, the run hook."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from diffaccel.context import RunContext
from diffaccel.errors import UnsupportedModelError
from diffaccel.methods.base import AttentionMethod
from diffaccel.warn import warn_once
from diffaccel.pipelines.adapters.base import (
    adapter_for,
    bind_forward_args,
    family_of,
    mark_text_only,
    stock_processor_name,
)
from diffaccel.pipelines.processor import DiffAccelAttnProcessor

DENOISER_ATTRIBUTES = ("transformer", "transformer_2", "unet")
"""Pipeline attributes that hold denoisers (Wan 2.2 has two transformers)."""


@dataclass
class Installation:
    """What :func:`apply` changed on one denoiser, so :func:`remove` can undo it."""

    processor: DiffAccelAttnProcessor
    stock: dict[str, Any]
    hook: Any
    extra_hooks: list[Any] = field(default_factory=list)


def denoisers_of(pipe_or_model: Any) -> list[torch.nn.Module]:
    """The denoisers of a pipeline, or the model itself."""
    if isinstance(pipe_or_model, torch.nn.Module):
        return [pipe_or_model]
    found = [getattr(pipe_or_model, a) for a in DENOISER_ATTRIBUTES if getattr(pipe_or_model, a, None) is not None]
    if not found:
        raise UnsupportedModelError(
            f"{type(pipe_or_model).__name__} has no denoiser (looked for attributes {', '.join(DENOISER_ATTRIBUTES)}); "
            "pass a diffusers pipeline or a transformer/UNet model"
        )
    return found


def attention_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every module of ``model`` that runs a diffusers attention processor, by qualified name."""
    return {
        name: module
        for name, module in model.named_modules()
        if hasattr(module, "set_processor") and hasattr(module, "processor")
    }


def apply(pipe_or_model: Any, method: AttentionMethod | str | DiffAccelAttnProcessor = "dense", **config: Any) -> DiffAccelAttnProcessor:
    """Replace the attention of a pipeline's denoisers (or of one model) with ``method``.

    Records the stock processors (so :func:`remove` restores them and adapters know the exact model code to
    reproduce) and installs a forward pre-hook that fills the :class:`RunContext` with the latent grid, the
    text length and the denoising step. Calling it again replaces the previous method.

    Args:
        pipe_or_model: a diffusers pipeline, or a transformer / UNet model.
        method: a registered method name, a method instance, or a :class:`DiffAccelAttnProcessor`.
        **config: the method's parameters when ``method`` is a name.

    Returns:
        The processor installed on every attention module.
    """
    from diffaccel.methods.softpag import SoftPAGMethod

    if (isinstance(method, str) and method == "softpag") or isinstance(method, SoftPAGMethod):
        from diffaccel.pipelines.guidance import apply_softpag  # guidance wraps the denoiser call too

        return apply_softpag(pipe_or_model, None if isinstance(method, str) else method, **config)
    models = denoisers_of(pipe_or_model)
    for model in models:
        family_of(model)  # unsupported families fail before anything changes
    if isinstance(method, DiffAccelAttnProcessor):
        if config:
            raise TypeError("config keywords cannot be combined with a processor instance")
        processor = method
    else:
        processor = DiffAccelAttnProcessor(method, **config)
    remove(pipe_or_model)
    ctx = processor.context
    scheduler = getattr(pipe_or_model, "scheduler", None)
    if scheduler is not None:
        ctx.num_steps_fn = lambda: _scheduler_steps(scheduler)
    for model in models:
        _warn_if_clear_weights_linger(model, processor)
        for prefix in family_of(model).text_only_modules:
            mark_text_only(model.get_submodule(prefix))
        modules = attention_modules(model)
        stock = {}
        for name, module in modules.items():
            current = module.processor
            if isinstance(current, DiffAccelAttnProcessor):
                current = _recover_stock_processor(module)
            stock[name] = current
            module.__dict__["_diffaccel_stock_processor"] = current
            module.__dict__["_diffaccel_name"] = name
            module.__dict__.pop("_diffaccel_adapter", None)
        for module in modules.values():
            adapter_for(module)  # every module must be supported before any processor is swapped
        setup = getattr(processor.method, "setup_model", None)
        if setup is not None:  # methods that install weights on the model (CLEAR's distilled projections)
            setup(model)
        for module in modules.values():
            module.set_processor(processor)
        hook = model.register_forward_pre_hook(_context_hook(model, ctx), with_kwargs=True)
        model.__dict__["_diffaccel_installation"] = Installation(processor=processor, stock=stock, hook=hook)
    return processor


def remove(pipe_or_model: Any) -> None:
    """Restore the stock processors and remove the hooks that :func:`apply` installed (no-op if none)."""
    for model in denoisers_of(pipe_or_model):
        inst: Installation | None = model.__dict__.pop("_diffaccel_installation", None)
        if inst is None:
            continue
        modules = attention_modules(model)
        for name, processor in inst.stock.items():
            module = modules.get(name)
            if module is None:
                continue
            module.set_processor(processor)
            for key in ("_diffaccel_stock_processor", "_diffaccel_adapter"):
                module.__dict__.pop(key, None)
        inst.hook.remove()
        for h in inst.extra_hooks:
            h.remove()


def _recover_stock_processor(module: torch.nn.Module) -> Any:
    """The stock processor of a module whose processor a bare ``set_attn_processor`` already replaced."""
    default_cls = getattr(module, "_default_processor_cls", None)
    if default_cls is not None:
        return default_cls()
    import diffusers.models.attention_processor as stock_processors

    module.__dict__.pop("_diffaccel_stock_processor", None)
    name = stock_processor_name(module)
    cls = getattr(stock_processors, name, None)
    if cls is None:
        raise UnsupportedModelError(
            f"cannot recover the stock processor of {type(module).__name__} (guessed {name}); reload the model "
            "before diffaccel.apply"
        )
    return cls()


def _warn_if_clear_weights_linger(model: torch.nn.Module, processor: DiffAccelAttnProcessor) -> None:
    """CLEAR's distilled projections replace the model's own weights in place and stay after remove()."""
    from diffaccel.pipelines.clear_weights import installed_clear_weights

    if getattr(processor.method, "name", None) == "clear":
        return
    if installed_clear_weights(model) is not None:
        warn_once(
            "clear-weights-linger",
            f"{type(model).__name__} still holds CLEAR's distilled attention projections (load_clear_weights "
            f"changed them in place); method {processor.method.name!r} runs on those weights. Reload the model "
            "for its original weights.",
        )


def installed_processor(model: torch.nn.Module) -> DiffAccelAttnProcessor | None:
    inst = model.__dict__.get("_diffaccel_installation")
    return None if inst is None else inst.processor


def _context_hook(model: torch.nn.Module, ctx: RunContext) -> Callable:
    family = family_of(model)

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        bound = bind_forward_args(module, args, kwargs)
        grid, text_len = family.read_inputs(module, bound)
        ctx.begin_denoiser_call(grid, text_len, _timestep_value(bound.get("timestep")))

    return hook


def _timestep_value(timestep: Any) -> float | None:
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        # per-token timesteps (Wan 2.2 TI2V, LTX conditioning) are 0 on clean frames: the noise level is the max
        return float(timestep.max()) if timestep.numel() else None
    return float(timestep)


def _scheduler_steps(scheduler: Any) -> int | None:
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None:
        return None
    order = int(getattr(scheduler, "order", 1) or 1)
    # second-order schedulers (Heun) hold 2n - 1 timesteps for n steps: the first step has one evaluation
    return -(-len(timesteps) // order)
