"""Text placement helpers: where the text tokens of a joint-attention call sit, as a kernel :class:`TextSpec`.

SD3 and HunyuanVideo put text after the visual tokens (a suffix), FLUX and CogVideoX before (a prefix); Wan's
self-attention has none. Text rows and columns are dense in every locality mask.
"""

from __future__ import annotations

from typing import Any

from diffaccel.errors import ConfigError
from diffaccel.kernels.masks import TextSpec
from diffaccel.layout import TokenLayout

__all__ = ["layout_text_spec", "text_spec_for"]


def text_spec_for(text: Any, num_tokens: int, num_visual: int, *, name: str = "text") -> TextSpec | None:
    """The :class:`TextSpec` of ``text`` (a prefix/suffix slice, a TextSpec or None) in a ``num_tokens`` sequence.

    The sequence holds ``num_visual`` visual tokens; the rest must be exactly the text tokens.
    """
    num_text = num_tokens - num_visual
    if num_text < 0:
        raise ConfigError(f"the grid holds {num_visual} tokens but the sequence has only {num_tokens}")
    if text is None:
        if num_text:
            raise ConfigError(
                f"the sequence has {num_tokens} tokens but the grid holds {num_visual}: pass {name}= a slice "
                f"(prefix slice(0, {num_text}) or suffix slice({num_visual}, {num_tokens})) for the other {num_text}"
            )
        return None
    if isinstance(text, TextSpec):
        spec = text
    elif isinstance(text, slice):
        if text.step not in (None, 1):
            raise ConfigError(f"{name} must be a contiguous slice, got {text!r}")
        start, stop, _ = text.indices(num_tokens)
        stop = max(stop, start)
        if start == 0 and stop == num_text:
            spec = TextSpec(stop - start, "prefix")
        elif stop == num_tokens and start == num_visual:
            spec = TextSpec(stop - start, "suffix")
        else:
            raise ConfigError(
                f"{name}={text!r} must be the prefix slice(0, {num_text}) or the suffix slice({num_visual}, "
                f"{num_tokens}) of the {num_tokens} tokens (the grid holds {num_visual})"
            )
    else:
        raise ConfigError(f"{name} must be a slice, a TextSpec or None, got {type(text).__name__}")
    if spec.length != num_text:
        raise ConfigError(
            f"{name} has {spec.length} tokens but the sequence has {num_tokens} tokens and the grid {num_visual}"
        )
    return spec if spec.length else None


def layout_text_spec(layout: TokenLayout) -> TextSpec | None:
    """The text tokens of an attention call's layout as a :class:`TextSpec` (None without text)."""
    if layout.num_text == 0:
        return None
    return TextSpec(layout.num_text, "prefix" if layout.text_first else "suffix")
