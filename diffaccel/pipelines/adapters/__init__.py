"""Adapters, one module per diffusers attention family, registered on first use (``adapters.builtin``)."""

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
