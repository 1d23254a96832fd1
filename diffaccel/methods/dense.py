"""Dense attention through PyTorch SDPA: the exact baseline every other method is measured against."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffaccel.context import RunContext
from diffaccel.layout import TokenLayout
from diffaccel.methods.base import MethodBase, MethodConfig, register_method, sdpa


@dataclass
class DenseConfig(MethodConfig):
    """Dense attention has no parameters: it reproduces the stock diffusers processors."""


@register_method
class DenseMethod(MethodBase):
    """``F.scaled_dot_product_attention`` on every call, with the attention mask the model passes."""

    name = "dense"
    context_parallel = frozenset({"ulysses", "ring"})  # tested: tests/test_context_parallel.py
    config_class = DenseConfig
    needs_grid = False

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: TokenLayout,
        ctx: RunContext,
        *,
        attn_mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        return sdpa(q, k, v, attn_mask=attn_mask, scale=scale)
