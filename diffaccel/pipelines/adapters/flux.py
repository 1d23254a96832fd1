"""FLUX.1 attention (``FluxAttention`` with ``FluxAttnProcessor``): double- and single-stream blocks.

Double-stream blocks project text with their own (``add_*``) projections and put the text tokens first;
single-stream blocks receive text and image already concatenated (text first) and have no output projection
(``pre_only``). RoPE covers the whole text+image sequence. Mirrors
``diffusers.models.transformers.transformer_flux.FluxAttnProcessor``, unfused and fused projections.

Black Forest Labs, FLUX.1 (2024), https://github.com/black-forest-labs/flux.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

from diffaccel.context import RunContext
from diffaccel.errors import LayoutError
from diffaccel.layout import TokenLayout
from diffaccel.pipelines.adapters.base import (
    Adapter,
    AttentionCall,
    ModelFamily,
    Projected,
    TensorMemo,
    merge_heads,
    register_adapter,
    grid_or_unknown,
    register_family,
    register_processor_wrapper,
)

@dataclass(frozen=True)
class FluxCarry:
    """What :meth:`FluxAttentionAdapter.finish` needs: the text length of a double-stream call (``None`` for a
    single-stream one, which returns the joint sequence unsplit) and the dtype of the projections."""

    num_text: int | None
    dtype: torch.dtype
    image_query: torch.Tensor | None = None
    """The image queries after QK-norm and before RoPE, ``(batch, tokens, heads, head_dim)``: the IP-adapter
    queries (kept only by :class:`FluxIPAdapterAttentionAdapter`)."""
    ip_hidden_states: Any = None


@register_adapter
class FluxAttentionAdapter(Adapter):
    """``FluxAttnProcessor``: per-head RMS QK-norm, ``[text, image]`` concatenation, RoPE over the whole sequence."""

    family = "flux"
    stock_processors = ("FluxAttnProcessor",)
    keeps_image_query: bool = False

    def __init__(self) -> None:
        # Text length of the last double-stream call per run context, for the single-stream calls after it; needed
        # only without the diffaccel.apply hook (which sets ctx.text_len). FLUX bookkeeping, so it lives here.
        self._joint_text_len: weakref.WeakKeyDictionary[RunContext, int] = weakref.WeakKeyDictionary()

    def project(self, attn: torch.nn.Module, call: AttentionCall, ctx: RunContext) -> Projected:
        hidden_states = call.hidden_states
        encoder_hidden_states = call.encoder_hidden_states
        double_stream = attn.added_kv_proj_dim is not None
        if double_stream != (encoder_hidden_states is not None):
            raise LayoutError(
                f"FluxAttention {'with' if double_stream else 'without'} text projections (added_kv_proj_dim="
                f"{attn.added_kv_proj_dim}) was called {'without' if double_stream else 'with'} "
                "encoder_hidden_states; FluxAttnProcessor supports double-stream calls with text and single-stream "
                "calls without"
            )

        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        # (batch, tokens, heads, head_dim) as the stock processor works in, until the method call.
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        image_query = query if self.keeps_image_query else None

        if double_stream:
            if getattr(attn, "fused_projections", False):
                text_query, text_key, text_value = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                text_query = attn.add_q_proj(encoder_hidden_states)
                text_key = attn.add_k_proj(encoder_hidden_states)
                text_value = attn.add_v_proj(encoder_hidden_states)
            text_query, text_key, text_value = (
                t.unflatten(-1, (-1, attn.head_dim)) for t in (text_query, text_key, text_value)
            )
            text_query = attn.norm_added_q(text_query)
            text_key = attn.norm_added_k(text_key)
            query = torch.cat([text_query, query], dim=1)
            key = torch.cat([text_key, key], dim=1)
            value = torch.cat([text_value, value], dim=1)

        if call.image_rotary_emb is not None:
            query = apply_rotary_emb(query, call.image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, call.image_rotary_emb, sequence_dim=1)

        num_tokens = query.shape[1]
        if double_stream:
            num_text = encoder_hidden_states.shape[1]
            if not torch.compiler.is_compiling():  # traced, the store would guard on the dict (a recompile)
                self._joint_text_len[ctx] = num_text
        else:
            num_text = None
            try:
                num_text = _single_stream_text_len(ctx, num_tokens, self._joint_text_len.get(ctx))
            except LayoutError as exc:  # dense needs no text length: the call runs, methods needing one fall back
                layout = TokenLayout(num_tokens=num_tokens, grid=None, unknown=str(exc))
        if num_text is not None:
            grid, _, unknown = grid_or_unknown(ctx, num_tokens - num_text)
            layout = TokenLayout(num_tokens=num_tokens, grid=grid, text=slice(0, num_text), unknown=unknown)

        attn_mask = call.attention_mask
        # diffusers' native attention backend widens a (batch, keys) mask to (batch, 1, 1, keys).
        if attn_mask is not None and attn_mask.ndim == 2 and attn_mask.shape == (query.shape[0], key.shape[1]):
            attn_mask = attn_mask[:, None, None, :]

        query, key, value = (t.transpose(1, 2) for t in (query, key, value))
        return Projected(
            query, key, value, layout, attn_mask=attn_mask,
            carry=FluxCarry(
                num_text=num_text if double_stream else None, dtype=query.dtype, image_query=image_query,
                ip_hidden_states=call.extra.get("ip_hidden_states") if self.keeps_image_query else None,
            ),
        )

    def finish(self, attn: torch.nn.Module, out: torch.Tensor, projected: Projected) -> Any:
        carry: FluxCarry = projected.carry
        hidden_states = merge_heads(out).to(carry.dtype)
        num_text = carry.num_text
        if num_text is None:
            return hidden_states
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [num_text, hidden_states.shape[1] - num_text], dim=1
        )
        hidden_states = attn.to_out[0](hidden_states.contiguous())
        hidden_states = attn.to_out[1](hidden_states)
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states


@register_adapter
class FluxIPAdapterAttentionAdapter(FluxAttentionAdapter):
    """``FluxIPAdapterAttnProcessor`` (``FluxTransformer2DModel.load_ip_adapter``): the joint attention runs the
    method; the IP-adapter attention of the image queries (before RoPE) to the projected image-prompt tokens is
    added dense, as the stock processor computes it, and returned as the block's third output.

    The IP weights (``to_k_ip``, ``to_v_ip``) and ``scale`` are read from the module's processor
    (:class:`DiffAccelFluxIPAdapterAttnProcessor`, which shares them with the stock one).
    """

    stock_processors = ("FluxIPAdapterAttnProcessor",)
    keeps_image_query = True

    def finish(self, attn: torch.nn.Module, out: torch.Tensor, projected: Projected) -> Any:
        result = super().finish(attn, out, projected)
        carry: FluxCarry = projected.carry
        if carry.num_text is None:  # single-stream blocks have no IP-adapter attention
            return result
        hidden_states, encoder_hidden_states = result
        weights = attn.processor if hasattr(attn.processor, "to_k_ip") else attn.__dict__["_diffaccel_stock_processor"]
        ip_query = carry.image_query
        batch = ip_query.shape[0]
        ip_out = torch.zeros_like(hidden_states)
        for states, scale, to_k_ip, to_v_ip in zip(
            carry.ip_hidden_states or (), weights.scale, weights.to_k_ip, weights.to_v_ip
        ):
            ip_key = to_k_ip(states).view(batch, -1, attn.heads, attn.head_dim)
            ip_value = to_v_ip(states).view(batch, -1, attn.heads, attn.head_dim)
            # IP cross-attention stays dense: PyTorch SDPA as diffusers' native backend calls it
            attended = torch.nn.functional.scaled_dot_product_attention(
                *(t.permute(0, 2, 1, 3) for t in (ip_query, ip_key, ip_value)), dropout_p=0.0, is_causal=False
            ).permute(0, 2, 1, 3)
            ip_out += scale * attended.reshape(batch, -1, attn.heads * attn.head_dim).to(ip_query.dtype)
        return hidden_states, encoder_hidden_states, ip_out


class DiffAccelFluxIPAdapterAttnProcessor(FluxIPAdapterAttnProcessor):
    """A ``FluxIPAdapterAttnProcessor`` whose attention runs diffaccel's processor.

    It owns the original's ``to_k_ip``/``to_v_ip`` modules (the same objects, so ``state_dict`` keys, device moves
    and ``set_ip_adapter_scale`` behave as with the stock processor) and passes every call to the diffaccel
    processor, whose :class:`FluxIPAdapterAttentionAdapter` adds the IP-adapter attention. ``isinstance`` checks
    for ``FluxIPAdapterAttnProcessor`` in diffusers (``unload_ip_adapter``, scale setting) hold.
    """

    def __init__(self, original: FluxIPAdapterAttnProcessor, processor: Any) -> None:
        torch.nn.Module.__init__(self)
        self.__dict__["original"] = original  # not a submodule: its weights are registered once, below
        self.hidden_size = original.hidden_size
        self.cross_attention_dim = original.cross_attention_dim
        self.to_k_ip = original.to_k_ip
        self.to_v_ip = original.to_v_ip
        self.__dict__["diffaccel_processor"] = processor

    @property
    def scale(self) -> list[float]:
        """The original's IP scales (``set_ip_adapter_scale`` sets them here; ``diffaccel.remove`` keeps them)."""
        return self.__dict__["original"].scale

    @scale.setter
    def scale(self, value: list[float]) -> None:
        self.__dict__["original"].scale = value

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
        ip_hidden_states: list[torch.Tensor] | None = None,
        ip_adapter_masks: torch.Tensor | None = None,
    ) -> Any:
        return self.diffaccel_processor(
            attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
            ip_hidden_states=ip_hidden_states,
        )


