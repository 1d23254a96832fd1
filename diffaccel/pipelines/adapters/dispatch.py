"""Adapters that run the stock diffusers processor and intercept only its attention call (docs/adapters.md).

The processors of the recent diffusers families (FLUX.2, Qwen-Image, HunyuanVideo-1.5, LTX-2, Z-Image) compute
projections, QK-norm and RoPE, then call ``dispatch_attention_fn(q, k, v, attn_mask=..., backend=
self._attention_backend, ...)`` and finish with the output projections. A :class:`RoutedAdapter` runs that stock
``__call__`` unchanged except for one name: it calls a copy of the processor's function whose globals map
``dispatch_attention_fn`` to :func:`routed_dispatch`, with a ``self`` whose ``_attention_backend`` is the
:class:`Route` of this one call. :func:`routed_dispatch` sends a call that carries a route to the method, with the
layout the adapter builds for it, and any other call to diffusers' own dispatcher unchanged.

So the adapter holds only the layout (text placement, grid, text masks); diffusers' module globals, its attention
backend registry and every processor object stay untouched: nothing outlives :func:`diffaccel.remove`, modules
diffaccel did not touch run exactly as before, and the route travels as an argument (no thread-local or global
"current call"), so concurrent and re-entrant calls cannot see each other's routes. A processor that calls the
dispatcher several times in one call (an IP-adapter branch) hands the adapter a call ``index`` per dispatch.
"""

from __future__ import annotations

import types
from typing import Any, Callable, ClassVar

import torch
from diffusers.models import attention_dispatch as _diffusers_dispatch

from diffaccel.context import RunContext
from diffaccel.errors import LayoutError, UnsupportedModelError
from diffaccel.layout import TokenLayout
from diffaccel.pipelines.adapters.base import Adapter, AttentionCall, TensorMemo, stock_processor_name
from diffaccel.warn import warn_once

_STOCK_DISPATCH = _diffusers_dispatch.dispatch_attention_fn


class Route:
    """One processor call's way to the method: what :func:`routed_dispatch` needs besides q, k, v."""

    def __init__(self, adapter: "RoutedAdapter", attn: torch.nn.Module, call: AttentionCall, ctx: RunContext,
                 method: Callable[..., torch.Tensor], backend: Any, *, strict: bool = False,
                 parallel: Any = None) -> None:
        self.adapter = adapter
        self.attn = attn
        self.call = call
        self.ctx = ctx
        self.method = method
        self.backend = backend
        """The attention backend the stock processor had (``set_attention_backend``); used for calls kept stock."""
        self.index = 0
        self.strict = strict
        """Refuse a call whose grid is unknown (``strict=True`` with a method that needs the grid)."""
        self.parallel = parallel
        """diffusers' ``ParallelConfig`` when the model runs context parallelism (the processor's), else ``None``."""
        self._shard_ctx: RunContext | None = None

    def layout_context(self) -> RunContext:
        """The run context the adapter's layout sees: under context parallelism a copy describing this rank's shard
        (:func:`~diffaccel.pipelines.parallel.shard_context`), else the run context itself."""
        if self.parallel is None:
            return self.ctx
        if self._shard_ctx is None:
            from diffaccel.pipelines import parallel

            self._shard_ctx = parallel.shard_context(self.ctx, parallel.world_size(self.parallel), self.who())
        return self._shard_ctx

    def who(self) -> str:
        name = getattr(self.method, "name", None) or getattr(self.adapter, "family", "?")
        return f"method {name!r} at layer {self.ctx.layer}"

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
               dropout_p: float, is_causal: bool, scale: float | None, enable_gqa: bool,
               attention_kwargs: dict[str, Any] | None, parallel_config: Any) -> torch.Tensor:
        """The method's attention on diffusers' ``(batch, tokens, heads, head_dim)`` tensors, in the same layout.

        A call the stock processor dispatches with ``parallel_config`` (context parallelism: the tokens are this
        rank's shard) runs :func:`~diffaccel.pipelines.parallel.attend_context_parallel` around the method."""
        index = self.index
        self.index += 1
        unsupported = _unsupported_features(query, key, dropout_p, is_causal, enable_gqa, attention_kwargs)
        if unsupported:
            warn_once(
                f"routed-stock:{type(self.attn).__name__}:{unsupported}",
                f"diffaccel: a {type(self.attn).__name__} attention call uses {unsupported}, which methods do not "
                "take; this call runs diffusers' own attention (dense)",
            )
            return _STOCK_DISPATCH(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                   scale=scale, enable_gqa=enable_gqa, attention_kwargs=attention_kwargs,
                                   backend=self.backend, parallel_config=parallel_config)
        layout, mask = self.adapter.layout(self.attn, self.call, self.layout_context(), query, key, attn_mask, index)
        if layout is None:  # the adapter keeps this call stock (an extra attention the method never sees)
            return _STOCK_DISPATCH(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                   scale=scale, enable_gqa=enable_gqa, attention_kwargs=attention_kwargs,
                                   backend=self.backend, parallel_config=parallel_config)
        if self.strict and layout.grid_unknown:
            raise LayoutError(
                f"{self.ctx.layer}: method {getattr(self.method, 'name', '?')!r} needs the token grid, which is "
                f"unknown for this call ({layout.unknown}); strict=True refuses the call (without strict it runs "
                "dense, as stock)"
            )
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        if self.parallel is not None:
            from diffaccel.pipelines import parallel

            out = parallel.attend_context_parallel(
                self.method, q, k, v, layout, self.ctx, self.parallel, who=self.who(), attn_mask=mask, scale=scale,
                sharded=parallel_config is not None,
            )
        else:
            out = self.method(q, k, v, layout, self.ctx, attn_mask=mask, scale=scale)
        return out.transpose(1, 2)


