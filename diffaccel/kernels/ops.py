"""The Triton statistics kernels as ``torch.library`` custom ops, so dynamo keeps them opaque under compile.

Dynamo cannot trace a Triton launch in the interpreter or the host-side argument handling of a launch; a custom op
with a fake implementation (output shapes and dtypes only) lets ``torch.compile(fullgraph=True)`` and
``torch.export`` put the kernel in the graph as one node. :mod:`diffaccel.kernels.stats` routes its Triton path
through these ops while dynamo traces (``torch.compiler.is_compiling()``); eagerly it calls the kernels directly
(no dispatcher overhead). The PyTorch references stay traceable and are traced as they are.

Block-sparse attention with a method's block mask runs inside the method, which the processor wraps in the
``diffaccel::attend`` op (diffaccel/pipelines/compile_ops.py): a block mask is a plan object, not a graph value.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("diffaccel::attention_with_lse", mutates_args=())
def attention_with_lse_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention and its log-sum-exp on the Triton kernel (:func:`~diffaccel.kernels.stats.attention_with_lse`)."""
    from diffaccel.kernels.stats import attention_with_lse

    out, lse = attention_with_lse(q, k, v, scale=scale, backend="triton")
    return out.contiguous(), lse.contiguous()


@attention_with_lse_op.register_fake
def _attention_with_lse_fake(q, k, v, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("diffaccel::block_attention_mass", mutates_args=())
def block_attention_mass_op(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, block_q: int, block_k: int,
                            scale: float) -> torch.Tensor:
    """Attention mass per (query block, key block) on the Triton kernel (:func:`~diffaccel.kernels.stats.block_attention_mass`)."""
    from diffaccel.kernels.stats import block_attention_mass

    return block_attention_mass(q, k, lse, (block_q, block_k), scale=scale, backend="triton")


@block_attention_mass_op.register_fake
def _block_attention_mass_fake(q, k, lse, block_q, block_k, scale):
    b, h, n_q = q.shape[:3]
    n_k = k.shape[2]
    return q.new_empty((b, h, -(-n_q // block_q), -(-n_k // block_k)), dtype=torch.float32)
