"""diffaccel methods under diffusers' context parallelism (Ulysses all-to-all around the method; ring for dense).

diffusers shards the sequence of a denoiser across ranks (``model.enable_parallelism(config=ContextParallelConfig(
...))``: the model's ``_cp_plan`` splits the token inputs and gathers the output) and computes attention in its
dispatcher, exchanging shards there (Ulysses: an all-to-all that turns sequence shards into head shards; ring:
key/value shards passed around and merged by their log-sum-exp). A diffaccel processor replaces the stock one, so
it must do the exchange itself, or every rank would run its method on its own shard as if it were the whole
sequence. This module does it with diffusers' own collective (``attention_dispatch._all_to_all_single``) on the
config's Ulysses mesh, so each rank runs the method on the **whole** sequence for ``heads / degree`` of the heads:

1. the stock processor (routed adapters: it runs as is and passes its ``parallel_config`` to the dispatcher,
   where the route hands the call to :func:`attend_context_parallel`) or the explicit adapter projects the local
   tokens; the layout sees the shard (a per-call copy of the run context holds the shard's grid size and text
   length);
2. q, k, v go sequence -> heads; the gathered sequence is rank 0's shard, rank 1's, ...; each shard is
   ``[text, visual]`` (or ``[visual, text]``), so a permutation restores the model's token order ``[all text,
   all visual]`` and the method sees the layout of the single-process call (grid, text slice);
3. ``ctx.heads`` (:class:`~diffaccel.context.HeadShard`) says which global heads the rank holds, for methods
   with per-head state (tile's per-head frames, AdaSpa's head tiers);
4. the output goes back to the shard's order and heads -> sequence; the processor finishes on the local tokens.

Ring degree > 1 computes attention over key shards, which only a method that merges partial results by LSE
can do: ``dense`` runs through diffusers' dispatcher (its templated ring / unified attention, exact); any other
method raises. A method runs under a mode only if it declares it (``MethodBase.context_parallel``); families
whose sharding was checked are listed in :data:`SUPPORTED_FAMILIES`. Everything else raises a
:class:`~diffaccel.errors.ConfigError` naming what is supported: no call computes attention over a shard silently.

References: Jacobs et al., "DeepSpeed Ulysses" (arXiv 2309.14509); Liu et al., "Ring Attention" (arXiv
2310.01889); diffusers' context parallelism (``diffusers.hooks.context_parallel``, ``models/attention_dispatch``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import torch

from diffaccel.context import HeadShard, RunContext
from diffaccel.errors import ConfigError, LayoutError
from diffaccel.layout import TokenLayout
from diffaccel.pipelines.adapters.base import Adapter, AttentionCall

SUPPORTED_FAMILIES = ("wan", "flux")
"""Families whose diffusers ``_cp_plan`` this module undoes exactly (tested with two processes): Wan shards the
visual tokens (self-attention) and keeps the text context whole (cross-attention); FLUX shards text and image
tokens each, so a rank's joint sequence is ``[its text, its image tokens]``."""


def parallel_config(processor: Any, ctx: RunContext | None = None) -> Any | None:
    """The diffusers ``ParallelConfig`` with context parallelism a processor runs under, or ``None``.

    ``model.enable_parallelism`` sets ``_parallel_config`` on every processor that has the attribute (ours has);
    :func:`attach` sets it when diffaccel is applied to a model that is already parallel. A processor installed
    with a bare ``set_attn_processor`` after ``enable_parallelism`` is told neither way; with several ranks and no
    diffaccel hook (``ctx.denoiser_calls == 0``) it cannot tell whether the model shards its sequence, so it
    raises rather than attend over what may be a shard (data parallelism with ``diffaccel.apply`` runs).
    """
    config = getattr(processor, "_parallel_config", None)
    cp = getattr(config, "context_parallel_config", None) if config is not None else None
    if cp is not None:
        return config
    if ctx is not None and ctx.denoiser_calls == 0 and torch.distributed.is_available() \
            and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        name = getattr(getattr(processor, "method", None), "name", "?")
        raise ConfigError(
            f"method {name!r}: torch.distributed runs {torch.distributed.get_world_size()} ranks and this diffaccel "
            "processor was installed without diffaccel.apply, so it cannot tell whether the model shards its "
            "sequence (enable_parallelism); install it with diffaccel.apply(model, method), before or after "
            "enable_parallelism"
        )
    return None


