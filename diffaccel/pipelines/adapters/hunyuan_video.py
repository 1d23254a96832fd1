"""HunyuanVideo (``HunyuanVideoTransformer3DModel``): routed through the stock ``HunyuanVideoAttnProcessor2_0``.

diffusers' processor runs as is; only its ``dispatch_attention_fn`` call reaches the method (``adapters/dispatch.py``,
docs/adapters.md). Both block kinds attend over ``[video tokens, text tokens]``: text is a *suffix* of the sequence.

- Dual-stream blocks (``add_q_proj`` set): the video and text streams have their own projections and
  QK-norms; RoPE rotates the video stream; the text stream's q/k/v are appended after the video tokens.
- Single-stream blocks (``pre_only``, no ``add_q_proj``): the block passes the two halves of one normalised
  sequence; the processor concatenates them back, projects once, and rotates only the video part.

This module holds the layout of that call. The prompt padding mask (``[B, 1, 1, N]`` boolean) is passed to the
method as ``attn_mask``, as the stock processor passes it (so dense stays exactly stock), and described by
``TokenLayout.text_lengths`` (valid text tokens per batch row), which methods read instead of the mask. The model
rebuilds that mask at every forward as ``key < num_video + L_b`` with ``L_b = encoder_attention_mask[b].sum()``, so
under :func:`diffaccel.apply` the lengths come from the forward's ``encoder_attention_mask`` (``begin_forward``: read
once per mask object, the pipeline passes the same one at every step); without the hook, from the call's mask (read
once per mask object; ``None`` when it is not pure trailing padding). The token refiner in front of the blocks runs
``AttnProcessor2_0`` on text tokens alone; the family marks it text-only so the UNet adapter keeps it grid-less
(dense).

Kong et al., "HunyuanVideo: A Systematic Framework For Large Video Generative Models" (2024).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

from diffaccel.context import RunContext
from diffaccel.layout import TokenLayout
from diffaccel.pipelines.adapters.base import (
    AttentionCall,
    ModelFamily,
    TensorMemo,
    grid_or_unknown,
    patchified_video_grid,
    register_adapter,
    register_family,
    register_processor_inference,
)
from diffaccel.pipelines.adapters.dispatch import RoutedAdapter, prepare_routed
from diffaccel.pipelines.adapters.padding import trailing_padding_lengths


@register_adapter
class HunyuanVideoAttentionAdapter(RoutedAdapter):
    """``HunyuanVideoAttnProcessor2_0``: dual-stream and single-stream joint attention, text after video."""

    family = "hunyuan_video"
    stock_processors = ("HunyuanVideoAttnProcessor2_0",)

    def __init__(self) -> None:
        self._lengths = TensorMemo()  # text_lengths per mask object: one host read per new mask

    def text_lengths(
        self, ctx: RunContext, attn_mask: torch.Tensor | None, batch: int, num_visual: int, num_text: int
    ) -> tuple[int, ...] | None:
        """``TokenLayout.text_lengths`` of a joint call's prompt mask; ``None`` for no mask, or a mask that is not
        one row of trailing padding per batch row.

        From the forward's prompt lengths when the run hook recorded them (no read at all), else from the mask
        (memoized on the mask object).
        """
        if attn_mask is None or num_text == 0 or attn_mask.shape[0] != batch:
            return None
        lengths = _FORWARD_LENGTHS.get(ctx)
        if (
            lengths is not None and len(lengths) == batch and attn_mask.dtype == torch.bool
            and tuple(attn_mask.shape) == (batch, 1, 1, num_visual + num_text)
        ):
            return tuple(min(n, num_text) for n in lengths)
        return self._lengths.get(attn_mask, lambda m: trailing_padding_lengths(m, num_visual, num_text))

    def layout(self, attn: torch.nn.Module, call: AttentionCall, ctx: RunContext, query: torch.Tensor,
               key: torch.Tensor, attn_mask: torch.Tensor | None, index: int) -> tuple[TokenLayout, Any]:
        text = call.encoder_hidden_states
        num_tokens = query.shape[1]
        num_text = 0 if text is None else text.shape[1]
        num_video = num_tokens - num_text
        grid, _, unknown = grid_or_unknown(ctx, num_video, video=True)
        layout = TokenLayout(
            num_tokens=num_tokens,
            grid=grid,
            unknown=unknown,
            text=slice(num_video, num_tokens) if text is not None else None,
            text_lengths=self.text_lengths(ctx, attn_mask, query.shape[0], num_video, num_text),
        )
        return layout, attn_mask


def _read_hunyuan_video_inputs(model: torch.nn.Module, args: dict[str, Any]) -> tuple[tuple[int, int, int], int]:
    patch = (model.config.patch_size_t, model.config.patch_size, model.config.patch_size)
    grid = patchified_video_grid(args["hidden_states"], patch, frames_dim=2, model=type(model).__name__)
    return grid, int(args["encoder_hidden_states"].shape[1])


_PROMPT_LENGTHS = TensorMemo()
_FORWARD_LENGTHS: weakref.WeakKeyDictionary[RunContext, tuple[int, ...] | None] = weakref.WeakKeyDictionary()


def _prompt_lengths(encoder_attention_mask: torch.Tensor) -> tuple[int, ...]:
    """``L_b``: what the model counts as valid text per row (its joint mask keeps keys ``< num_video + L_b``)."""
    return tuple(int(n) for n in encoder_attention_mask.sum(dim=1, dtype=torch.int).tolist())


def _begin_hunyuan_forward(model: torch.nn.Module, args: dict[str, Any], ctx: RunContext) -> None:
    """Record this forward's prompt lengths for the joint calls (one host read per new prompt mask object)."""
    mask = args.get("encoder_attention_mask")
    valid = isinstance(mask, torch.Tensor) and mask.ndim == 2
    _FORWARD_LENGTHS[ctx] = _PROMPT_LENGTHS.get(mask, _prompt_lengths) if valid else None


