"""FLUX.1 attention (``FluxAttention`` with ``FluxAttnProcessor``): double- and single-stream blocks, routed.

Double-stream blocks project text with their own (``add_*``) projections and put the text tokens first;
single-stream blocks receive text and image already concatenated (text first). The stock processor runs as it is
(``adapters/dispatch.py``); this module holds the layout, the grid read from ``img_ids`` and the IP-adapter wrapper.

Black Forest Labs, FLUX.1 (2024), https://github.com/black-forest-labs/flux.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, FluxIPAdapterAttnProcessor

from diffaccel.context import RunContext
from diffaccel.errors import LayoutError
from diffaccel.layout import TokenLayout
from diffaccel.pipelines.adapters.base import (
    AttentionCall,
    ModelFamily,
    TensorMemo,
    grid_or_unknown,
    register_adapter,
    register_family,
    register_processor_wrapper,
)
from diffaccel.pipelines.adapters.dispatch import RoutedAdapter, prepare_routed

@register_adapter
class FluxAdapter(RoutedAdapter):
    """FLUX.1's processors, routed: the stock ``FluxAttnProcessor`` / ``FluxIPAdapterAttnProcessor`` run as they are
    (projections, fused QKV, QK-norm, RoPE, output projections, IP-adapter branch); the adapter gives the layout.

    Dispatch call 0 is the joint attention (``[text, image]``, text first; single-stream blocks: the text length
    from the hook or the last double-stream call); calls 1... are the IP-adapter attentions of the image queries to
    the image-prompt tokens (``FluxIPAdapterAttnProcessor``), kept stock (diffusers' dispatcher, dense). A grid that the
    run's ``img_ids`` do not give (random ids, Kontext reference latents) marks the layout unknown: dense runs as
    stock, methods that need a grid fall back to dense (said once) or raise under ``strict=True``.
    """

    family = "flux"
    stock_processors = ("FluxAttnProcessor", "FluxIPAdapterAttnProcessor")

    def __init__(self) -> None:
        # Text length of the last double-stream call per run context, for the single-stream calls after it; needed
        # only without the diffaccel.apply hook (which sets ctx.text_len). FLUX bookkeeping, so it lives here.
        self._joint_text_len: weakref.WeakKeyDictionary[RunContext, int] = weakref.WeakKeyDictionary()

    def run_stock(self, attn: torch.nn.Module, call: AttentionCall, ctx: RunContext, method: Any,
                  slots: tuple[Any, ...] | None = None, **options: Any) -> Any:
        double_stream = attn.added_kv_proj_dim is not None
        if double_stream != (call.encoder_hidden_states is not None):
            raise LayoutError(
                f"FluxAttention {'with' if double_stream else 'without'} text projections (added_kv_proj_dim="
                f"{attn.added_kv_proj_dim}) was called {'without' if double_stream else 'with'} "
                "encoder_hidden_states; FluxAttnProcessor supports double-stream calls with text and single-stream "
                "calls without"
            )
        return super().run_stock(attn, call, ctx, method, slots, **options)

    def layout(self, attn: torch.nn.Module, call: AttentionCall, ctx: RunContext, query: torch.Tensor,
               key: torch.Tensor, attn_mask: torch.Tensor | None, index: int
               ) -> tuple[TokenLayout | None, torch.Tensor | None]:
        num_tokens = query.shape[1]
        if index > 0:  # IP-adapter: image queries (before RoPE) to the image-prompt tokens: stock (dense), as before
            return None, attn_mask
        if call.encoder_hidden_states is not None:
            num_text = int(call.encoder_hidden_states.shape[1])
            if not torch.compiler.is_compiling():  # traced, the store would guard on the dict (a recompile)
                self._joint_text_len[ctx] = num_text
        else:
            try:
                num_text = _single_stream_text_len(ctx, num_tokens, self._joint_text_len.get(ctx))
            except LayoutError as exc:  # dense needs no text length: the call runs, methods needing one fall back
                return TokenLayout(num_tokens=num_tokens, grid=None, unknown=str(exc)), _widened(attn_mask, query, key)
        grid, _, unknown = grid_or_unknown(ctx, num_tokens - num_text)
        layout = TokenLayout(num_tokens=num_tokens, grid=grid, text=slice(0, num_text), unknown=unknown)
        return layout, _widened(attn_mask, query, key)


def _widened(attn_mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
    """A ``(batch, keys)`` mask as ``(batch, 1, 1, keys)``, as diffusers' native attention backend widens it."""
    if attn_mask is not None and attn_mask.ndim == 2 and attn_mask.shape == (query.shape[0], key.shape[1]):
        return attn_mask[:, None, None, :]
    return attn_mask


class DiffAccelFluxIPAdapterAttnProcessor(FluxIPAdapterAttnProcessor):
    """A ``FluxIPAdapterAttnProcessor`` whose attention runs diffaccel's processor.

    It owns the original's ``to_k_ip``/``to_v_ip`` modules (the same objects, so ``state_dict`` keys, device moves
    and ``set_ip_adapter_scale`` behave as with the stock processor) and passes every call to the diffaccel
    processor, which runs the stock IP-adapter processor routed (:class:`FluxAdapter`). ``isinstance`` checks
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

prepare_routed(FluxAttnProcessor, FluxIPAdapterAttnProcessor)