def attach(processor: Any, model: torch.nn.Module) -> None:
    """Give ``processor`` the parallel config of ``model`` (set by ``enable_parallelism`` before diffaccel was
    applied) and check now that its method can run under it."""
    config = getattr(model, "_parallel_config", None)
    if config is None or getattr(config, "context_parallel_config", None) is None:
        return
    processor._parallel_config = config
    check_method(processor.method, config.context_parallel_config)


def supported_methods(mode: str) -> list[str]:
    """Registered methods that declare ``mode`` (``"ulysses"`` or ``"ring"``) in ``context_parallel``."""
    from diffaccel.methods.base import list_methods, method_class

    return [m for m in list_methods() if mode in getattr(method_class(m), "context_parallel", frozenset())]


def check_method(method: Any, cp: Any) -> str:
    """The mode (``"ulysses"`` or ``"ring"``) ``method`` runs under for config ``cp``, or a ConfigError."""
    name = getattr(method, "name", type(method).__name__)
    modes = getattr(method, "context_parallel", frozenset())
    ring, ulysses = int(cp.ring_degree), int(cp.ulysses_degree)
    if getattr(cp, "ulysses_anything", False) or getattr(cp, "ring_anything", False):
        raise ConfigError(
            f"method {name!r} under context parallelism: ulysses_anything / ring_anything (uneven shards) are not "
            "supported by diffaccel; use a sequence length and head count divisible by the degrees"
        )
    if ring > 1 and ulysses > 1:
        raise ConfigError(
            f"method {name!r} under context parallelism with ring_degree={ring} and ulysses_degree={ulysses}: "
            "diffaccel runs one of the two at a time (ring_degree > 1 for dense only, or ulysses_degree > 1)"
        )
    if ring > 1:
        if "ring" not in modes:
            raise ConfigError(
                f"method {name!r} cannot run with ring_degree={ring}: ring attention computes attention over key "
                "shards and merges the partial results by their log-sum-exp, which this method does not do; "
                f"supported with ring_degree > 1: {', '.join(supported_methods('ring'))}; other methods need "
                f"ring_degree=1 and ulysses_degree dividing the head count (supported under Ulysses: "
                f"{', '.join(supported_methods('ulysses'))})"
            )
        return "ring"
    if "ulysses" not in modes:
        raise ConfigError(
            f"method {name!r} does not support context parallelism (ulysses_degree={ulysses}): it has not been "
            f"checked to run exactly on a slice of the heads; supported under Ulysses (ring_degree=1, "
            f"ulysses_degree dividing the head count): {', '.join(supported_methods('ulysses'))}"
        )
    return "ulysses"


def _group(cp: Any):
    return cp._ulysses_mesh.get_group()


def _all_to_all(x: torch.Tensor, group: Any) -> torch.Tensor:
    """diffusers' all-to-all (``funcol.all_to_all_single``): chunk ``i`` of dim 0 goes to rank ``i``."""
    from diffusers.models.attention_dispatch import _all_to_all_single

    return _all_to_all_single(x.contiguous(), group)