register_family(
    ModelFamily(
        name="hunyuan_video",
        model_classes=("HunyuanVideoTransformer3DModel",),
        read_inputs=_read_hunyuan_video_inputs,
        description="HunyuanVideo (dual- and single-stream joint attention, text tokens after video tokens)",
        text_only_modules=("context_embedder",),  # the token refiner attends over the prompt alone
        begin_forward=_begin_hunyuan_forward,
    )
)


def _video_rotary(call: AttentionCall) -> bool:
    """True when the call carries a real ``(cos, sin)`` RoPE pair over exactly the video tokens it passes."""
    rotary = call.image_rotary_emb
    if not isinstance(rotary, (tuple, list)) or len(rotary) != 2:
        return False
    cos = rotary[0]
    return (
        isinstance(cos, torch.Tensor) and not cos.is_complex() and cos.ndim == 2
        and cos.shape[0] == call.hidden_states.shape[1]
    )


@register_processor_inference(priority=20)
def _hunyuan_video_attention(attn: torch.nn.Module, call: AttentionCall | None) -> str | None:
    """A generic ``Attention`` called with text and a real RoPE pair over its video tokens runs HunyuanVideo's processor.

    Dual-stream modules are built like SD3.5's joint ones (``added_kv_proj_dim``, ``context_pre_only=False``)
    but SD3 never passes rotary embeddings; single-stream modules are ``pre_only`` with no text projections.
    Without the call, no guess.
    """
    if type(attn).__name__ != "Attention" or call is None or call.encoder_hidden_states is None:
        return None
    if not _video_rotary(call):
        return None
    dual = attn.added_kv_proj_dim is not None and attn.context_pre_only is False and attn.add_q_proj is not None
    single = attn.added_kv_proj_dim is None and attn.pre_only and attn.context_pre_only is None
    return "HunyuanVideoAttnProcessor2_0" if dual or single else None


prepare_routed(HunyuanVideoAttnProcessor2_0)
