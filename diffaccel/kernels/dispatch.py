"""Public kernel entry points: validate arguments, then run the Triton kernel or the PyTorch reference.

``backend="auto"`` runs Triton when the tensors are on CUDA or ``TRITON_INTERPRET=1`` is set (Triton's CPU
interpreter, used by the tests), and otherwise the PyTorch reference with a one-time warning. ``"triton"`` and
``"reference"`` force one path (``"triton"`` raises where it cannot run). With ``"auto"``, a density-1 call with
no INT8, no LSE request (any token order) goes to ``torch.nn.functional.scaled_dot_product_attention``, which picks
the best dense kernel (cuDNN on Hopper; the Triton dense loop measured 0.69-0.79x cuDNN on an H100); pass
``dense_fast_path=False`` to keep Triton.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from typing import Any

import torch
import torch.nn.functional as F

from diffaccel.kernels import _util, reference
from diffaccel.kernels._util import _describe
from diffaccel.kernels.masks import CustomMask, SparseBlockMask, Spec
from diffaccel.warn import warn_once

BACKENDS = ("auto", "triton", "reference")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
"""Largest head_dim the Triton kernel takes; any head_dim up to it works (non powers of two are padded in-kernel)."""


@functools.lru_cache(maxsize=1)
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return _util._interpreting()


def triton_usable(device: torch.device) -> tuple[bool, str]:
    """Whether the Triton kernels can run on ``device`` here, and why not."""
    if not _triton_importable():
        return False, "triton is not installed"
    if device.type == "cuda" or _interpreting():
        return True, ""
    return False, f"tensors are on {device.type} and TRITON_INTERPRET=1 is not set"


def _choose_backend(backend: str, device: torch.device, what: str, refuse: str | None = None) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if backend == "reference":
        return "reference"
    ok, why = triton_usable(device)
    if refuse is not None:
        ok, why = False, refuse
    if ok:
        return "triton"
    if backend == "triton":
        raise ValueError(f"backend='triton' cannot run {what}: {why}")
    warn_once(f"{what}:{why}", f"diffaccel: {what} falls back to the PyTorch reference ({why}); it is slow.")
    return "reference"


def _check_qkv(q: Any, k: Any, v: Any) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be (batch, heads, tokens, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} dtype must be float16, bfloat16 or float32, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.shape[:2] == k.shape[:2] == v.shape[:2]):
        raise ValueError(
            f"q, k, v must share batch and heads, got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same number of tokens, got {k.shape[2]} and {v.shape[2]}")
    if not (q.shape[3] == k.shape[3] == v.shape[3]):
        raise ValueError(f"q, k, v must share head_dim, got {q.shape[3]}, {k.shape[3]}, {v.shape[3]}")
    if q.shape[2] == 0 or k.shape[2] == 0 or q.shape[3] == 0:
        raise ValueError(f"q and k need at least one token and head_dim >= 1, got {tuple(q.shape)}, {tuple(k.shape)}")


def _as_sparse_block_mask(block_mask: Any, mask_spec: Spec | None) -> SparseBlockMask:
    if isinstance(block_mask, SparseBlockMask):
        if mask_spec is not None:
            raise ValueError("mask_spec is only for a torch BlockMask; a SparseBlockMask carries its own spec")
        return block_mask
    try:
        from torch.nn.attention.flex_attention import BlockMask
    except ImportError:  # pragma: no cover - torch without FlexAttention
        BlockMask = ()  # type: ignore[assignment]
    if BlockMask and isinstance(block_mask, BlockMask):
        return _converted(block_mask, mask_spec)
    raise TypeError(
        f"block_mask must be a diffaccel SparseBlockMask or a torch BlockMask, got {type(block_mask).__name__}"
    )


def _converted(block_mask: Any, mask_spec: Spec | None) -> SparseBlockMask:
    """``SparseBlockMask.from_block_mask``, memoized on the BlockMask: converting validates the block lists, which
    reads device values (synchronizations on CUDA), so it runs once per BlockMask, not once per attention call.

    The memo is keyed by the spec and the identity and version counter of the BlockMask's four block tensors, so
    reassigning or modifying them in place converts again.
    """
    tensors = (block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks,
               block_mask.full_kv_indices)
    versions = tuple(-1 if t is None else t._version for t in tensors)
    shape = (tuple(block_mask.BLOCK_SIZE), tuple(block_mask.seq_lengths))
    memo = getattr(block_mask, "_diffaccel_sparse", None)
    if memo is not None:
        spec, mask_mod, m_shape, m_tensors, m_versions, converted = memo
        if ((spec is mask_spec or spec == mask_spec) and mask_mod is block_mask.mask_mod and m_shape == shape
                and all(a is b for a, b in zip(m_tensors, tensors)) and m_versions == versions):
            return converted
    converted = SparseBlockMask.from_block_mask(block_mask, spec=mask_spec)
    try:
        block_mask._diffaccel_sparse = (mask_spec, block_mask.mask_mod, shape, tensors, versions, converted)
    except AttributeError:  # pragma: no cover - a BlockMask that takes no attributes: convert every call
        pass
    return converted


def _check_mask(bm: SparseBlockMask, q: torch.Tensor, k: torch.Tensor) -> None:
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    if bm.q_len != Lq or bm.kv_len != Lk:
        raise ValueError(
            f"block_mask was built for q_len={bm.q_len}, kv_len={bm.kv_len} but q has {Lq} tokens and k has {Lk}"
        )
    mb, mh = bm.kv_num_blocks.shape[:2]
    if mb not in (1, B) or mh not in (1, H):
        raise ValueError(f"block_mask batch/heads ({mb}, {mh}) must be 1 or match the inputs' ({B}, {H})")
    if bm.spec is not None and bm.spec.num_mask_heads not in (1, H):
        raise ValueError(f"the mask spec describes {bm.spec.num_mask_heads} heads but the inputs have {H}")
    if bm.device != q.device:
        raise ValueError(
            f"block_mask is on {bm.device} but q is on {q.device}: build it there or call block_mask.to(q.device)"
        )


def _check_token_order(token_order: Any, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """A valid token order as a contiguous int32 tensor on q's device (one host sync: the permutation check)."""
    if not isinstance(token_order, torch.Tensor) or token_order.dtype.is_floating_point \
            or token_order.dtype in (torch.bool, torch.complex64, torch.complex128):
        raise TypeError(f"token_order must be an integer tensor, got {_describe(token_order)}")
    H, N = q.shape[1], q.shape[2]
    if k.shape[2] != N:
        raise ValueError(f"token_order needs q_len == kv_len (self/joint attention), got {N} and {k.shape[2]}")
    if token_order.shape not in ((N,), (H, N)):
        raise ValueError(
            f"token_order must have shape ({N},) or ({H}, {N}) (tokens, or heads x tokens), got {tuple(token_order.shape)}"
        )
    if token_order.device != q.device:
        raise ValueError(f"token_order is on {token_order.device} but q is on {q.device}")
    order = token_order.to(torch.int32).contiguous()
    expected = torch.arange(N, device=order.device, dtype=torch.int32).expand_as(order)
    if not torch.equal(order.sort(dim=-1).values, expected):
        raise ValueError(f"token_order must be a permutation of 0..{N - 1} (per head for a (heads, tokens) order)")
    return order


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: SparseBlockMask | Any,
    *,
    scale: float | None = None,
    qk_int8: bool = False,
    pv_int8: bool = False,
    return_lse: bool = False,
    out: torch.Tensor | None = None,
    mask_spec: Spec | None = None,
    token_order: torch.Tensor | None = None,
    backend: str = "auto",
    dense_fast_path: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over the key blocks ``block_mask`` keeps; the block-sparse analogue of SDPA.

    Args:
        q, k, v: ``(batch, heads, tokens, head_dim)``, one dtype (float16, bfloat16, float32) and device. Query and
            key lengths may differ and need not be multiples of the block sizes. head_dim up to 256 (the kernel pads
            non powers of two internally).
        block_mask: a :class:`~diffaccel.kernels.masks.SparseBlockMask`, or a torch ``BlockMask`` (converted with
            :meth:`SparseBlockMask.from_block_mask`; pass ``mask_spec`` when its partial blocks were not built from a
            diffaccel spec). Per query block, full key blocks are read without an element mask, partial ones with
            the spec's element mask; other key blocks are never read.
        scale: softmax scale, default ``1 / sqrt(head_dim)``.
        qk_int8: INT8 Q·K with per-block scales (Q per query block, K per key block of the mask) and K smoothing;
            P·V stays in the input dtype with float32 accumulation. Measured on an H100: relative L2 error 1.4e-2
            on random bf16 inputs, 1.38x the bf16 kernel at 32K tokens (less on short sequences, where the
            quantization pass weighs more).
        pv_int8: INT8 P·V as well (P with the fixed scale 127, V per channel, as in PARO). Error ~3e-2 on random
            inputs, and not faster than bf16 P·V on Hopper in this kernel: for fidelity, not speed.
        return_lse: also return the natural-log log-sum-exp of each query row, float32 ``(batch, heads, q_len)``.
        out: optional preallocated output (same shape, dtype and device as ``q``), written in full.
        mask_spec: element mask for a torch ``BlockMask``'s partial blocks (ignored for a SparseBlockMask: error).
        token_order: optional integer tensor ``(tokens,)`` or ``(heads, tokens)`` (self/joint attention only,
            q_len == kv_len), a permutation (per head): kernel position ``i`` holds sequence row
            ``token_order[..., i]``. The Triton kernel reads Q, K and V rows through it and writes output (and LSE)
            rows back through it (gathered loads, scattered stores: no extra pass over the tensors), so the result
            is in sequence order; the block mask is in kernel order, and element masks of partial blocks are
            evaluated on the sequence positions ``(token_order[i], token_order[j])``.
        backend: ``"auto"``, ``"triton"`` or ``"reference"`` (see the module docstring).
        dense_fast_path: with ``backend="auto"``, a mask whose blocks are all full (density 1) with no INT8 and no
            LSE request runs ``torch.nn.functional.scaled_dot_product_attention`` (the best SDPA backend, cuDNN on
            Hopper) on the original tensors -- a token order does not change dense attention's output. The Triton
            dense path measured 0.69-0.79x cuDNN on an H100. ``False`` (or ``backend="triton"``) keeps the Triton
            kernel, for tests and benchmarks.

    Returns:
        The output like ``q`` (and the log-sum-exp when ``return_lse``). Query rows with no kept key get zeros and
        log-sum-exp ``-inf``.
    """
    _check_qkv(q, k, v)
    bm = _as_sparse_block_mask(block_mask, mask_spec)
    _check_mask(bm, q, k)
    D = q.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite number > 0 or None, got {scale!r}")
    for name, flag in (("qk_int8", qk_int8), ("pv_int8", pv_int8), ("return_lse", return_lse),
                       ("dense_fast_path", dense_fast_path)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
            raise ValueError(
                f"out must be a tensor of shape {tuple(q.shape)}, dtype {q.dtype} on {q.device}, got {_describe(out)}"
            )
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    order = None if token_order is None else _check_token_order(token_order, q, k)
    return block_sparse_attention_unchecked(
        q, k, v, bm, scale=float(scale), qk_int8=qk_int8, pv_int8=pv_int8, return_lse=return_lse, out=out,
        token_order=order, backend=backend, dense_fast_path=dense_fast_path,
    )


def block_sparse_attention_unchecked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: SparseBlockMask | Any,
    *,
    scale: float | None = None,
    qk_int8: bool = False,
    pv_int8: bool = False,
    return_lse: bool = False,
    out: torch.Tensor | None = None,
    mask_spec: Spec | None = None,
    token_order: torch.Tensor | None = None,
    backend: str = "auto",
    dense_fast_path: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`block_sparse_attention` without the per-call argument checks: the internal entry for methods, which
    validated their plan (shapes, block mask, token order) once when they built it.

    Wrong arguments here are undefined behaviour (out-of-range reads), not an error; users call the checked entry.
    A torch ``BlockMask`` is still converted (memoized), and backend fallbacks still warn once.
    """
    bm = block_mask if type(block_mask) is SparseBlockMask else _as_sparse_block_mask(block_mask, mask_spec)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if (dense_fast_path and backend == "auto" and not (qk_int8 or pv_int8 or return_lse) and bm.known_dense):
        # Density 1: the best SDPA backend beats the Triton loop; a token order does not change dense attention.
        res = F.scaled_dot_product_attention(q, k, v, scale=scale)
        if out is not None:
            out.copy_(res)
            return out
        return res
    chosen = _choose_backend(backend, q.device, "block_sparse_attention", _refusal(bm, q.shape[-1]))
    if chosen == "triton":
        from diffaccel.kernels.block_sparse import block_sparse_attention_triton

        return block_sparse_attention_triton(
            q, k, v, bm, scale=scale, qk_int8=qk_int8, pv_int8=pv_int8, return_lse=return_lse, out=out,
            token_order=token_order,
        )
    result = reference.block_sparse_attention_reference(
        q, k, v, bm, scale=scale, qk_int8=qk_int8, pv_int8=pv_int8, return_lse=return_lse, token_order=token_order,
    )
    if out is not None:
        out.copy_(result[0] if return_lse else result)
        return (out, result[1]) if return_lse else out
    return result


def _refusal(bm: SparseBlockMask, head_dim: int) -> str | None:
    """Why the Triton kernel cannot run this call (None: it can)."""
    if isinstance(bm.spec, CustomMask) and bm.may_have_partial and bm.num_partial > 0:
        return "the block mask's partial blocks use a custom mask_mod, which only the PyTorch reference evaluates"
    if head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} is larger than the kernel's maximum {MAX_HEAD_DIM}"
    return None


def quantize_per_block(
    x: torch.Tensor, block_size: int, *, mean: torch.Tensor | None = None, premultiply: float = 1.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """INT8 per-block quantization (see :func:`~diffaccel.kernels.reference.quantize_per_block_reference`)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"x must be a float16/bfloat16/float32 (batch, heads, tokens, head_dim) tensor, got {_describe(x)}"
        )
    is_int = isinstance(block_size, int) and not isinstance(block_size, bool)
    if not is_int or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size!r}")
    if _choose_backend(backend, x.device, "quantize_per_block") == "triton":
        from diffaccel.kernels.quant import quantize_per_block as _triton_quant

        return _triton_quant(x, block_size, mean=mean, premultiply=premultiply)
    return reference.quantize_per_block_reference(x, block_size, mean=mean, premultiply=premultiply)


