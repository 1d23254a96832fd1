"""Install and remove diffaccel on a pipeline or a denoiser: processors, stock-processor records, the run hook."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from diffaccel.context import RunContext
from diffaccel.errors import ConfigError, UnsupportedModelError
from diffaccel.methods.base import AttentionMethod, method_class
from diffaccel.methods.guard import QualityGuard, check_budget
from diffaccel.pipelines import compile_ops, model_setup, parallel
from diffaccel.pipelines.adapters.base import (
    adapter_for,
    bind_forward_args,
    family_of,
    mark_hierarchical,
    mark_text_only,
    stock_processor_name,
)
from diffaccel.pipelines import swaps
from diffaccel.pipelines.processor import INSTALLED_PROCESSOR, DiffAccelAttnProcessor

DENOISER_ATTRIBUTES = ("transformer", "transformer_2", "unet")
"""Pipeline attributes that hold denoisers (Wan 2.2 has two transformers)."""


@dataclass
class Installation:
    """What :func:`apply` changed on one denoiser, so :func:`remove` can undo it."""

    processor: DiffAccelAttnProcessor
    stock: dict[str, Any]
    hook: Any
    extra_hooks: list[Any] = field(default_factory=list)
    left: dict[str, Any] = field(default_factory=dict)
    """Modules ``apply`` left on their current processor (IP-adapter processors, which hold weights), by name."""


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


def apply(
    pipe_or_model: Any,
    method: AttentionMethod | str | DiffAccelAttnProcessor = "dense",
    *,
    guard: float | None = None,
    strict: bool = False,
    **config: Any,
) -> DiffAccelAttnProcessor:
    """Replace the attention of a pipeline's denoisers (or of one model) with ``method``.

    Records the stock processors (so :func:`remove` restores them and adapters know the exact model code to
    reproduce) and installs a forward pre-hook that fills the :class:`RunContext` with the latent grid, the
    text length and the denoising step. Calling it again replaces the previous method.

    Args:
        pipe_or_model: a diffusers pipeline, or a transformer / UNet model.
        method: a registered method name, a method instance, or a :class:`DiffAccelAttnProcessor`.
        guard: a relative L1 error budget (e.g. ``0.05``): each layer's first call that runs the method is checked
            against dense attention on sampled query rows and layers above the budget run dense for the rest of the
            run (:class:`~diffaccel.methods.guard.QualityGuard`; ``processor.method.report()`` tells which).
        strict: a call whose token grid cannot be derived (FLUX ``img_ids`` that are not one row-major grid, ...)
            raises :class:`~diffaccel.errors.LayoutError` when the method needs the grid; by default it runs dense,
            exactly as stock, with one warning per layer. ``dense`` never needs the grid.
        **config: the method's parameters when ``method`` is a name.

    Processors replaced after ``apply`` are never dropped silently (:mod:`diffaccel.pipelines.swaps`): fused
    projections are taken over, anything else is named in one warning. Modules running an IP-adapter processor
    (which holds the IP weights) are left on it, named in one warning; IP cross-attention is dense anyway.

    Returns:
        The processor installed on every attention module.
    """
    if guard is not None:
        check_budget(guard)
    wrapper = _denoiser_wrapper(method)
    if wrapper is not None:  # guidance methods wrap the denoiser call too (SoftPAG): their installer does it all
        if guard is not None:
            raise ConfigError("guard= is not supported with a method that wraps the denoiser call (SoftPAG): its "
                              "output is a guidance term, not attention to compare with dense")
        installed = wrapper(pipe_or_model, None if isinstance(method, str) else method, **config)
        if strict:
            installed.strict = True
        return installed
    models = denoisers_of(pipe_or_model)
    for model in models:
        family_of(model)  # unsupported families fail before anything changes
    if isinstance(method, DiffAccelAttnProcessor):
        if config:
            raise TypeError("config keywords cannot be combined with a processor instance")
        processor = method
        if strict:
            processor.strict = True
    else:
        processor = DiffAccelAttnProcessor(method, strict=strict, **config)
    if guard is not None:
        inner = processor.method.method if isinstance(processor.method, QualityGuard) else processor.method
        processor.method = QualityGuard(inner, guard)
    remove(pipe_or_model)
    ctx = processor.context
    scheduler = getattr(pipe_or_model, "scheduler", None)
    if scheduler is not None:
        # callable objects, not closures: a model with diffaccel applied stays picklable and deep-copyable
        ctx.num_steps_fn = SchedulerSteps(scheduler)
        ctx.step_fn = SchedulerStep(scheduler) if _counts_steps(scheduler) else None
    if not isinstance(pipe_or_model, torch.nn.Module):
        record_pipeline_grid(pipe_or_model, models)
    for model in models:
        model_setup.warn_lingering(processor.method, model)
        family = family_of(model)
        for prefix in family.text_only_modules:
            mark_text_only(model.get_submodule(prefix))
        modules = attention_modules(model)
        left = swaps.processors_to_leave(modules)
        modules = {name: module for name, module in modules.items() if name not in left}
        stock = {}
        for name, module in modules.items():
            current = module.processor
            if isinstance(current, DiffAccelAttnProcessor):
                current = _recover_stock_processor(module)
            stock[name] = current
            module.__dict__["_diffaccel_stock_processor"] = current
            module.__dict__["_diffaccel_name"] = name
            compile_ops.set_layer_token(module, name)
            module.__dict__.pop("_diffaccel_adapter", None)
            mark_hierarchical(module, family.hierarchical)
        for module in modules.values():
            adapter_for(module)  # every module must be supported before any processor is swapped
        parallel.attach(processor, model)  # a model already under context parallelism: tell the processor, check
        model_setup.setup_model(processor.method, model)  # e.g. CLEAR's distilled projections
        for module in modules.values():
            module.set_processor(processor)
            module.__dict__[INSTALLED_PROCESSOR] = processor
        for name in list(left):  # weight-holding processors with a wrapper keep their weights and run the method
            module = model.get_submodule(name)
            module.__dict__["_diffaccel_name"] = name
            compile_ops.set_layer_token(module, name)
            mark_hierarchical(module, family.hierarchical)
            original = swaps.wrap_weighted(module, processor)
            if original is not None:
                stock[name] = original
                module.__dict__[INSTALLED_PROCESSOR] = processor
                del left[name]
        swaps.announce_left(model, left, processor)
        hook = model.register_forward_pre_hook(ContextHook(ctx, processor), with_kwargs=True)
        model.__dict__["_diffaccel_installation"] = Installation(
            processor=processor, stock=stock, hook=hook, left=left
        )
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
            if swaps.runs(module.processor, inst.processor):
                module.set_processor(processor)  # a processor someone else installed since stays theirs
            for key in ("_diffaccel_stock_processor", "_diffaccel_adapter", INSTALLED_PROCESSOR):
                module.__dict__.pop(key, None)
        inst.hook.remove()
        for h in inst.extra_hooks:
            h.remove()
    if not isinstance(pipe_or_model, torch.nn.Module):
        recorder = pipe_or_model.__dict__.get("_prepare_latent_image_ids")
        if isinstance(recorder, GridRecorder):
            del pipe_or_model.__dict__["_prepare_latent_image_ids"]


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


def _denoiser_wrapper(method: Any) -> Callable[..., Any] | None:
    """The installer of a method that wraps the denoiser call (class attribute ``wraps_denoiser``), else ``None``."""
    if isinstance(method, DiffAccelAttnProcessor):
        return None
    cls = method_class(method) if isinstance(method, str) else type(method)
    if not getattr(cls, "wraps_denoiser", False):
        return None
    install = model_setup.denoiser_wrapper_for(cls)
    if install is None:
        raise UnsupportedModelError(
            f"method {getattr(cls, 'name', cls.__name__)!r} wraps the denoiser call but no installer is registered "
            "for it (diffaccel.pipelines.model_setup.register_denoiser_wrapper)"
        )
    return install


def installed_processor(model: torch.nn.Module) -> DiffAccelAttnProcessor | None:
    inst = model.__dict__.get("_diffaccel_installation")
    return None if inst is None else inst.processor


GRID_ATTR = "_diffaccel_grid"
"""Attribute of a denoiser holding the latent token grid announced outside its tensors (by the pipeline, or by
:func:`set_grid`): the grid FLUX reads under ``torch.compile``, where reading ``img_ids`` values would be a
data-dependent guard."""


def set_grid(pipe_or_model: Any, grid: tuple[int, ...] | None) -> None:
    """Tell the denoisers of ``pipe_or_model`` their latent token grid (``(rows, cols)`` or ``(frames, rows,
    cols)``) for calls that do not go through a pipeline that announces it (a FLUX transformer compiled and called
    directly). ``None`` forgets it. The grid is checked against the shape of each call's inputs, never their values.
    """
    if grid is not None:
        if not isinstance(grid, (tuple, list)) or len(grid) not in (2, 3) or not all(
            isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid
        ):
            raise ValueError(f"grid must be a tuple of 2 or 3 positive ints (rows, cols) or (frames, rows, cols), "
                             f"got {grid!r}")
        grid = tuple(grid)
    for model in denoisers_of(pipe_or_model):
        if grid is None:
            model.__dict__.pop(GRID_ATTR, None)
        else:
            model.__dict__[GRID_ATTR] = grid


class GridRecorder:
    """Wraps a pipeline's ``_prepare_latent_image_ids(batch, height, width, device, dtype)`` (FLUX pipelines): the
    ids it builds describe a ``(height, width)`` grid, recorded as Python ints on the denoisers (:data:`GRID_ATTR`)
    so a compiled denoiser gets its grid without reading the ids. A picklable object, not a closure."""

    def __init__(self, original: Callable[..., torch.Tensor], models: list[torch.nn.Module]) -> None:
        self.original = original
        self.models = models

    def __call__(self, batch_size: int, height: int, width: int, *args: Any, **kwargs: Any) -> torch.Tensor:
        for model in self.models:
            model.__dict__[GRID_ATTR] = (int(height), int(width))
        return self.original(batch_size, height, width, *args, **kwargs)


def record_pipeline_grid(pipe: Any, models: list[torch.nn.Module]) -> None:
    """Install a :class:`GridRecorder` on a pipeline that builds FLUX-style image ids (others need none)."""
    original = getattr(type(pipe), "_prepare_latent_image_ids", None)
    if original is None or isinstance(pipe.__dict__.get("_prepare_latent_image_ids"), GridRecorder):
        return
    pipe.__dict__["_prepare_latent_image_ids"] = GridRecorder(original, models)


class SchedulerSteps:
    """``num_steps`` of a run from the pipeline's scheduler (a picklable callable)."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def __call__(self) -> int | None:
        return _scheduler_steps(self.scheduler)


