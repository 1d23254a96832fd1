"""Qwen-Image (``QwenImageTransformer2DModel``, also Qwen-Image-Edit): routed through the stock processor.

``QwenDoubleStreamAttnProcessor2_0`` attends over ``[text, image]``; a padded prompt comes with
``encoder_hidden_states_mask`` (``(batch, text)``, valid tokens first), which becomes the layout's per-row valid text
length, the processor's own joint mask staying the mask. The grid comes from ``img_shapes`` (``(frames, rows,
cols)`` per sample after the 2x2 packing). Edit runs pass several shapes per sample (the target and the
reference images in one sequence): those calls have no single grid and run dense (said once).

Qwen Team, Qwen-Image Technical Report (2025), arXiv:2508.02324.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

from diffaccel.context import RunContext
from diffaccel.layout import Grid, TokenLayout
from diffaccel.pipelines.adapters.base import AttentionCall, ModelFamily, register_processor_inference, register_adapter, register_family
from diffaccel.pipelines.adapters.dispatch import RoutedAdapter, grid_or_none, joint_layout, prefix_lengths, prepare_routed


@register_adapter
class QwenImageAdapter(RoutedAdapter):
    family = "qwenimage"
    stock_processors = ("QwenDoubleStreamAttnProcessor2_0",)

    def layout(self, attn: torch.nn.Module, call: AttentionCall, ctx: RunContext, query: torch.Tensor,
               key: torch.Tensor, attn_mask: torch.Tensor | None, index: int) -> tuple[TokenLayout, Any]:
        num_tokens = query.shape[1]
        num_text = int(call.encoder_hidden_states.shape[1])
        text_mask = call.extra.get("encoder_hidden_states_mask")
        lengths = None
        if text_mask is not None:
            lengths = prefix_lengths(text_mask)
            if lengths is not None and all(n == num_text for n in lengths):
                lengths = None  # nothing padded: the mask hides nothing
        grid = grid_or_none(ctx, num_tokens - num_text, "Qwen-Image")
        return joint_layout(num_tokens, grid, num_text, text_first=True, text_lengths=lengths), attn_mask


def qwen_grid(img_shapes: Any) -> Grid | None:
    """The token grid of ``img_shapes`` when every sample holds one image of the same shape, else ``None``."""
    if not img_shapes:
        return None
    shapes = {tuple(tuple(int(s) for s in shape) for shape in sample) if isinstance(sample, (list, tuple))
              and sample and isinstance(sample[0], (list, tuple)) else (tuple(int(s) for s in sample),)
              for sample in img_shapes}
    if len(shapes) != 1:
        return None
    (per_sample,) = shapes
    if len(per_sample) != 1:
        return None
    frames, rows, cols = per_sample[0]
    return (rows, cols) if frames == 1 else (frames, rows, cols)


def _read_qwen_inputs(model: torch.nn.Module, args: dict[str, Any]) -> tuple[Grid | None, int | None]:
    text = args.get("encoder_hidden_states")
    return qwen_grid(args.get("img_shapes")), None if text is None else int(text.shape[1])


register_family(
    ModelFamily(
        name="qwenimage",
        model_classes=("QwenImageTransformer2DModel",),
        read_inputs=_read_qwen_inputs,
        description="Qwen-Image / Qwen-Image-Edit (double-stream joint attention, text tokens first, padded-prompt "
        "masks; edit calls with reference images dense)",
    )
)

@register_processor_inference(priority=5)
def _infer_qwen(attn: torch.nn.Module, call: AttentionCall | None) -> str | None:
    """Qwen-Image's blocks run the generic ``Attention``; only its processor takes the prompt mask keyword."""
    if call is not None and "encoder_hidden_states_mask" in call.extra:
        return "QwenDoubleStreamAttnProcessor2_0"
    return None

prepare_routed(QwenDoubleStreamAttnProcessor2_0)
