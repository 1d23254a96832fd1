"""The attention-method interface, the registry, and validation helpers shared by every method.

A method is a function of ``(q, k, v, layout, ctx)`` with tensors shaped ``(batch, heads, tokens, head_dim)``
as in :func:`torch.nn.functional.scaled_dot_product_attention`. It holds the paper's algorithm and nothing
model-specific: the adapter computed q, k, v and the layout, and applies the output projection afterwards.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from diffaccel.context import RunContext
from diffaccel.errors import ConfigError, UnknownMethodError
from diffaccel.layout import TokenLayout
from diffaccel.sparse.checks import BACKENDS as _KERNEL_BACKENDS
from diffaccel.sparse.checks import check_backend as _check_backend
from diffaccel.warn import warn_once


@dataclass
class MethodConfig:
    """Base of every method's configuration. Subclasses add fields with the paper's defaults and validate them."""

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the field, the value and what is allowed."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@runtime_checkable
class AttentionMethod(Protocol):
    """What the processor calls in place of SDPA."""

    name: ClassVar[str]
    config: MethodConfig

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: TokenLayout,
        ctx: RunContext,
        *,
        attn_mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Attention output, shaped like ``q`` with ``v``'s head_dim, in ``q``'s dtype."""
        ...


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Dense attention exactly as diffusers' stock processors call it (default SDPA scale when ``scale`` is None)."""
    if scale is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=0.0, is_causal=False)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=0.0, is_causal=False, scale=scale)


@dataclass
class CallCounts:
    """How many self/joint calls with a visual grid ran the method's own attention, and how many ran dense instead
    (dense steps, a layer not selected, a mask the method cannot take...). ``diffaccel generate`` reports a run
    whose ``method`` count stays 0 as "fell back to dense" rather than as a result."""

    method: int = 0
    dense: int = 0

    def reset(self) -> None:
        self.method = self.dense = 0


