"""Test helpers around a method instance: fill the layout fields the adapters own, record calls for a reference.

``AdapterFields`` fills ``TokenLayout.downsample``/``hierarchical`` (UNet levels) and ``text_lengths`` (padded
prompts) the way the adapters fill them, where a tiny model's adapter left them at their defaults; where the adapter
already set them the layout passes unchanged. ``Recorder`` keeps the inputs and output of a method's grid calls so
that a test can recompute them with an independent reference.
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from diffaccel.context import RunContext
from diffaccel.layout import TokenLayout


class AdapterFields:
    def __init__(self, method, *, unet=False):
        self.method, self.unet = method, unet
        self.name, self.config = method.name, method.config

    def __call__(self, q, k, v, layout: TokenLayout, ctx: RunContext, *, attn_mask=None, scale=None):
        changes = {}
        if self.unet and layout.has_grid and not layout.hierarchical and ctx.grid is not None:
            changes.update(downsample=ctx.grid[0] // layout.grid[0], hierarchical=True)
        if attn_mask is not None and layout.text_lengths is None and layout.num_text and not layout.text_first:
            keep = attn_mask.reshape(attn_mask.shape[0], -1)
            keep = keep.bool() if keep.dtype == torch.bool else keep == 0
            changes["text_lengths"] = tuple(int(n) for n in keep[:, layout.num_visual:].sum(1))
        if changes:
            layout = dataclasses.replace(layout, **changes)
        return self.method(q, k, v, layout, ctx, attn_mask=attn_mask, scale=scale)


class Recorder:
    """Calls ``method`` and records ``(q, k, v, layout, ctx, scale, out)`` of up to ``limit`` self/joint grid calls
    (without mask) for which ``when(layout, ctx)`` holds."""

    def __init__(self, method, *, limit=4, when=lambda layout, ctx: True):
        self.method, self.limit, self.when = method, limit, when
        self.name, self.config = method.name, method.config
        self.calls = []

    def __call__(self, q, k, v, layout: TokenLayout, ctx: RunContext, *, attn_mask=None, scale=None):
        out = self.method(q, k, v, layout, ctx, attn_mask=attn_mask, scale=scale)
        if (len(self.calls) < self.limit and attn_mask is None and layout.has_grid and k.shape[2] == q.shape[2]
                and self.when(layout, ctx)):
            self.calls.append((q.clone(), k.clone(), v.clone(), layout, copy.copy(ctx), scale, out.clone()))
        return out