def _unsupported_features(query: torch.Tensor, key: torch.Tensor, dropout_p: float, is_causal: bool,
                          enable_gqa: bool, attention_kwargs: dict[str, Any] | None) -> str:
    if dropout_p:
        return f"dropout_p={dropout_p}"
    if is_causal:
        return "is_causal=True"
    if query.shape[2] != key.shape[2]:
        return f"grouped-query attention ({query.shape[2]} query heads, {key.shape[2]} key heads)"
    if attention_kwargs:
        return f"attention_kwargs={sorted(attention_kwargs)}"
    return ""


def routed_dispatch(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                    scale: float | None = None, enable_gqa: bool = False,
                    attention_kwargs: dict[str, Any] | None = None, *, backend: Any = None,
                    parallel_config: Any = None) -> torch.Tensor:
    """``dispatch_attention_fn`` as the routed processor copies see it: a :class:`Route` backend goes to the
    method, anything else to diffusers' dispatcher with the same arguments."""
    if isinstance(backend, Route):
        return backend.attend(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                              attention_kwargs, parallel_config)
    return _STOCK_DISPATCH(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                           scale=scale, enable_gqa=enable_gqa, attention_kwargs=attention_kwargs, backend=backend,
                           parallel_config=parallel_config)


class _StockView:
    """The stock processor as its ``__call__`` sees it: ``_attention_backend`` is the call's route,
    ``_parallel_config`` the diffaccel processor's (what ``enable_parallelism`` set, or ``None``), any other attribute read from the stock processor. (Processors that
    write state on ``self``, like FLUX.2's KV-cache ones, are not routed.) Plain attributes, so ``torch.compile``
    traces it without a graph break."""

    def __init__(self, stock: Any, route: Route) -> None:
        self._stock = stock
        self._attention_backend = route
        self._parallel_config = route.parallel

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_stock"], name)


_ROUTED_FUNCTIONS: dict[type, tuple[dict, Callable]] = {}
"""Cache: stock processor class -> (the globals of its routed copy, the routed copy of its ``__call__``). Pure
functions built from diffusers' code, never read by diffusers. A plain dict keyed by class, so a lookup under
``torch.compile`` is a guarded constant, not a graph break."""


def prepare_routed(*classes: type) -> None:
    """Build the routed copies of these processor classes' ``__call__`` now (the family modules do it on import),
    so the first call never builds one while ``torch.compile`` traces it."""
    for cls in classes:
        routed_function(cls)
        _PREPARED_BY_NAME[cls.__name__] = cls


