"""Adapters, one module per diffusers attention family. Importing this package registers all of them."""

from diffaccel.pipelines.adapters import unet  # noqa: F401
from diffaccel.pipelines.adapters import sd3  # noqa: F401
from diffaccel.pipelines.adapters import flux  # noqa: F401
from diffaccel.pipelines.adapters import wan  # noqa: F401
from diffaccel.pipelines.adapters import hunyuan_video  # noqa: F401
from diffaccel.pipelines.adapters import cogvideox  # noqa: F401
from diffaccel.pipelines.adapters import ltx  # noqa: F401
from diffaccel.pipelines.adapters.base import (
    Adapter,
    AttentionCall,
    ModelFamily,
    Projected,
    adapter_for,
    family_of,
    register_adapter,
    register_family,
    supported_families,
    supported_processors,
)

__all__ = [
    "Adapter",
    "AttentionCall",
    "ModelFamily",
    "Projected",
    "adapter_for",
    "family_of",
    "register_adapter",
    "register_family",
    "supported_families",
    "supported_processors",
]
