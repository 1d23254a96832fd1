"""Prompt key-padding masks to per-row valid text lengths (``TokenLayout.text_lengths``), read once per mask.

HunyuanVideo pads its prompts and passes every attention call a ``(batch, 1, 1, tokens)`` boolean key mask that is
True on the video tokens and on the first ``L_b`` text tokens of row ``b`` (the text is a suffix of the sequence).
Methods need only the lengths; reading them from the mask is a host sync, so adapters memoize the conversion on
the mask object (:class:`~diffaccel.pipelines.adapters.base.TensorMemo`): the model builds the mask once per
forward and a pipeline usually passes the same prompt mask at every step.
"""

from __future__ import annotations

import torch


def trailing_padding_lengths(attn_mask: torch.Tensor, num_visual: int, num_text: int) -> tuple[int, ...] | None:
    """Valid text tokens per batch row when ``attn_mask`` only hides trailing text keys of a text suffix.

    Args:
        attn_mask: the call's mask, ``(batch, 1, 1, num_visual + num_text)``, boolean (True: attend) or additive
            float (0 or -inf).
        num_visual: visual tokens, first in the sequence.
        num_text: text tokens, after the visual ones.

    Returns:
        One length per batch row, as host ints, or ``None`` for any other mask (a hidden visual key, a hole in the
        text, per-query or per-head masks, finite additive biases), which methods then treat as a general mask.
        One device-to-host copy per call.
    """
    n = num_visual + num_text
    if num_text == 0 or attn_mask.dim() != 4 or tuple(attn_mask.shape[1:]) != (1, 1, n):
        return None
    if attn_mask.dtype == torch.bool:
        keep = attn_mask[:, 0, 0]
        valid_values = torch.ones((), dtype=torch.bool, device=attn_mask.device)
    elif attn_mask.is_floating_point():
        row = attn_mask[:, 0, 0]
        keep = row == 0
        valid_values = ((row == 0) | torch.isneginf(row)).all()
    else:
        return None
    text_keep = keep[:, num_visual:]
    lengths = text_keep.sum(dim=1)
    prefix = torch.arange(num_text, device=keep.device).unsqueeze(0) < lengths.unsqueeze(1)
    valid = valid_values & keep[:, :num_visual].all() & torch.eq(prefix, text_keep).all()
    values = torch.cat([lengths.to(torch.int64), valid.to(torch.int64).reshape(1)]).tolist()  # the one host read
    if not values[-1]:
        return None
    return tuple(int(v) for v in values[:-1])