class MethodBase:
    """Convenience base: stores a validated config and keeps cross-attention and grid-less calls dense.

    Subclasses implement :meth:`attend` for self/joint attention with a known visual grid; where it runs dense
    instead, it returns :meth:`dense_fallback` (counted in :attr:`call_counts`).
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    context_parallel: ClassVar[frozenset[str]] = frozenset()
    """The diffusers context-parallel modes this method runs exactly under (``"ulysses"``: the processor gives it
    the whole sequence for a slice of the heads, ``ctx.heads`` says which; ``"ring"``: it merges partial results
    over key shards by LSE). Empty: under context parallelism the processor raises instead of running it."""

    needs_grid: ClassVar[bool] = True
    """The method's own attention needs the visual token grid (every sparse method); ``False`` for methods that run
    the same on any layout (dense). A call whose grid is unknown (:attr:`TokenLayout.unknown`) then runs dense
    through :meth:`unknown_grid_fallback`, or raises when diffaccel was applied with ``strict=True``."""

    def __init__(self, config: MethodConfig | None = None, **overrides: Any) -> None:
        if config is None:
            config = build_config(self.config_class, overrides, method=self.name)
        elif overrides:
            config = dataclasses.replace(config, **overrides)
            config.validate()
        else:
            config.validate()
        self.config = config

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: TokenLayout,
        ctx: RunContext,
        *,
        attn_mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        if layout.is_cross:
            return sdpa(q, k, v, attn_mask=attn_mask, scale=scale)
        if not layout.has_grid:
            if layout.grid_unknown and self.needs_grid:
                return self.unknown_grid_fallback(q, k, v, layout, ctx, attn_mask=attn_mask, scale=scale)
            return sdpa(q, k, v, attn_mask=attn_mask, scale=scale)
        self._fell_back = False
        out = self.attend(q, k, v, layout, ctx, attn_mask=attn_mask, scale=scale)
        counts = self.call_counts
        if self._fell_back:
            counts.dense += 1
        else:
            counts.method += 1
        return out

    @property
    def call_counts(self) -> CallCounts:
        """Calls of this instance that ran the method / ran dense in its place (self/joint calls with a grid)."""
        counts = self.__dict__.get("_calls")
        if counts is None:
            counts = self.__dict__["_calls"] = CallCounts()
        return counts

    def dense_fallback(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        attn_mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Dense attention where :meth:`attend` does not run the method on this call (counted in :attr:`call_counts`)."""
        self._fell_back = True
        return sdpa(q, k, v, attn_mask=attn_mask, scale=scale)

    def unknown_grid_fallback(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: TokenLayout,
        ctx: RunContext,
        *,
        attn_mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Dense attention for a self/joint call whose grid could not be derived: exactly what the stock processor
        computes, counted in :attr:`call_counts` as a fallback, and said once per layer (never silently)."""
        warn_once(
            f"grid-unknown:{self.name}:{ctx.layer}",
            f"diffaccel: {self.name} needs the token grid, but it is unknown for {ctx.layer or 'an attention layer'} "
            f"({layout.unknown}); such calls of this layer run dense attention, exactly as stock. "
            "diffaccel.apply(..., strict=True) raises instead.",
        )
        out = self.dense_fallback(q, k, v, attn_mask=attn_mask, scale=scale)
        self.call_counts.dense += 1
        return out

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: TokenLayout,
        ctx: RunContext,
        *,
        attn_mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def kept_blocks(self, layer: str) -> torch.Tensor | None:
        """The key blocks kept at the most recent call of attention module ``layer`` (``ctx.layer``).

        A bool tensor ``(heads or 1, q_blocks, kv_blocks)`` in the kernel's block order, on any device, for a
        method that keeps a block mask; ``None`` for a method that keeps none (dense, linear, token merging), or
        for a layer the method has not run sparse on. Read by the demo's mask panel (issue 15); methods with block
        masks override it.
        """
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


# ----------------------------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type] = {}


def register_method(cls: type) -> type:
    """Class decorator: make a method available by ``cls.name`` to :func:`get_method` and the CLI."""
    name = getattr(cls, "name", "")
    if not name:
        raise TypeError(f"{cls.__name__} needs a non-empty class attribute 'name' to be registered")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise TypeError(f"method name {name!r} is already registered by {_REGISTRY[name].__name__}")
    _REGISTRY[name] = cls
    return cls


def list_methods() -> list[str]:
    """Names of the registered (implemented) methods, sorted."""
    _load_builtin_methods()
    return sorted(_REGISTRY)


def method_class(name: str) -> type:
    _load_builtin_methods()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise UnknownMethodError(
            f"unknown method {name!r}; registered methods: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name]


def get_method(name: str, **config: Any) -> AttentionMethod:
    """Instantiate the registered method ``name`` with its config fields given as keywords (validated)."""
    return method_class(name)(**config)


def method_parameters(name: str) -> list[tuple[str, str, Any, str]]:
    """``(field, type, default, help)`` for each config field of method ``name`` (for ``diffaccel methods``)."""
    cls = method_class(name)
    rows = []
    for f in fields(cls.config_class):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        rows.append((f.name, str(f.type), default, f.metadata.get("help", "")))
    return rows


def build_config(config_class: type[MethodConfig], values: dict[str, Any], *, method: str = "") -> MethodConfig:
    """Build and validate ``config_class`` from keywords; an unknown keyword names the allowed ones."""
    allowed = {f.name for f in fields(config_class)}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown parameter(s) {', '.join(unknown)} for method {method or config_class.__name__!r}; "
            f"allowed: {', '.join(sorted(allowed)) or '(none)'}"
        )
    config = config_class(**values)
    config.validate()
    return config


_BUILTINS_LOADED = False


def _load_builtin_methods() -> None:
    """Import diffaccel.methods so every built-in method registers itself."""
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        import diffaccel.methods  # noqa: F401


# ----------------------------------------------------------------------------------------------- validation


def check_density(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (0.0 < float(value) <= 1.0):
        raise ConfigError(f"{name} must be in (0, 1], got {value!r}")


def check_positive_int(name: str, value: Any, *, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_backend(value: str) -> None:
    """``backend`` must be one of :data:`BACKENDS` (the one checker of :mod:`diffaccel.sparse.checks`)."""
    _check_backend(value)


BACKENDS = _KERNEL_BACKENDS
"""Kernel backends a method may be asked for (defined once, in :mod:`diffaccel.kernels.dispatch`): ``auto`` picks
Triton on CUDA (or under TRITON_INTERPRET=1) and the PyTorch reference otherwise (with a one-time warning);
``reference`` forces the plain PyTorch path."""


def in_dense_steps(ctx: RunContext, dense_steps: int) -> bool:
    """True during the first ``dense_steps`` denoising steps, which methods with a dense warm-up keep exact."""
    return ctx.step < dense_steps


def config_help(text: str) -> dict[str, str]:
    """Field metadata carrying the help text that ``diffaccel methods`` prints."""
    return {"help": text}


def options_without_effect(config: MethodConfig, active: str, scopes: tuple[str, ...]) -> list[str]:
    """``name=value`` of the fields the user changed from their default that only act in another scope.

    A field belongs to scope ``s`` when its help text starts with ``"s:"`` (e.g. agent's ``"agentsd: ..."`` and
    ``"pooled: ..."``); with ``active`` the scope this call runs in, a changed field of another scope is a setting
    with no effect here, which the method announces once (nothing a user asked for is dropped silently).
    """
    unused = []
    for f in fields(config):
        help_text = f.metadata.get("help", "")
        scope = help_text.split(":", 1)[0] if ":" in help_text else ""
        if scope not in scopes or scope == active:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        value = getattr(config, f.name)
        if value != default:
            unused.append(f"{f.name}={value!r}")
    return unused
