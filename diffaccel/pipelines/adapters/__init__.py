"""Adapters, one module per diffusers attention family. Importing this package registers all of them."""

from diffaccel.pipelines.adapters import unet  # noqa: F401
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
