"""Block-sparse attention masks: element mask specs (one module per kind) and the block index structure.

* :mod:`.base` -- :class:`TextSpec`, the :class:`MaskSpec` base and the predicate contract, :class:`CustomMask`;
* :mod:`.neighborhood`, :mod:`.circle`, :mod:`.tile`, :mod:`.shifted_window` -- one kind each: spec dataclass,
  torch ``mask_mod`` and ``@triton.jit`` predicate side by side;
* :mod:`.block_mask` -- :func:`classify_blocks`, :class:`SparseBlockMask`, FlexAttention ``BlockMask`` interop.

==========================  =====================================================================================
:class:`NeighborhoodMask`   GNA / NATTEN neighborhood: per-dimension ``kernel_size``, ``stride``, ``dilation``,
                            ``is_causal``, AND over dimensions (Hassani et al., arXiv 2504.16922).
:class:`CircleMask`         keys within Euclidean distance ``< radius`` of the query on the visual grid, no
                            clamping at the borders (CLEAR, Liu et al., arXiv 2412.16112).
:class:`TileMask`           attention tiles: each frame attends to itself and to global frames; global frames
                            attend to everything (Efficient-vDiT, Ding et al., arXiv 2502.06155).
:class:`ShiftedWindowMask`  non-overlapping windows on the grid cyclically rolled by ``-shift`` (MSW-MSA,
                            HiDiffusion, Zhang et al., ECCV 2024).
==========================  =====================================================================================
"""

from diffaccel.kernels.masks.base import (
    KIND_CIRCLE,
    KIND_CUSTOM,
    KIND_NEIGHBORHOOD,
    KIND_NONE,
    KIND_SHIFTED_WINDOW,
    KIND_TILE,
    CustomMask,
    MaskMod,
    MaskSpec,
    Spec,
    TextSpec,
    _check_grid,
    _per_dim,
    _unravel,
    keep_all,
)
from diffaccel.kernels.masks.block_mask import (
    SparseBlockMask,
    _check_block_size,
    _classify_cached,
    _from_spec_cached,
    _indices_from_keep,
    _keep_from_indices,
    classify_blocks,
)
from diffaccel.kernels.masks.circle import CircleMask
from diffaccel.kernels.masks.neighborhood import NeighborhoodMask
from diffaccel.kernels.masks.shifted_window import ShiftedWindowMask
from diffaccel.kernels.masks.tile import TileMask, _tile_table

__all__ = [
    "KIND_CIRCLE", "KIND_CUSTOM", "KIND_NEIGHBORHOOD", "KIND_NONE", "KIND_SHIFTED_WINDOW", "KIND_TILE",
    "CircleMask", "CustomMask", "MaskMod", "MaskSpec", "NeighborhoodMask", "ShiftedWindowMask", "Spec",
    "SparseBlockMask", "TextSpec", "TileMask", "classify_blocks", "keep_all",
]
