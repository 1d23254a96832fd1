"""FLUX.2 (``Flux2Transformer2DModel``, also its Klein variants): routed through the stock processors.

Double-stream blocks (``Flux2AttnProcessor``) put the text tokens first (``[text, image]``); single-stream blocks
(``Flux2ParallelSelfAttnProcessor``) receive text and image already concatenated, text first. The grid is read from
the 4-axis position ids ``img_ids`` (``t, h, w, l``) the pipeline builds. Reference images of edit runs are appended
to the image tokens with their own ``t``: such calls have no single grid and run dense (said once). The KV-cache
processors (``Flux2KV*``) are not routed: an unsupported-processor error names the supported ones.

Black Forest Labs, FLUX.2 (2025), https://bfl.ai/blog/flux-2.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from diffusers.models.transformers.transformer_flux2 import Flux2AttnProcessor, Flux2ParallelSelfAttnProcessor

from diffaccel.context import RunContext
from diffaccel.errors import LayoutError
from diffaccel.layout import Grid, TokenLayout
from diffaccel.pipelines.adapters.base import AttentionCall, ModelFamily, TensorMemo, register_adapter, register_family
from diffaccel.pipelines.adapters.dispatch import RoutedAdapter, grid_or_none, joint_layout, prepare_routed


@register_adapter
class Flux2Adapter(RoutedAdapter):
    """Both FLUX.2 processors: ``[text, image]`` joint attention; the text length from the call or the hook."""

    family = "flux2"
    stock_processors = ("Flux2AttnProcessor", "Flux2ParallelSelfAttnProcessor")
    positional_calls = {"Flux2ParallelSelfAttention": ("attention_mask", "image_rotary_emb")}

    def __init__(self) -> None:
        self._joint_text_len: weakref.WeakKeyDictionary[RunContext, int] = weakref.WeakKeyDictionary()

    def layout(self, attn: torch.nn.Module, call: AttentionCall, ctx: RunContext, query: torch.Tensor,
               key: torch.Tensor, attn_mask: torch.Tensor | None, index: int) -> tuple[TokenLayout, Any]:
        num_tokens = query.shape[1]
        if call.encoder_hidden_states is not None:
            num_text = int(call.encoder_hidden_states.shape[1])
            self._joint_text_len[ctx] = num_text
        elif ctx.text_len is not None:
            num_text = int(ctx.text_len)
        elif ctx in self._joint_text_len:  # no hook (bare set_attn_processor): the last double-stream call's
            num_text = self._joint_text_len[ctx]
        else:
            raise LayoutError(
                f"cannot tell how many of the {num_tokens} tokens of a FLUX.2 single-stream attention call are text; "
                "install the processor with diffaccel.apply(pipe, method), which reads it from encoder_hidden_states"
            )
        if not 0 <= num_text <= num_tokens:
            raise LayoutError(f"FLUX.2 attention call has {num_tokens} tokens but the text length is {num_text}")
        grid = grid_or_none(ctx, num_tokens - num_text, "FLUX.2")
        return joint_layout(num_tokens, grid, num_text, text_first=True), attn_mask


def grid_from_ids(ids: torch.Tensor, num_visual: int, *, row_axis: int, col_axis: int, time_axis: int | None,
                  model: str) -> Grid | None:
    """``(rows, cols)`` of row-major position ids (one row per token); ``None`` when the tokens hold several images
    (distinct time ids: reference images) or ids that are not one row-major grid."""
    if ids.ndim == 3:
        ids = ids[0]
    if ids.ndim != 2 or ids.shape[0] != num_visual:
        raise LayoutError(f"{model} position ids of shape {tuple(ids.shape)} do not match {num_visual} image tokens")
    if time_axis is not None and int(torch.unique(ids[:, time_axis]).numel()) != 1:
        return None
    rows = int(torch.unique(ids[:, row_axis]).numel())
    cols = int(torch.unique(ids[:, col_axis]).numel())
    if rows * cols != num_visual:
        return None
    r, c = ids[:, row_axis].reshape(rows, cols), ids[:, col_axis].reshape(rows, cols)
    if not (torch.equal(r, r[:, :1].expand_as(r)) and torch.equal(c, c[:1].expand_as(c))):
        return None
    return rows, cols


class ReadIdsGrid:
    """``read_inputs`` of the families whose transformer takes 4-axis ``(t, h, w, l)`` position ids (FLUX.2, FLUX.3):
    the grid from ``img_ids`` (:func:`grid_from_ids`, memoised per ids tensor; ``None`` when they are no single grid)
    and the text length from the encoder states. An object rather than a closure, so it pickles with its family."""

    def __init__(self, model: str) -> None:
        self.model = model
        self._grids = TensorMemo()

    def __call__(self, model: torch.nn.Module, args: dict[str, Any]) -> tuple[Grid | None, int | None]:
        img_ids = args.get("img_ids")
        num_visual = int(args["hidden_states"].shape[1])
        grid = None
        if img_ids is not None:
            grid = self._grids.get(img_ids, lambda ids: grid_from_ids(ids, num_visual, row_axis=1, col_axis=2,
                                                                      time_axis=0, model=self.model))
        text = args.get("encoder_hidden_states")
        return grid, None if text is None else int(text.shape[1])


_read_flux2_inputs = ReadIdsGrid("FLUX.2")


register_family(
    ModelFamily(
        name="flux2",
        model_classes=("Flux2Transformer2DModel",),
        read_inputs=_read_flux2_inputs,
        description="FLUX.2 / FLUX.2 Klein (double-stream joint attention and parallel single-stream blocks, text "
        "tokens first; reference-image calls dense)",
    )
)

prepare_routed(Flux2AttnProcessor, Flux2ParallelSelfAttnProcessor)
