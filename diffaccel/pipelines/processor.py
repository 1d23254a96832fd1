"""``DiffAccelAttnProcessor``: a diffusers attention processor that runs a diffaccel method.

One instance can serve every attention module of a model: the adapter is chosen per module from the stock
processor it replaces, and per-layer method state is keyed by the module's qualified name.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from diffaccel.context import RunContext
from diffaccel.errors import ConfigError, LayoutError
from diffaccel.methods.base import AttentionMethod, get_method
from diffaccel.pipelines import compile_ops
from diffaccel.pipelines.objects import picklable_method
from diffaccel.pipelines.adapters.base import AttentionCall, adapter_for
from diffaccel.pipelines.parallel import check_context_parallel, parallel_config, run_context_parallel
from diffaccel.warn import warn_once

INSTALLED_PROCESSOR = "_diffaccel_processor"
"""Module ``__dict__`` key of the processor :func:`diffaccel.apply` installed (read by rebuilt processors)."""


def resolve_method(method: AttentionMethod | str, config: dict[str, Any]) -> AttentionMethod:
    """A method instance from a registered name plus config keywords, or the instance itself."""
    if isinstance(method, str):
        return get_method(method, **config)
    if config:
        raise TypeError(
            f"config keywords {sorted(config)} were given with a method instance; pass a method name instead, "
            "or configure the instance"
        )
    if not callable(method) or not hasattr(method, "config"):
        raise TypeError(f"method must be a registered name or an AttentionMethod instance, got {type(method).__name__}")
    return method


class DiffAccelAttnProcessor:
    """Attention processor for any supported diffusers attention module.

    Example::

        pipe.transformer.set_attn_processor(DiffAccelAttnProcessor("dense"))
        diffaccel.apply(pipe, "dense")   # also records the latent grid and the step for methods that need them

    Args:
        method: a registered method name or an :class:`~diffaccel.methods.base.AttentionMethod` instance. Omitted
            (``DiffAccelAttnProcessor()``, as diffusers rebuilds processors with ``processor.__class__()`` in
            ``load_ip_adapter`` and elsewhere): on a module :func:`diffaccel.apply` set up, the call runs the
            processor ``apply`` installed (its method, context and per-layer state); elsewhere dense.
        context: the run context the pipeline hook fills; a fresh one (no grid, step 0) when omitted.
        strict: raise :class:`~diffaccel.errors.LayoutError` on a call whose token grid cannot be derived, when
            the method needs one; by default such a call runs dense (one warning per layer).
        **config: the method's configuration fields when ``method`` is a name.
    """

    _parallel_config: Any = None
    """diffusers' ``ParallelConfig`` when the model runs context parallelism (set by ``enable_parallelism``, which
    sets it on every processor with this attribute, or by :func:`diffaccel.apply` on a parallel model)."""

    def __init__(
        self,
        method: AttentionMethod | str | None = None,
        *,
        context: RunContext | None = None,
        strict: bool = False,
        **config: Any,
    ):
        if not isinstance(strict, bool):
            raise TypeError(f"strict must be True or False, got {strict!r}")
        self.rebuilt = method is None and context is None and not config and not strict
        """Built without arguments: defers to the processor :func:`diffaccel.apply` installed on the module."""
        self.method = resolve_method("dense" if method is None else method, config)
        self.context = context if context is not None else RunContext()
        self.strict = strict
        self._op_key = compile_ops.register_processor(self)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_op_key", None)  # process-local: a copy or an unpickled processor gets its own
        state["method"] = picklable_method(self.method)  # pickling (torch.save): caches that cannot pickle dropped
        return state

    def __deepcopy__(self, memo: dict[int, Any]) -> "DiffAccelAttnProcessor":
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key != "_op_key":
                new.__dict__[key] = copy.deepcopy(value, memo)
        new._op_key = compile_ops.register_processor(new)
        return new

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._op_key = compile_ops.register_processor(self)

    @property
    def _attention_backend(self) -> Any:
        """diffusers' ``set_attention_backend`` sets this on every processor that has it. diffaccel's method computes
        attention itself, so a backend set here has no effect: setting one says so once (never silently)."""
        return self.__dict__.get("_diffusers_backend")

    @_attention_backend.setter
    def _attention_backend(self, backend: Any) -> None:
        self.__dict__["_diffusers_backend"] = backend
        if backend is not None:
            name = getattr(backend, "value", backend)
            warn_once(
                f"attention-backend:{name}:{self.method.name}",
                f"diffaccel: set_attention_backend({name!r}) has no effect on diffaccel's processors: method "
                f"{self.method.name!r} computes attention itself (dense: PyTorch SDPA). diffaccel.remove(model) "
                "restores the stock processors, which use the backend.",
            )

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
        rotary_emb: Any = None,
        temb: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        freqs_cis: torch.Tensor | None = None,
        query_rotary_emb: Any = None,
        key_rotary_emb: Any = None,
        **kwargs: Any,
    ) -> Any:
        # diffusers passes a processor only the keywords its signature names (Qwen-Image's prompt mask, Z-Image's
        # RoPE, LTX-2's query/key RoPE): named here, they reach the routed stock processor through `extra`
        for name, value in (("encoder_hidden_states_mask", encoder_hidden_states_mask), ("freqs_cis", freqs_cis),
                            ("query_rotary_emb", query_rotary_emb), ("key_rotary_emb", key_rotary_emb)):
            if value is not None:
                kwargs[name] = value
        call = AttentionCall(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
            image_rotary_emb=image_rotary_emb if image_rotary_emb is not None else rotary_emb,
            temb=temb,
            extra=kwargs,
        )
        if self.rebuilt:
            installed = attn.__dict__.get(INSTALLED_PROCESSOR)
            if installed is not None and installed is not self and self.defers_to(installed):
                warn_once(
                    f"rebuilt-processor:{installed.method.name}",
                    "diffaccel: a DiffAccelAttnProcessor() built without a method (as diffusers rebuilds processors "
                    "with processor.__class__(), e.g. in load_ip_adapter) runs the processor diffaccel.apply "
                    f"installed on the module, method {installed.method.name!r}; pass a method name, e.g. "
                    "DiffAccelAttnProcessor('dense'), for another one.",
                )
                return installed(
                    attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, rotary_emb, temb,
                    **kwargs,
                )
        adapter = adapter_for(attn, call)
        ctx = self.context
        compiling = compile_ops.compiling()
        parallel = parallel_config(self, None if compiling else ctx)  # no guard on run state while tracing
        if compiling and parallel is not None:
            raise ConfigError(
                f"method {self.method.name!r}: diffaccel does not run under torch.compile with context "
                "parallelism yet (its all-to-all runs outside the compiled graph); compile without "
                "enable_parallelism, or run context parallelism eagerly"
            )
        # traced: the method runs inside one opaque op, found by graph values (no per-layer guards)
        attend = self._traced_attend(attn) if compiling else self.method
        if not compiling:
            ctx.layer = layer_name(attn)
        if getattr(adapter, "runs_stock", False):  # the stock processor runs, its attention call routed (dispatch.py)
            if parallel is not None:  # refused before any projection; the route runs the exchange (parallel.py)
                check_context_parallel(self.method, adapter.family, attn, parallel)
            slots = (encoder_hidden_states, attention_mask, image_rotary_emb, rotary_emb, temb)
            strict = self.strict and getattr(self.method, "needs_grid", True)
            return adapter.run_stock(attn, call, ctx, attend, slots=slots, strict=strict, parallel=parallel)
        if parallel is not None:  # diffusers context parallelism: the sequence is sharded across ranks
            return run_context_parallel(self.method, adapter, attn, call, ctx, parallel)
        projected = adapter.project(attn, call, ctx)
        layout = projected.layout
        if layout.grid_unknown and self.strict and getattr(self.method, "needs_grid", True):
            raise LayoutError(
                f"{ctx.layer}: method {self.method.name!r} needs the token grid, which is unknown for this call "
                f"({layout.unknown}); strict=True refuses the call (without strict it runs dense, as stock)"
            )
        out = attend(
            projected.q, projected.k, projected.v, projected.layout, ctx,
            attn_mask=projected.attn_mask, scale=projected.scale,
        )
        return adapter.finish(attn, out, projected)

    def _traced_attend(self, attn: torch.nn.Module):
        """The method as one opaque ``diffaccel::attend`` op for a traced call: the layer travels as a name tensor,
        the layout as a string of ints, so nothing of the method's Python state becomes a guard."""
        token = compile_ops.get_layer_token(attn)

        def attend(q, k, v, layout, ctx, *, attn_mask=None, scale=None):
            return torch.ops.diffaccel.attend(
                q, k, v, attn_mask, token, self._op_key, compile_ops.encode_layout(layout), scale,
            )

        return attend

    def defers_to(self, installed: "DiffAccelAttnProcessor") -> bool:
        """Whether this no-argument rebuild runs ``installed`` (the processor :func:`diffaccel.apply` put on the
        module): always for the generic class; named processors only for their own method."""
        return True

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.method!r})"


def layer_name(attn: torch.nn.Module) -> str:
    """The qualified name :func:`diffaccel.apply` recorded, else a stable per-module name for this process.

    The fallback (a bare ``set_attn_processor``, which never learns the module's name) is built from the module's
    ``id``, so it differs between processes; state derived from layer names (MSW-MSA shifts, agent seeds, layer
    selections) then differs too, which a one-time warning says.
    """
    name = attn.__dict__.get("_diffaccel_name")
    if name is None:
        name = f"{type(attn).__name__}@{id(attn):x}"
        attn.__dict__["_diffaccel_name"] = name
        warn_once(
            "layer-name-from-id",
            f"diffaccel: attention module {type(attn).__name__} has no recorded name (the processor was installed with "
            "set_attn_processor, not diffaccel.apply); it is called by its id, which differs between processes, so "
            "per-layer state derived from names (MSW shifts, agent seeds, layers=/exclude_layers= selections) is "
            "not reproducible across runs. Install with diffaccel.apply(pipe, method) for module names.",
        )
    return name