def seq_to_heads(x: torch.Tensor, world: int, group: Any) -> torch.Tensor:
    """``(B, H, S_local, D)`` sequence shards to ``(B, H / world, world * S_local, D)`` head shards.

    The gathered sequence is rank 0's shard, then rank 1's, ...; this rank keeps heads ``rank * H / world ...``.
    """
    b, h, s, d = x.shape
    x = x.reshape(b, world, h // world, s, d).permute(1, 0, 2, 3, 4)  # (world, B, H_local, S_local, D)
    x = _all_to_all(x, group)  # chunk j: rank j's tokens of this rank's heads
    return x.permute(1, 2, 0, 3, 4).reshape(b, h // world, world * s, d)


def heads_to_seq(x: torch.Tensor, world: int, group: Any) -> torch.Tensor:
    """Inverse of :func:`seq_to_heads`: ``(B, H_local, world * S_local, D)`` to ``(B, world * H_local, S_local, D)``."""
    b, hl, n, d = x.shape
    s = n // world
    x = x.reshape(b, hl, world, s, d).permute(2, 0, 1, 3, 4)  # (world, B, H_local, S_local, D): chunk j to rank j
    x = _all_to_all(x, group)  # chunk j: this rank's tokens of rank j's heads
    return x.permute(1, 0, 2, 3, 4).reshape(b, world * hl, s, d)


def model_order(local: TokenLayout, world: int) -> torch.Tensor | None:
    """Index ``p`` such that ``gathered[..., p, :]`` is in the model's token order, or ``None`` (already is).

    ``gathered`` is ``world`` shards of ``local``'s structure one after the other; the model's order puts every
    shard's text first (text-first layouts) or last, shard by shard, as diffusers' even split cut them.
    """
    t = local.num_text
    if t == 0:
        return None
    s = local.num_tokens
    v = s - t
    rank = torch.arange(world)[:, None]
    text = (rank * s + (0 if local.text_first else v) + torch.arange(t)).reshape(-1)
    visual = (rank * s + (t if local.text_first else 0) + torch.arange(v)).reshape(-1)
    return torch.cat([text, visual] if local.text_first else [visual, text])


def global_layout(local: TokenLayout, world: int, grid: tuple[int, ...] | None) -> TokenLayout:
    """The layout of the whole sequence that ``world`` shards shaped like ``local`` make, in the model's order."""
    n, t = local.num_tokens * world, local.num_text * world
    text = None if local.text is None else (slice(0, t) if local.text_first or t == 0 else slice(n - t, n))
    return dataclasses.replace(local, num_tokens=n, grid=grid, text=text)


def shard_context(ctx: RunContext, world: int, who: str) -> RunContext:
    """A copy of ``ctx`` for the adapter's projection of one shard: the grid as the shard's token count (a flat
    grid: even shards cut the flattened grid anywhere), the text length divided by ``world``."""
    if ctx.grid is None:
        raise LayoutError(
            f"{who} under context parallelism needs the latent grid, which diffaccel.apply's hook records; install "
            "the processor with diffaccel.apply(model, method), not with a bare set_attn_processor"
        )
    shard = copy.copy(ctx)
    total = math.prod(ctx.grid)
    if total % world:
        raise LayoutError(f"{who}: the latent grid {ctx.grid} ({total} tokens) does not split into {world} shards")
    shard.grid = (1,) * (len(ctx.grid) - 1) + (total // world,)
    if ctx.text_len is not None:
        if ctx.text_len % world:
            raise LayoutError(f"{who}: {ctx.text_len} text tokens do not split into {world} shards")
        shard.text_len = ctx.text_len // world
    return shard


def world_size(config: Any) -> int:
    """Ranks the sequence is sharded over: ``ulysses_degree * ring_degree`` of diffusers' ``ParallelConfig``."""
    cp = config.context_parallel_config
    return int(cp.ulysses_degree) * int(cp.ring_degree)


def check_context_parallel(method: Any, family: str, attn: torch.nn.Module, config: Any) -> str:
    """The mode ``method`` runs under for ``config`` on an attention module of ``family``, or a ConfigError (a
    method without that mode, a family whose sharding is not undone here). Called before any projection."""
    name = getattr(method, "name", type(method).__name__)
    mode = check_method(method, config.context_parallel_config)
    if family not in SUPPORTED_FAMILIES:
        label = family or type(attn).__name__
        raise ConfigError(
            f"method {name!r} under context parallelism on a {label} model: the {label} family is not supported "
            f"(diffaccel undoes the sequence sharding of the families {', '.join(SUPPORTED_FAMILIES)} only)"
        )
    return mode


def attend_context_parallel(
    method: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, local: TokenLayout, ctx: RunContext,
    config: Any, *, who: str, attn_mask: torch.Tensor | None = None, scale: float | None = None,
    sharded: bool = True,
) -> torch.Tensor:
    """``method`` on one rank's ``(B, H, S_local, D)`` q, k, v of a context-parallel model, ``local`` being the
    layout of the shard (the adapter built it from :func:`shard_context`); returns this rank's ``(B, H, S_local,
    D)`` output.

    Ulysses: sequence -> heads, the model's token order restored, the method on the whole sequence for this rank's
    heads (``ctx.heads``), and back. Ring (dense only): the key/value shards gathered. ``sharded=False`` (the stock
    processor dispatched this call without its parallel config: Wan's cross-attention, whose keys are whole) and
    cross-attention layouts run the method on the local queries, which is exact per query."""
    if attn_mask is not None or local.text_lengths is not None:
        raise ConfigError(
            f"{who}: attention masks (padded prompts) are not supported under context parallelism by diffaccel"
        )
    cp = config.context_parallel_config
    mode = check_method(method, cp)
    world = world_size(config)
    if local.is_cross or not sharded:
        # queries sharded, keys whole (Wan keeps the text context unsplit): per-query attention is exact as is;
        # MethodBase keeps cross-attention dense.
        return method(q, k, v, local, ctx, attn_mask=None, scale=scale)
    if mode == "ring":
        # diffusers' ring attention with rotate_method="allgather" gathers every key/value shard and merges the
        # per-shard results by LSE; its native (CPU) backend cannot return an LSE, so the gathered keys are
        # attended in one call instead (the same result). Key order does not matter to dense attention.
        group = cp._ring_mesh.get_group()
        k, v = (_all_gather(t, 2, group) for t in (k, v))
        return method(q, k, v, dataclasses.replace(local, grid=None, text=None, is_cross=True, num_keys=k.shape[2]),
                      ctx, attn_mask=None, scale=scale)
    heads = q.shape[1]
    if heads % world:
        raise ConfigError(
            f"{who}: {heads} attention heads do not split evenly over ulysses_degree={world}; use a degree that "
            f"divides {heads} (supported: {', '.join(str(d) for d in range(2, heads + 1) if heads % d == 0)})"
        )
    group = _group(cp)
    rank = torch.distributed.get_rank(group)
    q, k, v = (seq_to_heads(t, world, group) for t in (q, k, v))
    layout = global_layout(local, world, ctx.grid)
    order = model_order(local, world)
    if order is not None:
        order = order.to(q.device)
        q, k, v = (t.index_select(2, order) for t in (q, k, v))
    local_heads = heads // world
    shard = HeadShard(offset=rank * local_heads, total=heads, gather=lambda x: _gather_heads(x, world, group))
    previous, ctx.heads = ctx.heads, shard
    try:
        out = method(q, k, v, layout, ctx, attn_mask=None, scale=scale)
    finally:
        ctx.heads = previous
    if order is not None:
        out = out.index_select(2, torch.argsort(order))
    return heads_to_seq(out, world, group)


def run_context_parallel(
    method: Any, adapter: Adapter, attn: torch.nn.Module, call: AttentionCall, ctx: RunContext, config: Any
) -> Any:
    """One attention call of an explicit (``project``/``finish``) adapter under context parallelism: project the
    shard, :func:`attend_context_parallel`, finish the shard. (Routed adapters call
    :func:`attend_context_parallel` from their dispatch route, ``adapters/dispatch.py``.)"""
    check_context_parallel(method, adapter.family, attn, config)
    name = getattr(method, "name", type(method).__name__)
    who = f"method {name!r} at layer {ctx.layer}"
    projected = adapter.project(attn, call, shard_context(ctx, world_size(config), who))
    out = attend_context_parallel(method, projected.q, projected.k, projected.v, projected.layout, ctx, config,
                                  who=who, attn_mask=projected.attn_mask, scale=projected.scale)
    return adapter.finish(attn, out, projected)


def _all_gather(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    """Every rank's ``x`` concatenated along ``dim`` in rank order (diffusers' ``AllGatherFunction``)."""
    from diffusers.hooks.context_parallel import AllGatherFunction

    return AllGatherFunction.apply(x.contiguous(), dim, group)


def _gather_heads(x: torch.Tensor, world: int, group: Any) -> torch.Tensor:
    """``(..., H_local)`` per-head values of every rank to ``(..., world * H_local)`` in global head order."""
    return _all_gather(x, x.ndim - 1, group)
