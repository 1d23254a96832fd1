"""Public kernel entry points: validate arguments, then run the Triton kernel or the PyTorch reference.

``backend="auto"`` runs Triton when the tensors are on CUDA or ``TRITON_INTERPRET=1`` is set (Triton's CPU
interpreter, used by the tests), and otherwise the PyTorch reference with a one-time warning. ``"triton"`` and
``"reference"`` force one path (``"triton"`` raises where it cannot run).
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Any

import torch

from diffaccel.kernels import reference
from diffaccel.kernels.masks import CustomMask, SparseBlockMask, Spec
from diffaccel.warn import warn_once

BACKENDS = ("auto", "triton", "reference")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
"""Largest head_dim the Triton kernel takes; any head_dim up to it works (non powers of two are padded in-kernel)."""


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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
        pv_int8: INT8 P·V as well (P with the fixed scale 127, V per channel; PARO). Error ~3e-2 on random
            inputs, and not faster than bf16 P·V on Hopper in this kernel: for fidelity with PARO.
        return_lse: also return the natural-log log-sum-exp of each query row, float32 ``(batch, heads, q_len)``.
        out: optional preallocated output (same shape, dtype and device as ``q``), written in full.
        mask_spec: element mask for a torch ``BlockMask``'s partial blocks (ignored for a SparseBlockMask: error).
        token_order: optional integer tensor ``(tokens,)`` or ``(heads, tokens)`` (self/joint attention only,
            q_len == kv_len): kernel position ``i`` holds sequence row ``token_order[..., i]``. Q, K and V rows are
            read through it and output (and LSE) rows written back through it, so the result is in sequence order;
            the block mask is in kernel order, and element masks of partial blocks are evaluated on the sequence
            positions ``(token_order[i], token_order[j])``.
        backend: ``"auto"``, ``"triton"`` or ``"reference"`` (see the module docstring).

    Returns:
        The output like ``q`` (and the log-sum-exp when ``return_lse``). Query rows with no kept key get zeros and
        log-sum-exp ``-inf``.
    """
    _check_qkv(q, k, v)
    if token_order is not None:
        return _with_token_order(
            q, k, v, block_mask, token_order, scale=scale, qk_int8=qk_int8, pv_int8=pv_int8,
            return_lse=return_lse, out=out, mask_spec=mask_spec, backend=backend,
        )
    bm = _as_sparse_block_mask(block_mask, mask_spec)
    _check_mask(bm, q, k)
    D = q.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite number > 0 or None, got {scale!r}")
    for name, flag in (("qk_int8", qk_int8), ("pv_int8", pv_int8), ("return_lse", return_lse)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
            raise ValueError(
                f"out must be a tensor of shape {tuple(q.shape)}, dtype {q.dtype} on {q.device}, got {_describe(out)}"
            )
    refuse = None
    if isinstance(bm.spec, CustomMask) and bm.num_partial > 0:
        refuse = "the block mask's partial blocks use a custom mask_mod, which only the PyTorch reference evaluates"
    elif D > MAX_HEAD_DIM:
        refuse = f"head_dim {D} is larger than the kernel's maximum {MAX_HEAD_DIM}"
    chosen = _choose_backend(backend, q.device, "block_sparse_attention", refuse)
    if chosen == "triton":
        from diffaccel.kernels.block_sparse import block_sparse_attention_triton

        return block_sparse_attention_triton(
            q, k, v, bm, scale=float(scale), qk_int8=qk_int8, pv_int8=pv_int8, return_lse=return_lse, out=out
        )
    result = reference.block_sparse_attention_reference(
        q, k, v, bm, scale=float(scale), qk_int8=qk_int8, pv_int8=pv_int8, return_lse=return_lse
    )
    if out is not None:
        out.copy_(result[0] if return_lse else result)
        return (out, result[1]) if return_lse else out
    return result


def _with_token_order(q, k, v, block_mask, token_order, *, out, backend, **kwargs):
    """Interim token-order path: Triton on gathered inputs for masks without partial blocks, else the reference.

    The kernel slice of issue 8 replaces this with gathered loads and scattered stores inside the kernel.
    """
    bm = _as_sparse_block_mask(block_mask, kwargs.pop("mask_spec", None))
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"token_order needs q_len == kv_len (self/joint attention), got {q.shape[2]} and {k.shape[2]}")
    if bm.num_partial == 0 and _choose_backend(backend, q.device, "block_sparse_attention") == "triton":
        res = block_sparse_attention(
            reference.gather_tokens(q, token_order), reference.gather_tokens(k, token_order),
            reference.gather_tokens(v, token_order), bm, backend=backend, **kwargs,
        )
    else:
        res = reference.block_sparse_attention_reference(q, k, v, bm, token_order=token_order, **kwargs)
        res = (res[0], res[1]) if kwargs.get("return_lse") else res
        if out is not None:
            out.copy_(res[0] if kwargs.get("return_lse") else res)
            return (out, res[1]) if kwargs.get("return_lse") else out
        return res
    if kwargs.get("return_lse"):
        o = reference.scatter_tokens(res[0], token_order)
        lse = reference.scatter_tokens(res[1], token_order)
    else:
        o, lse = reference.scatter_tokens(res, token_order), None
    if out is not None:
        out.copy_(o)
        o = out
    return (o, lse) if lse is not None else o


def block_sparse_attention_unchecked(q, k, v, block_mask, **kwargs):
    """Internal entry for methods: the arguments were validated when the plan was built (no per-call checks)."""
    return block_sparse_attention(q, k, v, block_mask, **kwargs)


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


def _describe(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"a {t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"
    return type(t).__name__