register_processor_wrapper("FluxIPAdapterAttnProcessor", DiffAccelFluxIPAdapterAttnProcessor)


def _single_stream_text_len(ctx: RunContext, num_tokens: int, joint_text_len: int | None) -> int:
    """Text tokens at the front of a single-stream call: from the hook, else from the last double-stream call."""
    text_len = ctx.text_len if ctx.text_len is not None else joint_text_len
    if text_len is None:
        raise LayoutError(
            f"cannot tell how many of the {num_tokens} tokens of a FLUX single-stream attention call are text: no "
            "double-stream block ran before it and no text length was recorded. Install the processor with "
            "diffaccel.apply(pipe, method), which reads it from encoder_hidden_states"
        )
    if not 0 <= text_len < num_tokens:
        raise LayoutError(
            f"FLUX single-stream attention call has {num_tokens} tokens but the text length is {text_len}"
        )
    return int(text_len)


def flux_grid(img_ids: torch.Tensor, num_visual: int) -> tuple[int, int]:
    """The ``(rows, cols)`` latent grid that FLUX's image position ids describe, row-major like the packed latents.

    ``img_ids`` is ``(tokens, 3)`` (or the deprecated ``(batch, tokens, 3)``) with the row index in column 1 and
    the column index in column 2, as ``FluxPipeline._prepare_latent_image_ids`` builds it.
    """
    ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    if ids.ndim != 2 or ids.shape[-1] < 3:
        raise LayoutError(f"img_ids must be shaped (tokens, 3) or (batch, tokens, 3), got {tuple(img_ids.shape)}")
    if ids.shape[0] != num_visual:
        raise LayoutError(f"img_ids has {ids.shape[0]} positions but hidden_states has {num_visual} image tokens")
    rows = int(torch.unique(ids[:, 1]).numel())
    cols = int(torch.unique(ids[:, 2]).numel())
    if rows * cols != num_visual:
        raise LayoutError(
            f"img_ids do not form one image grid: {rows} distinct rows x {cols} distinct columns != {num_visual} "
            "tokens (several images in one sequence, as FLUX Kontext's reference latents, are not supported)"
        )
    row_ids, col_ids = ids[:, 1].reshape(rows, cols), ids[:, 2].reshape(rows, cols)
    row_major = torch.equal(row_ids, row_ids[:, :1].expand_as(row_ids)) and torch.equal(
        col_ids, col_ids[:1].expand_as(col_ids)
    )
    if not row_major:
        raise LayoutError("img_ids are not in row-major order (rows in column 1, columns in column 2)")
    return rows, cols


