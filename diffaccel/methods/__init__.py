"""Attention methods, one module per paper. Importing this package registers every implemented method."""

from diffaccel.methods.base import (
    AttentionMethod,
    MethodBase,
    MethodConfig,
    get_method,
    list_methods,
    method_parameters,
    register_method,
)
from diffaccel.methods.dense import DenseConfig, DenseMethod

__all__ = [
    "AttentionMethod",
    "DenseConfig",
    "DenseMethod",
    "MethodBase",
    "MethodConfig",
    "get_method",
    "list_methods",
    "method_parameters",
    "register_method",
]
