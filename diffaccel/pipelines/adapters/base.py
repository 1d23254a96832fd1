"""The adapter interface: model code around the attention call, one adapter per stock diffusers processor.

Two kinds (docs/adapters.md has the decision and its measurements):

- a *routed* adapter (:class:`~diffaccel.pipelines.adapters.dispatch.RoutedAdapter`, ten of the thirteen families)
  runs the stock processor unchanged and supplies only the :class:`TokenLayout` of its ``dispatch_attention_fn``
  call, which goes to the method;
- an *explicit* adapter (SD3, CogVideoX, UNet, whose stock processors call ``F.scaled_dot_product_attention``
  directly) reproduces its stock processor exactly, split at the attention call: :meth:`Adapter.project` computes
  q, k, v (projections, QK-norm, RoPE, text/image concatenation) and the layout; :meth:`Adapter.finish` applies the
  output projections and splits the streams.

Either way, with the ``dense`` method the result equals the stock processor's. Adapters are registered by the class
name of the stock processor they serve. A denoiser family (model class) registers how its forward inputs give the
latent grid and the text length (:class:`ModelFamily`).
"""

from __future__ import annotations

import inspect
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from diffaccel.context import RunContext
from diffaccel.errors import LayoutError, UnsupportedModelError
from diffaccel.layout import Grid, TokenLayout, downsampled_level, square_grid


@dataclass
class AttentionCall:
    """The arguments a diffusers attention module passed to its processor."""

    hidden_states: torch.Tensor
    encoder_hidden_states: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    image_rotary_emb: Any = None
    temb: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Projected:
    """What :meth:`Adapter.project` hands the method, plus what :meth:`Adapter.finish` needs back."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    layout: TokenLayout
    attn_mask: torch.Tensor | None = None
    scale: float | None = None
    carry: Any = None
    """The adapter's own record of what :meth:`Adapter.finish` needs (a small dataclass per adapter)."""


class Adapter:
    """Base class of adapters. Subclasses set ``family`` and ``stock_processors`` and implement both halves."""

    family: ClassVar[str] = ""
    stock_processors: ClassVar[tuple[str, ...]] = ()

    def project(self, attn: torch.nn.Module, call: AttentionCall, ctx: RunContext) -> Projected:
        raise NotImplementedError

    def finish(self, attn: torch.nn.Module, out: torch.Tensor, projected: Projected) -> Any:
        raise NotImplementedError

    def __reduce__(self) -> tuple[Any, ...]:
        # adapters are registered singletons (cached on modules): a pickled or deep-copied model refers to the
        # registered instance, never a copy of its per-run bookkeeping (weak references cannot be pickled)
        return registered_adapter, (type(self).__module__, type(self).__qualname__)


@dataclass(frozen=True)
class ModelFamily:
    """A denoiser class whose forward inputs tell the latent token grid and the text length.

    ``read_inputs(model, args)`` receives the denoiser and its forward arguments bound by name and returns
    ``(grid, text_len)``; ``text_len`` is ``None`` for models without joint text tokens.
    """

    name: str
    model_classes: tuple[str, ...]
    read_inputs: Callable[[torch.nn.Module, dict[str, Any]], tuple[Grid | None, int | None]]
    description: str = ""
    text_only_modules: tuple[str, ...] = ()
    """Qualified names of submodules whose attention sees text tokens only (no grid: kept dense)."""
    hierarchical: bool = False
    """The denoiser runs attention at several resolutions (a UNet): layouts say so (``TokenLayout.hierarchical``)."""
    begin_forward: Callable[[torch.nn.Module, dict[str, Any], RunContext], None] | None = None
    """Called by the run hook at every denoiser forward with the bound arguments, for state the family's adapters
    need that only the forward inputs tell (HunyuanVideo's prompt lengths); the family's module keeps it, keyed by
    the run context, so the shared :class:`RunContext` carries no family bookkeeping."""


