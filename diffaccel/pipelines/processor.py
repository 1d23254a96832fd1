"""``DiffAccelAttnProcessor``: a diffusers attention processor that runs a diffaccel method.

One instance can serve every attention module of a model: the adapter is chosen per module from the stock
processor it replaces, and per-layer method state is keyed by the module's qualified name.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from diffaccel.context import RunContext
from diffaccel.errors import ConfigError
from diffaccel.methods.base import AttentionMethod, get_method
from diffaccel.pipelines import compile_ops
from diffaccel.pipelines.objects import picklable_method
from diffaccel.pipelines.adapters.base import AttentionCall, adapter_for
from diffaccel.pipelines.parallel import parallel_config, run_context_parallel
from diffaccel.warn import warn_once


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
        method: a registered method name or an :class:`~diffaccel.methods.base.AttentionMethod` instance.
        context: the run context the pipeline hook fills; a fresh one (no grid, step 0) when omitted.
        **config: the method's configuration fields when ``method`` is a name.
    """

    _parallel_config: Any = None
    """diffusers' ``ParallelConfig`` when the model runs context parallelism (set by ``enable_parallelism``, which
    sets it on every processor with this attribute, or by :func:`diffaccel.apply` on a parallel model)."""

    def __init__(self, method: AttentionMethod | str = "dense", *, context: RunContext | None = None, **config: Any):
        self.method = resolve_method(method, config)
        self.context = context if context is not None else RunContext()
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
            if parallel is not None:
                raise ConfigError(
                    f"method {self.method.name!r} under context parallelism: the {adapter.family} family is not "
                    "supported yet (supported: the families in diffaccel.pipelines.parallel.SUPPORTED_FAMILIES)"
                )
            slots = (encoder_hidden_states, attention_mask, image_rotary_emb, rotary_emb, temb)
            return adapter.run_stock(attn, call, ctx, attend, slots=slots)
        if parallel is not None:  # diffusers context parallelism: the sequence is sharded across ranks
            return run_context_parallel(self.method, adapter, attn, call, ctx, parallel)
        projected = adapter.project(attn, call, ctx)
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
