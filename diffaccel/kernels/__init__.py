"""Attention kernels (Triton) and their PyTorch references; nothing model- or method-specific.

    from diffaccel.kernels import NeighborhoodMask, TextSpec, SparseBlockMask, block_sparse_attention
    spec = NeighborhoodMask(grid=(64, 64), kernel_size=(16, 16), stride=(16, 16), text=TextSpec(512, "prefix"))
    mask = SparseBlockMask.from_spec(spec, 128, device="cuda")
    out = block_sparse_attention(q, k, v, mask)               # (batch, heads, tokens, head_dim), like SDPA

Importing this package needs torch only; Triton is imported when a Triton kernel first runs (the mask predicates
are compiled from :mod:`diffaccel.kernels.masks` when Triton is installed).

Density 1 without INT8/LSE is sent to ``torch.nn.functional.scaled_dot_product_attention`` by ``backend="auto"``.
"""

from diffaccel.kernels.dispatch import (
    block_sparse_attention,
    block_sparse_attention_unchecked,
    quantize_per_block,
    triton_usable,
)
from diffaccel.kernels.masks import (
    CircleMask,
    CustomMask,
    MaskSpec,
    NeighborhoodMask,
    ShiftedWindowMask,
    SparseBlockMask,
    TextSpec,
    TileMask,
    classify_blocks,
)
from diffaccel.kernels.reference import block_sparse_attention_reference, materialize_mask

__all__ = [
    "CircleMask",
    "CustomMask",
    "MaskSpec",
    "NeighborhoodMask",
    "ShiftedWindowMask",
    "SparseBlockMask",
    "TextSpec",
    "TileMask",
    "block_sparse_attention",
    "block_sparse_attention_unchecked",
    "block_sparse_attention_reference",
    "classify_blocks",
    "materialize_mask",
    "quantize_per_block",
    "triton_usable",
]

# Kernel statistics: block attention mass from a cached log-sum-exp, and a dense attention pass that returns it.
from diffaccel.kernels.stats import attention_with_lse, block_attention_mass  # noqa: E402

__all__ += ["attention_with_lse", "block_attention_mass"]

# VMoBA's router: query . mean key per key partition, reduced per query block.
from diffaccel.kernels.block_scores import block_scores  # noqa: E402

__all__ += ["block_scores"]