_ADAPTERS: dict[str, Adapter] = {}
_WRAPPERS: dict[str, Callable[[Any, Any], Any]] = {}
_FAMILIES: dict[str, ModelFamily] = {}
_GENERIC_INFERENCE: list[tuple[int, Callable[[torch.nn.Module, AttentionCall], str | None]]] = []


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: route every stock processor named in ``cls.stock_processors`` to an instance of ``cls``."""
    instance = cls()
    for name in cls.stock_processors:
        _ADAPTERS[name] = instance
    return cls


def registered_adapter(module: str, qualname: str) -> Adapter:
    """The registered instance of the adapter class ``module.qualname`` (how pickled models refer to adapters)."""
    _load_builtin_adapters()
    import importlib

    importlib.import_module(module)
    for adapter in _ADAPTERS.values():
        if type(adapter).__module__ == module and type(adapter).__qualname__ == qualname:
            return adapter
    raise UnsupportedModelError(f"adapter {module}.{qualname} is not registered in this process")

def register_processor_wrapper(stock_processor: str, wrap: Callable[[Any, Any], Any]) -> None:
    """Register how to keep a stock processor that holds weights (an IP-adapter processor) in the module tree
    while diffaccel runs: ``wrap(original, diffaccel_processor)`` returns a processor module that owns the same
    weight modules (same state-dict keys) and calls ``diffaccel_processor``; :func:`diffaccel.apply` and the swap
    check install it in place of ``original``, which stays the recorded stock processor."""
    _WRAPPERS[stock_processor] = wrap


def processor_wrapper(stock_processor: str) -> Callable[[Any, Any], Any] | None:
    """The wrapper registered for ``stock_processor`` (class name), else ``None``."""
    _load_builtin_adapters()
    return _WRAPPERS.get(stock_processor)


def register_family(family: ModelFamily) -> ModelFamily:
    for cls_name in family.model_classes:
        _FAMILIES[cls_name] = family
    return family


def register_processor_inference(priority: int = 0):
    """Decorator registering a rule ``fn(attn, call) -> processor name | None`` for generic ``Attention`` modules.

    Used only when a processor was installed with a bare ``set_attn_processor`` (so the stock one is gone);
    :func:`diffaccel.apply` records the stock processor and needs no guess. Rules run by descending priority;
    the first that answers wins.
    """

    def decorate(fn: Callable[[torch.nn.Module, AttentionCall], str | None]):
        _GENERIC_INFERENCE.append((priority, fn))
        _GENERIC_INFERENCE.sort(key=lambda item: -item[0])
        return fn

    return decorate


def supported_processors() -> list[str]:
    _load_builtin_adapters()
    return sorted(_ADAPTERS)


def supported_families() -> dict[str, ModelFamily]:
    _load_builtin_adapters()
    return dict(_FAMILIES)


def family_of(model: torch.nn.Module) -> ModelFamily:
    """The registered family of a denoiser, by class name (walking base classes); a clear error otherwise."""
    _load_builtin_adapters()
    for cls in type(model).__mro__:
        if cls.__name__ in _FAMILIES:
            return _FAMILIES[cls.__name__]
    names = ", ".join(sorted(f"{c} ({f.name})" for c, f in _FAMILIES.items()))
    raise UnsupportedModelError(
        f"model class {type(model).__name__} has no diffaccel adapter; supported denoisers: {names}"
    )


def stock_processor_name(attn: torch.nn.Module, call: AttentionCall | None = None) -> str:
    """Class name of the processor that diffusers would run on ``attn``."""
    stock = getattr(attn, "_diffaccel_stock_processor", None)
    if stock is not None:
        return type(stock).__name__
    default_cls = getattr(attn, "_default_processor_cls", None)
    if default_cls is not None:
        return default_cls.__name__
    _load_builtin_adapters()
    for _, rule in _GENERIC_INFERENCE:
        name = rule(attn, call)
        if name is not None:
            return name
    raise UnsupportedModelError(
        f"cannot tell which diffusers processor {type(attn).__name__} normally runs; install diffaccel with "
        "diffaccel.apply(pipe_or_model, method), which records it"
    )


def adapter_for(attn: torch.nn.Module, call: AttentionCall | None = None) -> Adapter:
    """The adapter that reproduces ``attn``'s stock processor (cached on the module)."""
    cached = attn.__dict__.get("_diffaccel_adapter")
    if cached is not None:
        return cached
    _load_builtin_adapters()
    name = stock_processor_name(attn, call)
    if name not in _ADAPTERS:
        raise UnsupportedModelError(
            f"attention processor {name} (module {type(attn).__name__}) has no diffaccel adapter; supported "
            f"processors: {', '.join(sorted(_ADAPTERS))}"
        )
    adapter = _ADAPTERS[name]
    attn.__dict__["_diffaccel_adapter"] = adapter
    return adapter


