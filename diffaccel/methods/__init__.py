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
from diffaccel.methods.agent import AgentConfig, AgentMethod
from diffaccel.methods.softpag import SoftPAGConfig, SoftPAGMethod
from diffaccel.methods.gna import GNAConfig, GNAMethod
from diffaccel.methods.tile import TileConfig, TileMethod
from diffaccel.methods.clear import ClearConfig, ClearMethod
from diffaccel.methods.msw import MSWConfig, MSWMethod
from diffaccel.methods.paro import ParoConfig, ParoMethod
from diffaccel.methods.adaspa import AdaSpaConfig, AdaSpaMethod
from diffaccel.methods.vmoba import VMoBAConfig, VMoBAMethod

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
