"""Perturbation guidance around the denoiser call: the batch ``[uncond, cond, perturbed]`` and its combination.

Follows the convention of diffusers' PAG pipelines (``pipelines/pag/pag_utils.py``): with classifier-free
guidance the denoiser batch is ``[uncond, cond, perturbed]`` and the prediction

    uncond + cfg·(cond - uncond) + s_t·(cond - perturbed),   s_t = max(0, s - adaptive·(1000 - t))

and without it (FLUX guidance-distilled models, SD3 with ``guidance_scale <= 1``) the batch is ``[cond,
perturbed]`` and the prediction ``cond + s_t·(cond - perturbed)``. ``t`` is the scheduler timestep (0..1000).

The stock pipeline is not modified: a forward pre-hook on the denoiser appends the perturbed rows (copies of
the cond rows) to every batched input and writes their position to the
:class:`~diffaccel.methods.softpag.SoftPAGMethod`'s ``perturbed_rows``, where its attention calls find them; a forward hook then hands the pipeline the batch it
expects, ``[uncond, cond']`` or ``cond'``, with ``cond' = cond + (s_t / cfg)·(cond - perturbed)`` under CFG so
that the pipeline's own ``uncond + cfg·(cond' - uncond)`` is the formula above.

Supported: pipelines that batch CFG (SD 1.x, SDXL, SD3 / SD3.5 and others exposing
``do_classifier_free_guidance``) or run without it (FLUX with ``true_cfg_scale <= 1``). Pipelines that call the
denoiser separately for the negative prompt (Wan, FLUX ``true_cfg_scale > 1``) are not supported: the pipeline
combines those calls without telling the hook which one is which. LTX-2 (``LTX2Pipeline``) returns a video and an
audio prediction: both are combined, each with the pipeline's own CFG scale (``guidance_scale``,
``audio_guidance_scale``); its spatio-temporal and modality-isolation guidance (extra denoiser calls) must be off.

Nothing here reads a tensor's value on the host: the adaptive weight ``s_t`` is computed on the timestep's device.
This module registers :func:`enable_softpag` as SoftPAG's denoiser wrapper, so ``diffaccel.apply(pipe, "softpag")``
reaches it through :mod:`diffaccel.pipelines.model_setup` (imports run guidance -> hooks, never back).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from diffaccel.context import RunContext
from diffaccel.errors import ConfigError, UnsupportedModelError
from diffaccel.methods.base import build_config
from diffaccel.methods.softpag import SoftPAGConfig, SoftPAGMethod, layer_or_parent_matches
from diffaccel.pipelines import hooks
from diffaccel.pipelines.model_setup import register_denoiser_wrapper
from diffaccel.pipelines.processor import DiffAccelAttnProcessor
from diffaccel.warn import warn_once

LATENT_ARGUMENTS = ("hidden_states", "sample")
"""Denoiser forward arguments holding the latent batch (transformers, UNets)."""

UNBATCHED_ARGUMENTS = ("txt_ids", "img_ids")
"""FLUX passes its RoPE position ids without a batch dimension (2-D): never expanded."""

TIMESTEP_SCALE = {"FluxTransformer2DModel": 1000.0}
"""Denoisers called with ``t / 1000`` (FLUX pipelines): factor back to the 0..1000 scale of ``s_t``."""

SECOND_PREDICTION_CFG = {"LTX2VideoTransformer3DModel": "audio_guidance_scale"}
"""Denoisers that return a second prediction with the same batch (LTX-2: video, then audio), and the pipeline
attribute holding the CFG scale the pipeline combines that prediction with (``LTX2Pipeline`` guides the audio with
its own ``audio_guidance_scale``). Both predictions get the perturbed-branch combination; any other denoiser whose
output holds a second prediction of the guidance batch is refused (its scale would be a guess)."""

EXTRA_CALL_GUIDANCE = {
    "do_spatio_temporal_guidance": "stg_scale=0 and audio_stg_scale=0",
    "do_modality_isolation_guidance": "modality_scale=1 and audio_modality_scale=1",
}
"""Pipeline flags of guidance that calls the denoiser again in the same step (``LTX2Pipeline``'s spatio-temporal
guidance and modality-isolation guidance), with the settings that turn each off: refused with that advice."""

GUIDANCE_ATTRIBUTE = "_diffaccel_softpag"
"""Where a denoiser keeps its :class:`GuidanceHooks` (in ``module.__dict__``, like diffaccel's other records)."""


def guidance_weight(
    scale: float, adaptive_scale: float, timestep: float | torch.Tensor | None
) -> float | torch.Tensor:
    """``s_t = max(0, scale - adaptive_scale·(1000 - t))`` (diffusers ``PAGMixin._get_pag_scale``).

    A tensor ``timestep`` (0-d, on the denoiser's device) gives a 0-d tensor weight, computed without reading it.
    """
    if adaptive_scale > 0 and scale > 0:
        if timestep is None:
            raise ConfigError("adaptive_scale > 0 needs the timestep of the denoiser call, which was not passed")
        if isinstance(timestep, torch.Tensor):
            t = timestep.float() if timestep.device.type == "mps" else timestep.double()  # MPS has no float64
            return (scale - adaptive_scale * (1000.0 - t)).clamp(min=0.0)
        return max(0.0, scale - adaptive_scale * (1000.0 - timestep))
    return scale


def combine_predictions(pred: torch.Tensor, *, cfg_scale: float | None, weight: float | torch.Tensor) -> torch.Tensor:
    """From the expanded prediction, the batch the pipeline expects.

    Args:
        pred: ``[uncond, cond, perturbed]`` (``cfg_scale`` given) or ``[cond, perturbed]``, equal chunks.
        cfg_scale: the pipeline's CFG scale, or ``None`` without CFG.
        weight: ``s_t`` (a float, or a 0-d tensor from :func:`guidance_weight`).

    Returns:
        ``[uncond, cond + (s_t / cfg)·(cond - perturbed)]`` with CFG, ``cond + s_t·(cond - perturbed)`` without.
    """
    if isinstance(weight, torch.Tensor):
        weight = weight.to(device=pred.device, dtype=pred.dtype)
    if cfg_scale is None:
        cond, perturbed = pred.chunk(2)
        return cond + weight * (cond - perturbed)
    uncond, cond, perturbed = pred.chunk(3)
    return torch.cat([uncond, cond + (weight / cfg_scale) * (cond - perturbed)])


def expand_batch(value: Any, batch: int, cond_start: int, name: str = "") -> Any:
    """Append rows ``cond_start:batch`` of every batched tensor in ``value`` (tensors, dicts, lists, tuples)."""
    if isinstance(value, torch.Tensor):
        if value.ndim == 0 or value.shape[0] != batch or (name in UNBATCHED_ARGUMENTS and value.ndim == 2):
            return value
        return torch.cat([value, value[cond_start:]])
    if isinstance(value, dict):
        return {k: expand_batch(v, batch, cond_start, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(expand_batch(v, batch, cond_start) for v in value)
    return value


class GuidanceHooks:
    """The two hooks on one denoiser: expand the batch before the forward, combine the predictions after it."""

    def __init__(
        self,
        model: torch.nn.Module,
        method: SoftPAGMethod,
        ctx: RunContext,
        pipe: Any | None,
        cfg_scale: float | None,
    ) -> None:
        self.model = model
        self.method = method
        self.ctx = ctx
        self.pipe = pipe
        self.cfg_scale = cfg_scale
        self.timestep_scale = TIMESTEP_SCALE.get(type(model).__name__, 1.0)
        self._signature = inspect.signature(model.forward)
        self._call: dict[str, Any] | None = None
        self._last_position: tuple[Any, Any] | None = None
        self._handles = [
            model.register_forward_pre_hook(self.before, with_kwargs=True),
            model.register_forward_hook(self.after, with_kwargs=True),
        ]

    def remove(self) -> None:
        """Remove both hooks and forget this guidance on the model (what ``diffaccel.remove`` calls)."""
        for handle in self._handles:
            handle.remove()
        self.method.perturbed_rows = None
        if self.model.__dict__.get(GUIDANCE_ATTRIBUTE) is self:
            del self.model.__dict__[GUIDANCE_ATTRIBUTE]

    def _cfg(self, batch: int) -> float | None:
        """The CFG scale when the incoming batch is ``[uncond, cond]``, else ``None``."""
        if self.pipe is None:
            cfg = self.cfg_scale
        elif getattr(self.pipe, "do_classifier_free_guidance", False):
            cfg = float(self.pipe.guidance_scale)
            if getattr(self.pipe, "guidance_rescale", 0.0):
                warn_once("softpag-rescale", "softpag: guidance_rescale is applied to the PAG-adjusted cond "
                          "prediction (diffusers' PAG pipelines rescale with the plain cond prediction)")
        else:
            cfg = None
        if cfg is not None and batch % 2:
            raise UnsupportedModelError(
                f"softpag: {type(self.pipe).__name__ if self.pipe is not None else 'the denoiser'} runs classifier-free "
                f"guidance but the denoiser batch ({batch}) is not [uncond, cond]: pipelines that call the denoiser "
                "separately for the negative prompt are not supported (use guidance_scale <= 1)"
            )
        return cfg

    def _check_one_call_per_step(self) -> None:
        """Refuse a second denoiser call within one scheduler step: the pipeline runs CFG as separate calls.

        Wan, Chroma, CogView4 and FLUX with ``true_cfg_scale > 1`` call the denoiser once for the prompt and once for
        the negative prompt and combine the two themselves; an even batch would pass the ``[uncond, cond]`` check and
        be split wrongly. A step is told by the scheduler's ``timesteps`` tensor (new at every ``set_timesteps``, so
        a new run is a new step) and its ``step_index`` (advanced by every ``scheduler.step``, Heun's second-order
        calls included).
        """
        scheduler = getattr(self.pipe, "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is None or not hasattr(scheduler, "step_index"):
            return
        position = (timesteps, scheduler.step_index)
        last, self._last_position = self._last_position, position
        if last is not None and last[0] is position[0] and last[1] == position[1]:
            raise UnsupportedModelError(
                f"softpag: {type(self.pipe).__name__} called {type(self.model).__name__} twice in one denoising step "
                f"(step_index {position[1]}): pipelines that call the denoiser separately for the negative prompt are "
                "not supported (use guidance_scale <= 1, or true_cfg_scale <= 1 for FLUX)"
            )

    def _check_no_extra_guidance_calls(self) -> None:
        """Refuse pipeline guidance that calls the denoiser again within the step (LTX-2's STG and modality
        isolation): those calls carry the cond batch only and would be split as ``[uncond, cond]``."""
        for flag, off in EXTRA_CALL_GUIDANCE.items():
            if getattr(self.pipe, flag, False):
                raise UnsupportedModelError(
                    f"softpag: {type(self.pipe).__name__}'s {flag.removeprefix('do_').replace('_', '-')} calls "
                    f"{type(self.model).__name__} again in every step, which softpag cannot tell from its own batch; "
                    f"pass {off} to use softpag"
                )

    def _second_cfg(self, cfg: float | None) -> float | None:
        """The CFG scale of the denoiser's second prediction (:data:`SECOND_PREDICTION_CFG`), or ``cfg``."""
        attribute = SECOND_PREDICTION_CFG.get(type(self.model).__name__)
        if cfg is None or self.pipe is None or attribute is None or getattr(self.pipe, attribute, None) is None:
            return cfg
        return _positive_cfg(float(getattr(self.pipe, attribute)), f"{type(self.pipe).__name__}.{attribute}")

    def before(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        self._check_no_extra_guidance_calls()
        self._check_one_call_per_step()
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        latent = next((bound[n] for n in LATENT_ARGUMENTS if isinstance(bound.get(n), torch.Tensor)), None)
        if latent is None:
            raise UnsupportedModelError(
                f"softpag: cannot find the latent batch among {type(module).__name__}'s inputs "
                f"(looked for {', '.join(LATENT_ARGUMENTS)})"
            )
        batch = int(latent.shape[0])
        cfg = self._cfg(batch)
        cond_start = batch // 2 if cfg is not None else 0
        timestep = bound.get("timestep")
        if isinstance(timestep, torch.Tensor):  # kept on its device: s_t is computed there (no host read)
            timestep = timestep.reshape(-1)[0] if timestep.numel() else None
        if cfg is not None:
            cfg = _positive_cfg(cfg, f"{type(self.pipe).__name__}.guidance_scale" if self.pipe is not None else "cfg_scale")
        self._call = {
            "cfg": cfg,
            "second_cfg": self._second_cfg(cfg),
            "expanded": batch + batch - cond_start,
            "timestep": None if timestep is None else timestep * self.timestep_scale,
        }
        self.method.perturbed_rows = slice(batch, batch + batch - cond_start)
        args = tuple(expand_batch(a, batch, cond_start) for a in args)
        kwargs = {k: expand_batch(v, batch, cond_start, k) for k, v in kwargs.items()}
        return args, kwargs

    def after(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        call, self._call = self._call, None
        self.method.perturbed_rows = None
        if call is None:
            return output
        config = self.method.config
        weight = guidance_weight(float(config.scale), float(config.adaptive_scale), call["timestep"])
        keys = _prediction_keys(output, call["expanded"])
        if len(keys) > 2 or (len(keys) == 2 and type(module).__name__ not in SECOND_PREDICTION_CFG):
            raise UnsupportedModelError(
                f"softpag: {type(module).__name__} returns {len(keys)} predictions of the guidance batch "
                f"({', '.join(map(str, keys))}); softpag combines the first one, and a second only for "
                f"{', '.join(SECOND_PREDICTION_CFG)}"
            )
        for key, cfg in zip(keys, (call["cfg"], call["second_cfg"])):
            pred = _get(output, key)
            output = _put(output, key, combine_predictions(pred, cfg_scale=cfg, weight=weight))
        return output


def _positive_cfg(value: float, name: str) -> float:
    """A CFG scale the perturbed term can be folded into (``cond + (s_t / cfg)·(cond - perturbed)``): > 0."""
    if not value > 0:
        raise ConfigError(f"softpag: {name} is {value!r} with classifier-free guidance on; softpag folds its term "
                          "into the cond prediction as (s_t / cfg)·(cond - perturbed), which needs a scale > 0")
    return value


def _prediction_keys(output: Any, batch: int) -> list[Any]:
    """Where the denoiser's predictions of the expanded batch are: ``None`` (a bare tensor), tuple indices or the
    output object's field names, in order. The first (``sample``) must be one."""
    if isinstance(output, torch.Tensor):
        return [None]
    if isinstance(output, tuple):
        items = list(enumerate(output))
    elif isinstance(getattr(output, "sample", None), torch.Tensor):
        items = list(output.items()) if hasattr(output, "items") else [("sample", output.sample)]
    else:
        raise UnsupportedModelError(
            f"softpag: cannot read the prediction from a denoiser output of type {type(output).__name__}"
        )
    if not items or not isinstance(items[0][1], torch.Tensor):
        raise UnsupportedModelError(f"softpag: the denoiser output {type(output).__name__} starts with no tensor")
    return [items[0][0]] + [k for k, v in items[1:] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == batch]


def _get(output: Any, key: Any) -> torch.Tensor:
    if key is None:
        return output
    if isinstance(output, tuple):
        return output[key]
    return getattr(output, key)


def _put(output: Any, key: Any, value: torch.Tensor) -> Any:
    if key is None:
        return value
    if isinstance(output, tuple):
        return (*output[:key], value, *output[key + 1:])
    setattr(output, key, value)
    return output


# ---------------------------------------------------------------------------------------------- install


DEFAULT_LAYERS = {"unet": ["mid_block"], "sd3": ["transformer_blocks.1"], "flux": ["transformer_blocks.1"]}
"""Layers perturbed when neither ``heads`` nor ``layers`` is given: diffusers' PAG pipeline defaults per family
(``"mid"`` for SD/SDXL, ``"blocks.1"`` for SD3), matched exactly: diffusers' regex ``blocks.1`` also selects
SD3 blocks 10-19 (huggingface/diffusers#13594). FLUX has no published PAG layer (diffusers' FLUX PAG, #11488 /
PR #11510, is unmerged): :data:`OUR_DEFAULTS` says what we chose and why. Video families have none."""

OUR_DEFAULTS = {
    "flux": "diffaccel's own default, not a published one: every head of transformer_blocks.1 (FLUX's second "
            "double-stream block, the MMDiT analogue of SD3's published PAG layer); choose heads with "
            "'diffaccel headhunt' or --set 'layers=[...]'",
}
"""Families whose :data:`DEFAULT_LAYERS` entry is our choice: the one line announced when it is used."""


def enable_softpag(
    pipe_or_model: Any, softpag: SoftPAGMethod | None = None, *, cfg_scale: float | None = None, **config: Any
) -> DiffAccelAttnProcessor:
    """Turn on SoftPAG guidance on a pipeline (or on a bare denoiser).

    Example::

        diffaccel.apply(pipe, "gna", kernel_size=(7, 7))          # optional: any attention method
        enable_softpag(pipe, heads={"transformer_blocks.7.attn": [0, 5]}, strength=0.5, scale=3.0)
        image = pipe(prompt).images[0]
        diffaccel.remove(pipe)                                      # stock processors, no guidance

    Args:
        pipe_or_model: a diffusers pipeline, or a transformer / UNet (then ``cfg_scale`` says whether its
            batch is ``[uncond, cond]``: ``None`` for no CFG).
        softpag: a configured :class:`~diffaccel.methods.softpag.SoftPAGMethod` (its inner method is installed),
            instead of ``**config``.
        cfg_scale: only for bare denoisers: the CFG scale the caller combines ``[uncond, cond]`` with.
        **config: :class:`~diffaccel.methods.softpag.SoftPAGConfig` fields: ``heads`` / ``layers``,
            ``strength``, ``scale``, ``adaptive_scale``, ``identity``, ``method``, ``method_config``.

    Without ``method``, the attention method already installed with :func:`diffaccel.apply` computes every
    branch (dense when none is installed). Calling it again replaces the previous SoftPAG settings.

    Returns:
        The processor installed on every attention module; ``processor.method`` is the SoftPAG method.
    """
    if softpag is not None:
        if config:
            raise TypeError("pass a SoftPAGMethod or SoftPAG parameters, not both")
        cfg = softpag.config
    else:
        cfg = build_config(SoftPAGConfig, config, method="softpag")  # type: ignore[assignment]
    models = hooks.denoisers_of(pipe_or_model)
    pipe = None if isinstance(pipe_or_model, torch.nn.Module) else pipe_or_model
    if pipe is not None and cfg_scale is not None:
        raise ConfigError("cfg_scale is for bare denoisers; a pipeline's guidance_scale is read at call time")
    if cfg_scale is not None and (not isinstance(cfg_scale, (int, float)) or cfg_scale <= 0):
        raise ConfigError(f"cfg_scale must be a number > 0 or None, got {cfg_scale!r}")

    selection = cfg.selection() or default_selection(models)
    selection = resolve_selection(models, selection)  # unsupported models and bad names fail before any change

    existing = hooks.installed_processor(models[0])
    if softpag is not None:
        processor = hooks.apply(pipe_or_model, softpag.inner)
        method = softpag
    else:
        if cfg.method is None and existing is not None and all(hooks.installed_processor(m) is existing for m in models):
            processor = existing
            inner = processor.method.inner if isinstance(processor.method, SoftPAGMethod) else processor.method
        else:
            processor = hooks.apply(pipe_or_model, cfg.method or "dense", **cfg.method_config)
            inner = processor.method
        method = SoftPAGMethod(cfg, inner=inner)
    method.set_heads(selection)

    for model in models:
        _remove_guidance(model)
    processor.method = method
    for model in models:
        guidance = GuidanceHooks(model, method, processor.context, pipe, cfg_scale)
        model.__dict__[GUIDANCE_ATTRIBUTE] = guidance
        installation = model.__dict__.get("_diffaccel_installation")
        if installation is not None:  # diffaccel.remove() removes the guidance with the processors
            installation.extra_hooks.append(guidance)
    return processor


register_denoiser_wrapper(SoftPAGMethod, enable_softpag)  # diffaccel.apply(pipe, "softpag", ...) lands here


def disable_softpag(pipe_or_model: Any) -> None:
    """Remove the guidance hooks and put the inner method back; other diffaccel changes stay (no-op if none)."""
    for model in hooks.denoisers_of(pipe_or_model):
        _remove_guidance(model)
        processor = hooks.installed_processor(model)
        if processor is not None and isinstance(processor.method, SoftPAGMethod):
            processor.method = processor.method.inner


def _remove_guidance(model: torch.nn.Module) -> None:
    guidance: GuidanceHooks | None = model.__dict__.get(GUIDANCE_ATTRIBUTE)
    if guidance is None:
        return
    guidance.remove()
    installation = model.__dict__.get("_diffaccel_installation")
    if installation is not None:
        installation.extra_hooks[:] = [h for h in installation.extra_hooks if h is not guidance]


def default_selection(models: list[torch.nn.Module]) -> dict[str, None]:
    """The family's :data:`DEFAULT_LAYERS` (every head); a :class:`ConfigError` for families without one."""
    family = hooks.family_of(models[0]).name
    if family not in DEFAULT_LAYERS:
        raise ConfigError(
            f"softpag needs heads={{layer: [head, ...]}} or layers=[...] for {family} models (no published default "
            f"layer), e.g. diffaccel generate --method softpag --set 'layers=[\"{_first_module(models)}\"]'; "
            f"self-attention modules: {_module_list(models)}"
        )
    if family in OUR_DEFAULTS:
        warn_once(f"softpag-default-{family}", f"softpag on {family}: {OUR_DEFAULTS[family]}")
    return {name: None for name in DEFAULT_LAYERS[family]}


def _first_module(models: list[torch.nn.Module]) -> str:
    names = sorted(n for m in models for n in perturbable_modules(m))
    return names[0] if names else "MODULE"


def _module_list(models: list[torch.nn.Module], limit: int = 8) -> str:
    names = sorted(n for m in models for n in perturbable_modules(m))
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def perturbable_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Self/joint attention modules of ``model`` by qualified name (cross-attention excluded)."""
    return {
        name: module
        for name, module in hooks.attention_modules(model).items()
        if not getattr(module, "is_cross_attention", False)
    }


def resolve_selection(
    models: list[torch.nn.Module], selection: dict[str, tuple[int, ...] | None]
) -> dict[str, tuple[int, ...]]:
    """Exact ``{attention module name: heads}`` for a selection keyed by module or parent-module names.

    Raises:
        ConfigError: a name that matches no self-attention module, names a cross-attention module, or a head
            index beyond the module's heads.
    """
    for model in models:
        hooks.family_of(model)  # an unsupported denoiser is reported as such
    resolved: dict[str, tuple[int, ...]] = {}
    for key, heads in selection.items():
        found = False
        for model in models:
            every = hooks.attention_modules(model)
            if key in every and getattr(every[key], "is_cross_attention", False):
                raise ConfigError(f"softpag: {key!r} is a cross-attention module; PAG perturbs self-attention only")
            for name, module in perturbable_modules(model).items():
                if not layer_or_parent_matches(key, name):
                    continue
                found = True
                num_heads = int(module.heads)
                chosen = tuple(range(num_heads)) if heads is None else heads
                bad = [h for h in chosen if h >= num_heads]
                if bad:
                    raise ConfigError(
                        f"softpag: head(s) {bad} selected in {name!r}, which has {num_heads} heads (0..{num_heads - 1})"
                    )
                resolved[name] = tuple(sorted(set(resolved.get(name, ())) | set(chosen)))
        if not found:
            raise ConfigError(
                f"softpag: layer {key!r} matches no self-attention module; modules: {_module_list(models)}"
            )
    return resolved