def resolve_grid(ctx: RunContext, num_visual: int, *, allow_downsample: bool = False, video: bool = False) -> Grid:
    """The visual grid of a call with ``num_visual`` visual tokens.

    Read from the run context when :func:`diffaccel.apply` installed its hook; UNet levels take the latent
    grid halved (``allow_downsample``). Without a context a square image grid is inferred; video grids cannot
    be inferred and raise.
    """
    return resolve_level(ctx, num_visual, allow_downsample=allow_downsample, video=video)[0]


def resolve_level(
    ctx: RunContext, num_visual: int, *, allow_downsample: bool = False, video: bool = False
) -> tuple[Grid, int]:
    """:func:`resolve_grid` and the level's factor versus the latent grid (1 unless a UNet level is downsampled)."""
    if ctx.grid is not None:
        if math.prod(ctx.grid) == num_visual:
            return ctx.grid, 1
        if allow_downsample:
            level = downsampled_level(ctx.grid, num_visual)
            if level is not None:
                return level
        raise LayoutError(
            f"the call has {num_visual} visual tokens but the latent grid {ctx.grid} holds {math.prod(ctx.grid)}"
        )
    if ctx.denoiser_calls > 0:  # the hook ran but the denoiser's inputs gave no grid: never guess one
        raise LayoutError(
            f"the denoiser's inputs of this call give no visual grid for its {num_visual} visual tokens (for "
            "example FLUX img_ids that are not one row-major image grid, as with Kontext reference latents)"
        )
    if video:
        raise LayoutError(
            "the video grid (frames, height, width) cannot be inferred from a token count; install the processor "
            "with diffaccel.apply(pipe, method), which reads it from the latent shape"
        )
    return square_grid(num_visual), 1


def grid_or_unknown(
    ctx: RunContext, num_visual: int, *, allow_downsample: bool = False, video: bool = False
) -> tuple[Grid | None, int, str | None]:
    """:func:`resolve_level` that never refuses a call: ``(grid, factor, None)``, or ``(None, 1, reason)`` when the
    grid cannot be derived. Adapters put the reason in :attr:`TokenLayout.unknown`, so dense attention still runs
    exactly as the stock processor would, and methods that need a grid fall back (or raise in strict mode)."""
    try:
        grid, factor = resolve_level(ctx, num_visual, allow_downsample=allow_downsample, video=video)
    except LayoutError as exc:
        return None, 1, str(exc)
    return grid, factor, None


