"""Named processors: :class:`DiffAccelAttnProcessor` with the method preset.

    pipe.unet.set_attn_processor(AgentAttnProcessor())
    pipe.transformer.set_attn_processor(GNAAttnProcessor(kernel_size=(20, 20), stride=(4, 4)))
    diffaccel.apply(pipe, GNAAttnProcessor(kernel_size=(20, 20)))   # also records the grid and the step

Each takes the method's configuration fields as keywords (see ``diffaccel methods``).
"""

from __future__ import annotations

import weakref
from typing import Any, ClassVar

import torch

from diffaccel.context import RunContext
from diffaccel.pipelines.model_setup import model_setup_for
from diffaccel.pipelines.processor import DiffAccelAttnProcessor


class _NamedProcessor(DiffAccelAttnProcessor):
    method_name: ClassVar[str] = ""

    def __init__(self, *, context: RunContext | None = None, **config: Any) -> None:
        super().__init__(self.method_name, context=context, **config)
        # built without arguments (diffusers' processor.__class__() rebuilds): defers to the installed processor
        self.rebuilt = context is None and not config

    def defers_to(self, installed: DiffAccelAttnProcessor) -> bool:
        return installed.method.name == self.method_name


class AgentAttnProcessor(_NamedProcessor):
    """Agent attention (Han et al., ECCV 2024) as a diffusers processor; see :mod:`diffaccel.methods.agent`.

    ``mode="agentsd"`` for SD/SDXL UNets (the AgentSD recipe), ``"pooled"`` for DiTs, ``"auto"`` picks per call.
    """

    method_name = "agent"

    def __init__(self, mode: str = "auto", *, context: RunContext | None = None, **config: Any) -> None:
        super().__init__(context=context, mode=mode, **config)
        self.rebuilt = context is None and not config and mode == "auto"


class GNAAttnProcessor(_NamedProcessor):
    """Generalized Neighborhood Attention (method ``gna``; NATTEN semantics, GNA paper presets)."""

    method_name = "gna"


class TileAttnProcessor(_NamedProcessor):
    """Efficient-vDiT attention tiles (method ``tile``; video models only)."""

    method_name = "tile"


class MSWAttnProcessor(_NamedProcessor):
    """HiDiffusion MSW-MSA shifted 2x2 windows (method ``msw``)."""

    method_name = "msw"


class ParoAttnProcessor(_NamedProcessor):
    """PAROAttention (method ``paro``): ``ParoAttnProcessor(plan="plan.safetensors", qk_int8=True)``; install it with
    :func:`diffaccel.apply` so the run context (grid, step) and the model check reach it."""

    method_name = "paro"


class ClearAttnProcessor(_NamedProcessor):
    """CLEAR circular local window (method ``clear``).

    Installed with a bare ``set_attn_processor`` after
    :func:`~diffaccel.pipelines.clear_weights.load_clear_weights`, it sees the distilled projections on the attention
    modules it runs and checks their radius: once per module (the method's registered
    :class:`~diffaccel.pipelines.model_setup.ModelSetup` ``note_module``), not on every call.
    """

    method_name = "clear"

    def __init__(self, *, context: RunContext | None = None, **config: Any) -> None:
        super().__init__(context=context, **config)
        self._noted: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()

    # diffusers passes a processor only the keywords its __call__ names, so this keeps the base signature.
    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
        rotary_emb: Any = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        if attn not in self._noted:
            entry = model_setup_for(self.method)
            if entry is not None and entry.note_module is not None:
                entry.note_module(self.method, attn)
            self._noted.add(attn)
        return super().__call__(
            attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, rotary_emb, temb, **kwargs
        )


__all__ = ["AgentAttnProcessor", "ClearAttnProcessor", "GNAAttnProcessor", "MSWAttnProcessor", "ParoAttnProcessor",
           "TileAttnProcessor"]