class SchedulerStep:
    """The step the pipeline's scheduler is at (:func:`scheduler_step`; a picklable callable)."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def __call__(self) -> int:
        return scheduler_step(self.scheduler)


class ContextHook:
    """The denoiser's forward pre-hook: fills the :class:`RunContext` (grid, text length, step) before each call.

    A picklable object (``torch.save`` of a whole model, ``copy.deepcopy``). Eagerly it records the call directly.
    Traced by dynamo (a full-model ``torch.compile`` or ``torch.export``), it sets the grid and text length, which
    come from shapes and recorded Python ints, for the adapters' traced layouts, and leaves the per-call state
    (step, timestep) to the ``diffaccel::begin_call`` op, which runs when the graph runs (dynamo would apply Python
    side effects only after the graph).
    """

    def __init__(self, ctx: RunContext, processor: DiffAccelAttnProcessor) -> None:
        self.ctx = ctx
        self.processor = processor

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        family = family_of(module)
        inst = module.__dict__.get("_diffaccel_installation")
        if inst is not None and not torch.compiler.is_compiling():
            swaps.check_processors(module, inst)
        bound = bind_forward_args(module, args, kwargs)
        grid, text_len = family.read_inputs(module, bound)
        if compile_ops.compiling():
            return self._traced(module, args, kwargs, bound, grid, text_len)
        # the timestep is read (a host sync) only when the scheduler does not count the steps itself
        self.ctx.begin_denoiser_call(grid, text_len, bound.get("timestep"))
        if family.begin_forward is not None:
            family.begin_forward(module, bound, self.ctx)
        return None

    def _traced(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], bound: dict[str, Any],
                grid: tuple[int, ...] | None, text_len: int | None) -> Any:
        hidden = bound["hidden_states"]
        timestep = bound.get("timestep")
        is_tensor = isinstance(timestep, torch.Tensor)
        recorded = torch.ops.diffaccel.begin_call(
            hidden, timestep if is_tensor else None,
            None if (is_tensor or timestep is None) else float(timestep), self.processor._op_key,
            None if grid is None else list(grid), text_len,
        )
        self.ctx.grid, self.ctx.text_len = grid, text_len  # trace time: the layouts the adapters build now
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": recorded}
        return (recorded, *args[1:]), kwargs


def _counts_steps(scheduler: Any) -> bool:
    """True when the scheduler exposes ``step_index`` (Euler, Heun, KDPM2, flow-matching, UniPC, DPM-Solver...)."""
    return isinstance(getattr(type(scheduler), "step_index", None), property)


def scheduler_step(scheduler: Any) -> int:
    """The denoising step the scheduler is at, from its ``step_index`` (host ints only: no device read).

    ``step_index`` counts ``scheduler.step`` calls since ``set_timesteps`` (``None`` before the first). It starts at
    ``begin_index`` in img2img runs, and second-order schedulers (Heun, KDPM2: ``order`` 2) call ``step`` twice per
    step after the first, so the step is ``ceil((step_index - begin_index) / order)``.
    """
    index = scheduler.step_index
    if index is None:
        return 0
    begin = getattr(scheduler, "begin_index", None) or 0
    order = int(getattr(scheduler, "order", 1) or 1)
    return -(-(int(index) - int(begin)) // order)


def _scheduler_steps(scheduler: Any) -> int | None:
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None:
        return None
    order = int(getattr(scheduler, "order", 1) or 1)
    # second-order schedulers (Heun) hold 2n - 1 timesteps for n steps: the first step has one evaluation
    return -(-len(timesteps) // order)
