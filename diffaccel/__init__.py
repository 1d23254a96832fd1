"""diffaccel: drop-in accelerated attention for diffusers pipelines.

    import diffaccel
    diffaccel.apply(pipe, "dense")            # any registered method name, instance or processor
    pipe.transformer.set_attn_processor(diffaccel.DiffAccelAttnProcessor("dense"))
    diffaccel.remove(pipe)                    # stock diffusers processors again
"""

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
from diffaccel.pipelines.hooks import apply, remove
from diffaccel.pipelines.processor import DiffAccelAttnProcessor
from diffaccel.pipelines.guidance import disable_softpag, enable_softpag
from diffaccel.pipelines.named_processors import (
    AgentAttnProcessor,
    ClearAttnProcessor,
    GNAAttnProcessor,
    MSWAttnProcessor,
    ParoAttnProcessor,
    TileAttnProcessor,
)

__version__ = "0.1.0"

__all__ = [
    "AgentAttnProcessor",
    "AttentionMethod",
    "ClearAttnProcessor",
    "GNAAttnProcessor",
    "MSWAttnProcessor",
    "ParoAttnProcessor",
    "TileAttnProcessor",
    "functional",
    "ConfigError",
    "DiffAccelAttnProcessor",
    "DiffAccelError",
    "LayoutError",
    "MethodConfig",
    "ModelLoadError",
    "RunContext",
    "TokenLayout",
    "UnknownMethodError",
    "UnsupportedModelError",
    "__version__",
    "apply",
    "disable_softpag",
    "enable_softpag",
    "get_method",
    "list_methods",
    "method_parameters",
    "remove",
]
