"""HunyuanVideo attention (generic ``Attention`` with ``HunyuanVideoAttnProcessor2_0``).

Both block kinds attend over ``[video tokens, text tokens]``: text is a suffix of the sequence.

- Dual-stream blocks (``add_q_proj`` set): the video and text streams have their own projections and
  QK-norms; RoPE rotates the video stream; the text stream's q/k/v are appended after the video tokens.
- Single-stream blocks (``pre_only``, no ``add_q_proj``): the block passes the two halves of one normalised
  sequence; the processor concatenates them back, projects once, and rotates only the video part.

The prompt padding mask (``[B, 1, 1, N]`` boolean) is passed to the method as ``attn_mask`` (so dense stays
exactly stock) and described by ``TokenLayout.text_lengths`` (valid text tokens per batch row), which methods
read instead of the mask. The model rebuilds that mask at every forward as ``key < num_video + L_b`` with
``L_b = encoder_attention_mask[b].sum()``, so under :func:`diffaccel.apply` the lengths come from the forward's
``encoder_attention_mask`` (read once per mask object: the pipeline passes the same one at every step); without
the hook, from the call's mask (read once per mask object; ``None`` when it is not pure trailing padding). The token refiner
in front of the blocks runs ``AttnProcessor2_0`` on text tokens alone; the family marks it text-only so the
UNet adapter keeps it grid-less (dense).

Mirrors ``diffusers.models.transformers.transformer_hunyuan_video.HunyuanVideoAttnProcessor2_0``.
Kong et al., "HunyuanVideo: A Systematic Framework For Large Video Generative Models" (2024).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.embeddings import apply_rotary_emb

from diffaccel.context import RunContext
from diffaccel.layout import TokenLayout
from diffaccel.pipelines.adapters.base import (
    Adapter,
    AttentionCall,
    ModelFamily,
    Projected,
    TensorMemo,
    merge_heads,
    patchified_video_grid,
    register_adapter,
    register_family,
    register_processor_inference,
    grid_or_unknown,
)
from diffaccel.pipelines.adapters.padding import trailing_padding_lengths


@dataclass(frozen=True)
class HunyuanVideoCarry:
    """What :meth:`HunyuanVideoAttentionAdapter.finish` needs: the text tokens at the end of the joint output
    (``num_text``; ``has_text`` False for calls without text) and the projections' dtype."""

    num_text: int
    has_text: bool
    dtype: torch.dtype


def _rotate_video_part(x: torch.Tensor, rotary: Any, num_text: int) -> torch.Tensor:
    """RoPE on the video tokens of ``x`` (``(batch, tokens, heads, head_dim)``); the last ``num_text`` stay as they are."""
    if num_text == 0:
        return apply_rotary_emb(x, rotary, sequence_dim=1)
    return torch.cat([apply_rotary_emb(x[:, :-num_text], rotary, sequence_dim=1), x[:, -num_text:]], dim=1)


@register_adapter
class HunyuanVideoAttentionAdapter(Adapter):
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

    def project(self, attn: torch.nn.Module, call: AttentionCall, ctx: RunContext) -> Projected:
        hidden_states = call.hidden_states
        text = call.encoder_hidden_states
        single_stream = attn.add_q_proj is None
        num_text = 0 if text is None else text.shape[1]
        if single_stream and text is not None:
            hidden_states = torch.cat([hidden_states, text], dim=1)

        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if call.image_rotary_emb is not None:
            # in a single-stream call the text is already inside the sequence: rotate only the video part
            in_sequence = num_text if single_stream else 0
            query = _rotate_video_part(query, call.image_rotary_emb, in_sequence)
            key = _rotate_video_part(key, call.image_rotary_emb, in_sequence)

        if not single_stream and text is not None:
            text_query = attn.add_q_proj(text).unflatten(2, (attn.heads, -1))
            text_key = attn.add_k_proj(text).unflatten(2, (attn.heads, -1))
            text_value = attn.add_v_proj(text).unflatten(2, (attn.heads, -1))
            if attn.norm_added_q is not None:
                text_query = attn.norm_added_q(text_query)
            if attn.norm_added_k is not None:
                text_key = attn.norm_added_k(text_key)
            query = torch.cat([query, text_query], dim=1)
            key = torch.cat([key, text_key], dim=1)
            value = torch.cat([value, text_value], dim=1)

        query, key, value = (t.transpose(1, 2) for t in (query, key, value))
        num_tokens = query.shape[2]
        num_video = num_tokens - num_text
        grid, _, unknown = grid_or_unknown(ctx, num_video, video=True)
        layout = TokenLayout(
            num_tokens=num_tokens,
            grid=grid,
            unknown=unknown,
            text=slice(num_video, num_tokens) if text is not None else None,
            text_lengths=self.text_lengths(ctx, call.attention_mask, query.shape[0], num_video, num_text),
        )
        return Projected(
            query, key, value, layout, attn_mask=call.attention_mask,
            carry=HunyuanVideoCarry(num_text=num_text, has_text=text is not None, dtype=query.dtype),
        )

    def finish(self, attn: torch.nn.Module, out: torch.Tensor, projected: Projected) -> Any:
        carry: HunyuanVideoCarry = projected.carry
        hidden_states = merge_heads(out).to(carry.dtype)
        if not carry.has_text:
            return hidden_states, None
        num_text = carry.num_text
        hidden_states, text = hidden_states[:, :-num_text], hidden_states[:, -num_text:]
        if getattr(attn, "to_out", None) is not None:
            hidden_states = attn.to_out[0](hidden_states)
            hidden_states = attn.to_out[1](hidden_states)
        if getattr(attn, "to_add_out", None) is not None:
            text = attn.to_add_out(text)
        return hidden_states, text


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