_PREPARED_BY_NAME: dict[str, type] = {}
"""Prepared stock processor classes by name, for a bare ``set_attn_processor`` on a generic ``Attention``."""


def routed_function(cls: type) -> Callable:
    """A copy of ``cls.__call__`` (a stock processor's) whose global ``dispatch_attention_fn`` is
    :func:`routed_dispatch`; every other global is the defining module's. The copy's globals are refreshed from
    the module when called outside ``torch.compile``, so a later change to the module (a patched helper) is seen."""
    cached = _ROUTED_FUNCTIONS.get(cls)
    if cached is None:
        fn = cls.__call__
        if "dispatch_attention_fn" not in fn.__code__.co_names:
            raise UnsupportedModelError(
                f"{fn.__qualname__} does not call dispatch_attention_fn, so its attention call cannot be routed; "
                "this processor needs an explicit adapter"
            )
        scope: dict[str, Any] = dict(fn.__globals__, dispatch_attention_fn=routed_dispatch)
        routed = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
        routed.__kwdefaults__ = fn.__kwdefaults__
        routed.__qualname__ = fn.__qualname__
        cached = (scope, routed)
        _ROUTED_FUNCTIONS[cls] = cached
    elif not torch.compiler.is_compiling():
        scope = cached[0]
        scope.update(cls.__call__.__globals__)
        scope["dispatch_attention_fn"] = routed_dispatch
    return cached[1]


class RoutedAdapter(Adapter):
    """An adapter that runs the stock processor and supplies only the layout of its attention call(s).

    Subclasses set ``family`` and ``stock_processors`` and implement :meth:`layout`.
    """

    runs_stock: ClassVar[bool] = True
    positional_calls: ClassVar[dict[str, tuple[str, ...]]] = {}
    """Attention module classes that call their processor positionally in another order than
    ``DiffAccelAttnProcessor``'s ``(hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)``: the
    parameter names in the order the module passes them after ``hidden_states`` (FLUX.2's single-stream
    ``processor(self, hidden_states, attention_mask, image_rotary_emb)``)."""

    def layout(self, attn: torch.nn.Module, call: AttentionCall, ctx: RunContext, query: torch.Tensor,
               key: torch.Tensor, attn_mask: torch.Tensor | None, index: int
               ) -> tuple[TokenLayout | None, torch.Tensor | None]:
        """The layout of dispatch call ``index`` of this processor call, and the mask the method gets.

        ``query``/``key`` are diffusers' ``(batch, tokens, heads, head_dim)``; ``attn_mask`` is the mask the stock
        processor passed to the dispatcher. A layout of ``None`` keeps the call stock: diffusers' dispatcher runs it
        with the stock backend and the method never sees it (an IP-adapter or I2V image-context attention).
        """
        raise NotImplementedError

    def run_stock(self, attn: torch.nn.Module, call: AttentionCall, ctx: RunContext,
                  method: Callable[..., torch.Tensor], slots: tuple[Any, ...] | None = None, *,
                  strict: bool = False, parallel: Any = None) -> Any:
        """The stock processor's ``__call__`` on the call's own arguments, its attention computed by ``method``.

        ``strict``: a call whose grid is unknown raises (the processor passes it for methods that need a grid).
        ``parallel``: diffusers' ``ParallelConfig`` under context parallelism; the stock processor sees it as its
        ``_parallel_config`` and passes it to the dispatcher for the calls it shards, as it does stock."""
        stock = attn.__dict__.get("_diffaccel_stock_processor")
        if stock is None:  # a bare set_attn_processor: the module's default processor is the stock one
            default_cls = getattr(attn, "_default_processor_cls", None) or _PREPARED_BY_NAME.get(
                stock_processor_name(attn, call))
            if default_cls is None:
                raise UnsupportedModelError(
                    f"cannot tell which processor {type(attn).__name__} normally runs; use diffaccel.apply"
                )
            stock = default_cls()
        call = self.stock_call(attn, call, slots)
        route = Route(self, attn, call, ctx, method, getattr(stock, "_attention_backend", None), strict=strict,
                      parallel=parallel)
        routed = routed_function(type(stock))
        kwargs: dict[str, Any] = dict(call.extra)
        if call.encoder_hidden_states is not None:
            kwargs["encoder_hidden_states"] = call.encoder_hidden_states
        if call.attention_mask is not None:
            kwargs["attention_mask"] = call.attention_mask
        if call.image_rotary_emb is not None:
            kwargs["image_rotary_emb"] = call.image_rotary_emb
        if call.temb is not None:
            kwargs["temb"] = call.temb
        return routed(_StockView(stock, route), attn, call.hidden_states, **kwargs)

    def stock_call(self, attn: torch.nn.Module, call: AttentionCall, slots: tuple[Any, ...] | None) -> AttentionCall:
        """``call`` with the arguments of a positionally calling module (:attr:`positional_calls`) put back under
        the names the stock processor gave them. ``slots`` are ``DiffAccelAttnProcessor``'s parameters after
        ``hidden_states`` as it received them: ``(encoder_hidden_states, attention_mask, image_rotary_emb,
        rotary_emb, temb)``."""
        order = self.positional_calls.get(type(attn).__name__)
        if order is None or slots is None:
            return call
        if any(v is not None for v in slots[len(order):]):
            raise LayoutError(f"{type(attn).__name__} passed more positional arguments than its processor takes")
        extra = dict(call.extra)
        fields: dict[str, Any] = {"encoder_hidden_states": None, "attention_mask": None, "image_rotary_emb": None}
        for name, value in zip(order, slots):
            if name in fields:
                fields[name] = value
            elif value is not None:
                extra[name] = value
        return AttentionCall(hidden_states=call.hidden_states, extra=extra, **fields)

    def project(self, attn: torch.nn.Module, call: AttentionCall, ctx: RunContext):  # pragma: no cover - guard
        raise TypeError(f"{type(self).__name__} runs the stock processor (run_stock); it has no project/finish split")


