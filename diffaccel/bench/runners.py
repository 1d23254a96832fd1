"""The timed methods of the kernel benchmark: SDPA per backend, FlexAttention, xformers, SageAttention and ours.

Each runner is a :class:`Runner`: ``prepare`` (outside the timing) turns a (q, k, v) set into the call's
arguments, ``call`` is what is timed, ``output`` turns its result back into (B, H, N, d). A baseline that cannot
run here raises :class:`Unavailable` (not installed, not supported on this device or dtype) or :class:`Skipped`
(deliberately not taken, e.g. it would not fit in memory); the measurement turns either into a row with the reason.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from diffaccel.bench.report import package_version
from diffaccel.bench.shapes import AttentionShape

if TYPE_CHECKING:
    from diffaccel.bench.random_masks import BenchMask

__all__ = [
    "OURS_METHODS",
    "SDPA_BACKENDS",
    "Runner",
    "Skipped",
    "Unavailable",
    "first_line",
    "flex_attention_fn",
    "flex_runner",
    "ours_runner",
    "quiet_eager_flex",
    "sage_runner",
    "sdpa_runner",
    "xformers_runner",
]

SDPA_BACKENDS = ("flash", "cudnn", "efficient", "math")
OURS_METHODS = {"ours-bf16": (False, False), "ours-int8": (True, False), "ours-int8-pv": (True, True)}
"""Our kernel's variants: method name -> (qk_int8, pv_int8)."""


class Unavailable(Exception):
    """A baseline that cannot run here (not installed, not supported on this device or dtype)."""


class Skipped(Exception):
    """A measurement deliberately not taken (e.g. it would not fit in memory)."""


@dataclass
class Runner:
    """One timed method: ``prepare`` (outside the timing) turns a (q, k, v) set into ``call``'s arguments;
    ``output`` turns ``call``'s result back into (B, H, N, d)."""

    method: str
    call: Callable[..., torch.Tensor]
    prepare: Callable[[tuple[torch.Tensor, ...]], tuple] = lambda qkv: qkv
    output: Callable[[torch.Tensor], torch.Tensor] = lambda out: out
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    detail: str = ""


def sdpa_runner(backend: str, scale: float, shape: AttentionShape, dtype: torch.dtype, cuda: bool) -> Runner:
    """``F.scaled_dot_product_attention`` forced onto one backend (``flash``, ``cudnn``, ``efficient``, ``math``)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    enum = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }[backend]
    if not cuda and backend in ("cudnn", "efficient"):
        raise Unavailable(f"SDPA {backend} backend needs CUDA")
    if backend == "math" and cuda:
        # The math backend materializes the (B, H, N, N) scores a few times over.
        need = 3 * shape.batch * shape.heads * shape.tokens**2 * (torch.finfo(dtype).bits // 8 + 4)
        free = torch.cuda.mem_get_info()[0]
        if need > 0.8 * free:
            raise Skipped(f"math backend would need ~{need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free")
    return Runner(
        method=f"sdpa-{backend}",
        call=lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=scale),
        context=lambda: sdpa_kernel(enum),
        detail=f"F.scaled_dot_product_attention, SDPBackend.{enum.name}",
    )


_FLEX_COMPILED: dict[str, Callable] = {}


def flex_attention_fn(compiled: bool) -> Callable:
    """``flex_attention``, or the process's one ``torch.compile(flex_attention)`` (recompiles per shape and mask_mod)."""
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if "flex" not in _FLEX_COMPILED:
        _raise_recompile_limit()
        _FLEX_COMPILED["flex"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED["flex"]


def flex_runner(mask: BenchMask, scale: float, compiled: bool) -> Runner:
    """FlexAttention with the benchmark's torch ``BlockMask`` (the same tiles as our kernel's mask)."""
    fn = flex_attention_fn(compiled)
    return Runner(
        method="flex",
        call=lambda q, k, v: fn(q, k, v, block_mask=mask.flex, scale=scale),
        # Eager FlexAttention warns on every new call site that it is unfused; the JSON already says it is eager.
        context=contextlib.nullcontext if compiled else quiet_eager_flex,
        detail=("torch.compile(flex_attention)" if compiled else "flex_attention (eager)") + ", same BlockMask",
    )


@contextlib.contextmanager
def quiet_eager_flex() -> Iterator[None]:
    """Silence eager FlexAttention's per-call-site 'called without torch.compile' warning (the JSON says eager)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        yield


def _raise_recompile_limit() -> None:
    """One compiled graph per shape: keep dynamo from falling back to eager after its default 8 recompiles."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))


def xformers_runner(scale: float) -> Runner:
    """xformers' ``memory_efficient_attention`` (dense); :class:`Unavailable` when xformers does not import."""
    try:
        xops = importlib.import_module("xformers.ops")
    except Exception as err:  # ImportError, or a broken build raising something else at import
        raise Unavailable(f"xformers not importable ({type(err).__name__}: {first_line(err)})") from None
    return Runner(
        method="xformers",
        # xformers takes (B, N, H, d); the transposes happen in prepare, outside the timing.
        prepare=lambda qkv: tuple(t.transpose(1, 2).contiguous() for t in qkv),
        call=lambda q, k, v: xops.memory_efficient_attention(q, k, v, scale=scale),
        output=lambda out: out.transpose(1, 2),
        detail=f"xformers.ops.memory_efficient_attention {package_version('xformers')}",
    )


def sage_runner(scale: float) -> Runner:
    """SageAttention's ``sageattn`` (dense, its automatic kernel); :class:`Unavailable` when it does not import."""
    try:
        sage = importlib.import_module("sageattention")
    except Exception as err:
        raise Unavailable(f"sageattention not importable ({type(err).__name__}: {first_line(err)})") from None
    return Runner(
        method="sage",
        call=lambda q, k, v: sage.sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=scale),
        detail=f"sageattention.sageattn (auto kernel for this GPU) {package_version('sageattention')}",
    )


def ours_runner(method: str, mask: BenchMask, scale: float) -> Runner:
    """diffaccel's public ``block_sparse_attention`` with the mask's ``SparseBlockMask`` (``method`` in
    :data:`OURS_METHODS`: bf16, INT8 QK, INT8 QK and PV)."""
    from diffaccel.kernels import block_sparse_attention

    qk_int8, pv_int8 = OURS_METHODS[method]
    precision = {
        "ours-bf16": "QK and PV in the input dtype (bf16)",
        "ours-int8": "INT8 QK (per-block scales, K smoothed), bf16 PV",
        "ours-int8-pv": "INT8 QK and PV",
    }[method]
    return Runner(
        method=method,
        call=lambda q, k, v: block_sparse_attention(
            q, k, v, mask.kernel, scale=scale, qk_int8=qk_int8, pv_int8=pv_int8, dense_fast_path=False
        ),
        # dense_fast_path=False: at density 1 the public entry would call SDPA, and this row times our kernel.
        detail=f"diffaccel block_sparse_attention (Triton kernel), {precision}, quantization included in the time",
    )


def first_line(err: BaseException | Warning | str, limit: int = 300) -> str:
    """The first line of an error message, cut to ``limit`` characters (what a result row records)."""
    text = str(err).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."