_GRIDS = TensorMemo()
"""``flux_grid`` per ``img_ids`` object: the pipeline builds the ids once per run and passes them to every step, so
only the first denoiser call of a run reads them (``torch.unique``/``torch.equal`` synchronise with the device)."""


def _flux_grid_or_none(img_ids: torch.Tensor, num_visual: int) -> tuple[int, int] | None:
    """:func:`flux_grid`, or ``None`` when the ids are not one row-major grid (the call's grid is then unknown)."""
    try:
        return flux_grid(img_ids, num_visual)
    except LayoutError:
        return None


def _read_flux_inputs(model: torch.nn.Module, args: dict[str, Any]) -> tuple[tuple[int, int] | None, int | None]:
    """Grid from ``img_ids`` when they form one row-major grid, else ``None``: the stock model runs any ids (tests
    pass random ones, Kontext appends reference latents), so an unreadable grid never refuses the forward; the
    adapters mark the layout unknown and methods that need a grid fall back to dense (or raise when strict)."""
    img_ids = args.get("img_ids")
    hidden_states = args.get("hidden_states")
    encoder_hidden_states = args.get("encoder_hidden_states")
    text_len = None if encoder_hidden_states is None else int(encoder_hidden_states.shape[1])
    if img_ids is None or hidden_states is None or hidden_states.ndim != 3:
        return None, text_len
    num_visual = int(hidden_states.shape[1])
    if torch.compiler.is_compiling():  # no value reads while tracing: the announced grid, checked against shapes
        return _announced_grid(model, img_ids, num_visual), text_len
    return _GRIDS.get(img_ids, lambda ids: _flux_grid_or_none(ids, num_visual)), text_len