_LENGTHS = TensorMemo(size=8)


def prefix_lengths(mask: torch.Tensor) -> tuple[int, ...] | None:
    """Valid tokens per row of a ``(batch, tokens)`` key mask (bool or 0/1) that keeps a prefix of each row;
    ``None`` when some row keeps anything else. Memoized per mask object (one host read per mask)."""

    def compute(m: torch.Tensor) -> tuple[int, ...] | None:
        if m.ndim != 2:
            return None
        keep = m.bool() if m.dtype == torch.bool or not m.is_floating_point() else m != 0
        lengths = keep.sum(dim=1)
        prefix = torch.arange(keep.shape[1], device=keep.device).unsqueeze(0) < lengths.unsqueeze(1)
        ok = torch.eq(prefix, keep).all()
        values = torch.cat([lengths.to(torch.int64), ok.to(torch.int64).reshape(1)]).tolist()
        return tuple(int(v) for v in values[:-1]) if values[-1] else None

    return _LENGTHS.get(mask, compute)


def joint_layout(num_tokens: int, grid: Any, num_text: int, *, text_first: bool,
                 text_lengths: tuple[int, ...] | None = None) -> TokenLayout:
    """A joint text+visual layout; a grid that does not cover the visual tokens is a :class:`LayoutError`."""
    text = None if num_text == 0 else (slice(0, num_text) if text_first else slice(num_tokens - num_text, num_tokens))
    return TokenLayout(num_tokens=num_tokens, grid=grid, text=text, text_lengths=text_lengths)


def grid_or_none(ctx: RunContext, num_visual: int, family: str) -> Any:
    """The run context's grid when it holds ``num_visual`` tokens; ``None`` (the call runs dense, said once) when
    the hook recorded no grid or one of another size (reference-image tokens in the sequence)."""
    grid = ctx.grid
    if grid is not None:
        size = 1
        for s in grid:
            size *= int(s)
        if size == num_visual:
            return grid
    warn_once(
        f"routed-no-grid:{family}:{grid}:{num_visual}",
        f"diffaccel: a {family} attention call has {num_visual} visual tokens but the recorded latent grid is {grid}"
        " (reference-image tokens, or no diffaccel.apply hook); it runs dense",
    )
    return None


def require(condition: bool, message: str) -> None:
    if not condition:
        raise LayoutError(message)
