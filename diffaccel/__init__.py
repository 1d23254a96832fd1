"""diffaccel: drop-in accelerated attention for diffusers pipelines.

    import diffaccel
    diffaccel.apply(pipe, "dense")            # any registered method name, instance or processor
    pipe.transformer.set_attn_processor(diffaccel.DiffAccelAttnProcessor("dense"))
    diffaccel.remove(pipe)                    # stock diffusers processors again

The names below are imported on first use (PEP 562 module ``__getattr__``), so ``import diffaccel`` and the
``diffaccel`` command's ``--help`` do not import torch; ``from diffaccel import apply`` works as before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "functional": "diffaccel.functional",
    "RunContext": "diffaccel.context",
    "ConfigError": "diffaccel.errors",
    "DiffAccelError": "diffaccel.errors",
    "LayoutError": "diffaccel.errors",
    "ModelLoadError": "diffaccel.errors",
    "UnknownMethodError": "diffaccel.errors",
    "UnsupportedModelError": "diffaccel.errors",
    "TokenLayout": "diffaccel.layout",
    "AttentionMethod": "diffaccel.methods.base",
    "MethodConfig": "diffaccel.methods.base",
    "get_method": "diffaccel.methods.base",
    "list_methods": "diffaccel.methods.base",
    "method_parameters": "diffaccel.methods.base",
    "apply": "diffaccel.pipelines.hooks",
    "remove": "diffaccel.pipelines.hooks",
    "set_grid": "diffaccel.pipelines.hooks",
    "DiffAccelAttnProcessor": "diffaccel.pipelines.processor",
    "disable_softpag": "diffaccel.pipelines.guidance",
    "enable_softpag": "diffaccel.pipelines.guidance",
    "AgentAttnProcessor": "diffaccel.pipelines.named_processors",
    "ClearAttnProcessor": "diffaccel.pipelines.named_processors",
    "GNAAttnProcessor": "diffaccel.pipelines.named_processors",
    "MSWAttnProcessor": "diffaccel.pipelines.named_processors",
    "ParoAttnProcessor": "diffaccel.pipelines.named_processors",
    "TileAttnProcessor": "diffaccel.pipelines.named_processors",
}
"""Public name -> the module that defines it (imported when the name is first read)."""

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'diffaccel' has no attribute {name!r}")
    imported = importlib.import_module(module)
    value = imported if module == f"diffaccel.{name}" else getattr(imported, name)
    globals()[name] = value  # later reads skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # static checkers and IDEs see the eager imports
    from diffaccel import functional
    from diffaccel.context import RunContext
    from diffaccel.errors import (
        ConfigError,
        DiffAccelError,
        LayoutError,
        ModelLoadError,
        UnknownMethodError,
        UnsupportedModelError,
    )
    from diffaccel.layout import TokenLayout
    from diffaccel.methods.base import AttentionMethod, MethodConfig, get_method, list_methods, method_parameters
    from diffaccel.pipelines.guidance import disable_softpag, enable_softpag
    from diffaccel.pipelines.hooks import apply, remove, set_grid
    from diffaccel.pipelines.named_processors import (
        AgentAttnProcessor,
        ClearAttnProcessor,
        GNAAttnProcessor,
        MSWAttnProcessor,
        ParoAttnProcessor,
        TileAttnProcessor,
    )
    from diffaccel.pipelines.processor import DiffAccelAttnProcessor