def _announced_grid(model: torch.nn.Module, img_ids: torch.Tensor, num_visual: int) -> tuple[int, int]:
    """The grid under ``torch.compile``: announced as Python ints (by the pipeline's ``_prepare_latent_image_ids``
    that :func:`diffaccel.apply` wraps, or by ``diffaccel.set_grid``) and checked against the SHAPES of ``img_ids``
    and ``hidden_states``; reading the ids' values would be a data-dependent guard."""
    grid = model.__dict__.get("_diffaccel_grid")
    positions = img_ids.shape[-2] if img_ids.ndim in (2, 3) else -1
    if grid is None or len(grid) != 2 or grid[0] * grid[1] != num_visual or positions != num_visual:
        raise LayoutError(
            f"under torch.compile the FLUX latent grid is not read from img_ids values (a data-dependent guard), "
            f"and the announced grid {grid} does not describe this call ({num_visual} image tokens, img_ids shaped "
            f"{tuple(img_ids.shape)}): run the compiled transformer through its pipeline after diffaccel.apply(pipe, "
            "...), which records the grid, or call diffaccel.set_grid(transformer, (rows, cols)) before calling it"
        )
    return grid


register_family(
    ModelFamily(
        name="flux",
        model_classes=("FluxTransformer2DModel",),
        read_inputs=_read_flux_inputs,
        description="FLUX.1 (double-stream joint attention and single-stream blocks, text tokens first)",
    )
)