def patchified_video_grid(
    latents: torch.Tensor, patch: tuple[int, int, int], *, frames_dim: int, model: str
) -> tuple[int, int, int]:
    """Token grid ``(F, H, W)`` of a 5-D video latent after ``patch = (p_t, p_h, p_w)`` patchifying.

    ``frames_dim`` is 2 for ``(B, C, F, H, W)`` latents (Wan, HunyuanVideo) and 1 for ``(B, F, C, H, W)``
    (CogVideoX); height and width are always the last two dimensions.
    """
    if latents.ndim != 5:
        raise LayoutError(
            f"{model} takes a 5-D video latent hidden_states, got shape {tuple(latents.shape)}"
        )
    sizes = (latents.shape[frames_dim], latents.shape[-2], latents.shape[-1])
    return tuple(int(s) // int(p) for s, p in zip(sizes, patch))  # type: ignore[return-value]


_TEXT_ONLY = "_diffaccel_text_only"


def mark_text_only(module: torch.nn.Module) -> None:
    """Record that every attention module inside ``module`` attends over text tokens only.

    Some denoisers run attention on the text stream alone before the joint blocks (HunyuanVideo's token
    refiner runs ``AttnProcessor2_0`` on the prompt tokens); such calls have no visual grid. A family names
    these submodules in ``ModelFamily.text_only_modules``, :func:`diffaccel.apply` marks them, and adapters that
    otherwise resolve a grid for every self-attention call keep them grid-less, hence dense.
    """
    for sub in module.modules():
        if hasattr(sub, "set_processor") and hasattr(sub, "processor"):
            sub.__dict__[_TEXT_ONLY] = True


def is_text_only(attn: torch.nn.Module) -> bool:
    """True when :func:`mark_text_only` marked ``attn`` as attending over text tokens only."""
    return bool(attn.__dict__.get(_TEXT_ONLY, False))


_HIERARCHICAL = "_diffaccel_hierarchical"


def mark_hierarchical(attn: torch.nn.Module, hierarchical: bool) -> None:
    """Record whether ``attn`` belongs to a multi-resolution denoiser (:attr:`ModelFamily.hierarchical`)."""
    attn.__dict__[_HIERARCHICAL] = bool(hierarchical)


def is_hierarchical(attn: torch.nn.Module, default: bool) -> bool:
    """What :func:`mark_hierarchical` recorded for ``attn``; ``default`` when nothing was (a bare install)."""
    return bool(attn.__dict__.get(_HIERARCHICAL, default))


class TensorMemo:
    """Values computed from a tensor's contents, remembered per tensor object so later calls read nothing.

    Reading a tensor's values on the host (``.tolist()``, ``torch.unique``, ``bool(...)``) synchronises with the
    device. Inputs that a pipeline builds once per run and passes to every denoiser call (FLUX's ``img_ids``,
    HunyuanVideo's prompt mask, LTX's ``video_coords``) need that read only once: entries are keyed by the object
    (a weak reference, so a freed tensor whose memory is reused never matches), its ``data_ptr``, shape and
    in-place version counter. A few entries, because classifier-free guidance passes two objects per step.
    """

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._entries: list[tuple[weakref.ref, tuple[Any, ...], Any]] = []

    @staticmethod
    def _key(tensor: torch.Tensor) -> tuple[Any, ...]:
        try:
            version = tensor._version
        except RuntimeError:  # inference tensors have no version counter (and cannot change outside inference mode)
            version = None
        return (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype, tensor.device, version)

    def get(self, tensor: torch.Tensor, compute: Callable[[torch.Tensor], Any]) -> Any:
        """``compute(tensor)``, computed at most once per tensor object and contents version."""
        key = self._key(tensor)
        for ref, entry_key, value in self._entries:
            if ref() is tensor and entry_key == key:
                return value
        value = compute(tensor)
        live = [e for e in self._entries if e[0]() is not None and e[0]() is not tensor]
        self._entries = live[-(self.size - 1):] + [(weakref.ref(tensor), key, value)]
        return value

    def clear(self) -> None:
        self._entries.clear()


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(batch, tokens, heads * head_dim)`` to ``(batch, heads, tokens, head_dim)``."""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``(batch, heads, tokens, head_dim)`` to ``(batch, tokens, heads * head_dim)``."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def bind_forward_args(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The denoiser's forward arguments by name (positional ones included)."""
    sig = inspect.signature(model.forward)
    bound = sig.bind_partial(*args, **kwargs)
    return dict(bound.arguments)


_BUILTINS_LOADED = False


def _load_builtin_adapters() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        import diffaccel.pipelines.adapters.builtin  # noqa: F401
