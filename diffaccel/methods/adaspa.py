"""AdaSpa: online block-sparse attention searched from the exact block attention mass, with head-adaptive tiers.

Xia et al., "Training-free and Adaptive Sparse Attention for Efficient Long Video Generation" (AdaSpa,
arXiv 2502.21079; research/sparse_quant.md §2). No code was released: this follows the paper's Alg. 1-2, §4.2-4.3.

Schedule (0-based steps, ``search_at`` fractions of the run, paper: steps 10 and 30 of 50, 1-based)::

    steps < s0         dense warm-up (SDPA)
    step s0            Fused Online Search: a dense pass that returns the LSE (its output is this step's), block
                       mass from that LSE (kernels.stats.block_attention_mass, no N x N matrix), mask M1
    s0 < step < s1     block-sparse attention with M1
    step s1, ...       LSE-Cached Online Search: block mass of this step's q, k under the LSE cached at s0 (one
                       pass), mask M2, used from this step on

Mask (per batch row and head, one layer): the blocks are the kernel's ``block_size`` blocks in sequence order. Key
blocks holding a text token are always kept and query blocks holding a text query are dense (the paper's text
sink): they do not compete. Every visual query-block row keeps its top ``round((1 - s_h) * n_v)`` visual key blocks
by mass (row-wise selection, §4.3; ``n_v`` visual key blocks, at least 1). Head tiers (§4.2): the recall of head
``h`` at sparsity ``s`` is the kept mass over the total mass of the visual rows (text blocks count as kept);
``n`` = number of heads with recall above ``recall_threshold``, capped at ``H // 2`` (the paper leaves n > H/2
open); the ``n`` heads of highest recall get ``s + d``, the ``n`` lowest ``s - d``, the others ``s``, with
``d = min((1 - s) / 2, s)`` (the paper's 0.9 / 0.8 / 0.7 at s = 0.8; bounded so tiers stay in [0, 1]: sparsity 0
keeps every block). Ties in recall or mass go to the lower index.

Quality floor (not in the paper): a head whose recall at its tier is below ``min_recall`` keeps, per row, the fewest
top blocks that reach ``min_recall`` of the row's mass, so a head with diffuse attention is never cut to a mask
that drops most of its mass.

State: masks (and the LSE, until the last search) per layer on the device; a new run (the step or the denoiser-call
count going back) drops them, so runs never share masks; the LSE is freed after the last search. The last masks stay
for :meth:`AdaSpaMethod.kept_blocks` until the next run or :meth:`AdaSpaMethod.reset`. The re-search uses the new
mask at its own step (the paper's Fig. 7 is ambiguous there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from diffaccel.context import HeadShard, RunContext
from diffaccel.errors import ConfigError
from diffaccel.kernels import attention_with_lse, block_attention_mass, block_sparse_attention_unchecked
from diffaccel.kernels.masks import SparseBlockMask
from diffaccel.layout import TokenLayout
from diffaccel.methods._online import (
    OverheadMeter,
    RunTracker,
    fraction_steps,
    padded_mask_supported,
    run_steps,
    with_text_lengths,
)
from diffaccel.methods.base import (
    MethodBase,
    MethodConfig,
    check_backend,
    config_help,
    register_method,
    sdpa,
)
from diffaccel.sparse.checks import check_block_size


def _check_unit(name: str, value: object, *, low_open: bool, high_open: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok:
        x = float(value)
        ok = (x > 0 if low_open else x >= 0) and (x < 1 if high_open else x <= 1)
    if not ok:
        allowed = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ConfigError(f"{name} must be a number in {allowed}, got {value!r}")


@dataclass
class AdaSpaConfig(MethodConfig):
    """AdaSpa with the paper's defaults (§4.3, §5; research/sparse_quant.md §2.3)."""

    sparsity: float = field(default=0.8, metadata=config_help(
        "fraction of visual key blocks dropped per query-block row, in [0, 1) (paper 0.8; tiers 0.9/0.8/0.7)"))
    block_size: int = field(default=64, metadata=config_help(
        "tokens per block of the search and of the kernel, a power of two in [16, 256] (paper 64)"))
    search_at: tuple[float, ...] = field(default=(0.2, 0.6), metadata=config_help(
        "search steps as fractions of the run, step round(f*T)-1; the first is the fused search that ends the "
        "dense warm-up, later ones reuse its LSE (paper: steps 10 and 30 of 50)"))
    recall_threshold: float = field(default=0.8, metadata=config_help(
        "heads whose recall at the sparsity exceeds it (n of them, n <= heads/2) and the n lowest move tiers"))
    head_adaptive: bool = field(default=True, metadata=config_help(
        "head-adaptive tiers (paper §4.2); False: every head at the sparsity"))
    min_recall: float = field(default=0.0, metadata=config_help(
        "quality floor in [0, 1]: a head whose recall is below it keeps per row the blocks reaching it (0: off)"))
    backend: str = field(default="auto", metadata=config_help(
        "kernels: 'auto' (Triton on CUDA or TRITON_INTERPRET=1), 'triton' or 'reference'"))

    def validate(self) -> None:
        _check_unit("sparsity", self.sparsity, low_open=False, high_open=True)
        check_block_size(self.block_size)
        if self.block_size > 256:
            raise ConfigError(f"block_size must be at most 256 (the block-mass kernel's tile), got {self.block_size}")
        if isinstance(self.search_at, (int, float)) and not isinstance(self.search_at, bool):
            self.search_at = (self.search_at,)
        if not isinstance(self.search_at, (tuple, list)) or not self.search_at:
            raise ConfigError(f"search_at must be a non-empty list of fractions in (0, 1], got {self.search_at!r}")
        for f in self.search_at:
            _check_unit("search_at", f, low_open=True, high_open=False)
        self.search_at = tuple(float(f) for f in self.search_at)
        _check_unit("recall_threshold", self.recall_threshold, low_open=True, high_open=False)
        if not isinstance(self.head_adaptive, bool):
            raise ConfigError(f"head_adaptive must be True or False, got {self.head_adaptive!r}")
        _check_unit("min_recall", self.min_recall, low_open=False, high_open=False)
        check_backend(self.backend)


# ----------------------------------------------------------------------------------------------- selection


@dataclass
class Selection:
    """A search's result for one layer: kept blocks ``(B, H, nq, nk)`` bool, per-head sparsity and recall ``(B, H)``."""

    keep: torch.Tensor
    head_sparsity: torch.Tensor
    recall: torch.Tensor


def text_blocks(layout: TokenLayout, n: int, block: int, device: torch.device) -> torch.Tensor:
    """``(ceil(n / block),)`` bool: blocks holding at least one text token."""
    nb = -(-n // block)
    out = torch.zeros(nb, dtype=torch.bool, device=device)
    if layout.num_text:
        t = layout.text
        assert t is not None
        out[t.start // block: -(-t.stop // block)] = True
    return out


def select_blocks(
    mass: torch.Tensor,
    text_q: torch.Tensor,
    text_k: torch.Tensor,
    *,
    sparsity: float,
    recall_threshold: float = 0.8,
    head_adaptive: bool = True,
    min_recall: float = 0.0,
    heads: HeadShard | None = None,
) -> Selection:
    """AdaSpa's mask from the block mass ``(B, H, nq, nk)`` (see the module docstring for the rules).

    ``heads``: under context parallelism the call holds heads ``heads.offset ...`` of ``heads.total``; the head
    tiers rank every head of the model (their recalls gathered across ranks), so each head gets the tier it gets
    in a single-process run.
    """
    B, H, nq, nk = mass.shape
    mass = mass.float()
    vis_q, vis_k = ~text_q, ~text_k
    n_v = int(vis_k.sum())
    total = mass.sum(-1)  # (B, H, nq): queries in the row (softmax rows sum to one)
    text_mass = (mass * text_k).sum(-1)
    vals, order = torch.sort(mass.masked_fill(text_k, float("-inf")), dim=-1, descending=True, stable=True)
    cum = torch.cumsum(vals.clamp(min=0.0).nan_to_num(0.0), dim=-1)  # text entries sort last, add 0
    row_total_v = total[..., vis_q].sum(-1).clamp(min=1e-30)  # (B, H)

    def count(s: torch.Tensor) -> torch.Tensor:
        return torch.round((1.0 - s) * n_v).clamp(min=1, max=max(n_v, 1)).long()

    def kept_rows(k: torch.Tensor) -> torch.Tensor:  # (B, H) counts -> (B, H, nq) kept mass
        idx = (k - 1).clamp(min=0)[..., None, None].expand(B, H, nq, 1)
        return text_mass + cum.gather(-1, idx).squeeze(-1) * (k > 0)[..., None]

    def recall_of(k: torch.Tensor) -> torch.Tensor:
        return kept_rows(k)[..., vis_q].sum(-1) / row_total_v

    s = torch.full((B, H), float(sparsity), device=mass.device)
    total_heads = H if heads is None else heads.total
    if head_adaptive and total_heads >= 2 and sparsity > 0:
        base = recall_of(count(s))
        if heads is not None:
            base = heads.gather(base)  # (B, total_heads): every head of the model, global order
        n = (base > recall_threshold).sum(-1).clamp(max=total_heads // 2)  # (B,)
        rank_of = torch.empty_like(base, dtype=torch.long)
        ranked = torch.sort(base, dim=-1, descending=True, stable=True).indices
        rank_of.scatter_(
            -1, ranked, torch.arange(total_heads, device=mass.device).expand(B, total_heads).contiguous()
        )
        if heads is not None:
            rank_of = rank_of[:, heads.offset: heads.offset + H]  # this call's heads
        d = min((1.0 - sparsity) / 2.0, sparsity)
        top = rank_of < n[:, None]
        bottom = rank_of >= total_heads - n[:, None]
        s = torch.where(top, s + d, torch.where(bottom, s - d, s))
    k_head = count(s)
    k_row = k_head[..., None].expand(B, H, nq)
    recall = recall_of(k_head)
    if min_recall > 0 and n_v > 0:
        below = recall < min_recall  # (B, H)
        need = min_recall * total - text_mass  # (B, H, nq)
        reach = (cum[..., :n_v] < need[..., None] - 1e-6 * total[..., None]).sum(-1) + 1
        k_row = torch.where(below[..., None], torch.maximum(k_row, reach.clamp(max=n_v)), k_row)
        kept = text_mass + cum.gather(-1, (k_row - 1).clamp(min=0)[..., None]).squeeze(-1)
        recall = kept[..., vis_q].sum(-1) / row_total_v
    keep_sorted = torch.arange(nk, device=mass.device) < k_row[..., None]
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    keep = (keep & vis_k) | text_k
    keep = keep | text_q[:, None]
    return Selection(keep, s, recall)


# ----------------------------------------------------------------------------------------------- the method


@dataclass
class _LayerState:
    key: tuple
    mask: SparseBlockMask
    keep: torch.Tensor
    lse: torch.Tensor | None
    searched_at: int
    selection: Selection


@register_method
class AdaSpaMethod(MethodBase):
    """AdaSpa (online block search from the LSE-cached block mass, head-adaptive sparsity tiers); text kept."""

    name = "adaspa"
    context_parallel = frozenset({"ulysses"})  # tested: tests/test_context_parallel.py
    config_class = AdaSpaConfig
    config: AdaSpaConfig

    def __init__(self, config: AdaSpaConfig | None = None, **overrides) -> None:
        super().__init__(config, **overrides)
        self._states: dict[str, _LayerState] = {}
        self._run = RunTracker()
        self.meter = OverheadMeter()
        self.searches: list[tuple[str, int, str]] = []
        """(layer, step, 'fused' | 'cached') of the current run's searches."""

    # -- contracts ------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the run: masks, LSEs, timings."""
        self._states.clear()
        self.meter.reset()
        self.searches = []

    def kept_blocks(self, layer: str) -> torch.Tensor | None:
        """Kept key blocks ``(heads, q_blocks, kv_blocks)`` of batch row 0 at the layer's most recent search."""
        st = self._states.get(layer) or next((s for k, s in self._states.items() if k.startswith(layer + "#")), None)
        return None if st is None else st.keep[0]

    def overhead(self) -> dict[str, float] | None:
        """Seconds searching vs attention saved in the last run (see :mod:`diffaccel.methods._online`)."""
        return self.meter.summary()

    def search_steps(self, num_steps: int) -> tuple[int, ...]:
        return fraction_steps(self.config.search_at, num_steps)

    # -- calls ----------------------------------------------------------------------------------------------------
    def attend(self, q, k, v, layout: TokenLayout, ctx: RunContext, *, attn_mask=None, scale=None):
        if self._run.new_run(ctx):
            self.reset()
        if k.shape[2] != q.shape[2] or not padded_mask_supported(self.name, attn_mask, layout, q.shape[0]):
            return self.dense_fallback(q, k, v, attn_mask=attn_mask, scale=scale)
        layer = ctx.layer or ""
        if attn_mask is not None:
            assert layout.text_lengths is not None
            return with_text_lengths(
                q, k, v, layout, layout.text_lengths, scale,
                lambda qb, kb, vb, sub, g: self._attend(qb, kb, vb, sub, ctx, f"{layer}#{g}", scale),
            )
        return self._attend(q, k, v, layout, ctx, layer, scale)

    def _attend(self, q, k, v, layout: TokenLayout, ctx: RunContext, layer: str, scale):
        cfg = self.config
        searches = self.search_steps(run_steps(ctx, self.name))
        step = ctx.step
        if step < searches[0]:
            with self.meter.time("dense", layer, q.device):
                return self.dense_fallback(q, k, v, scale=scale)
        key = (tuple(q.shape), layout.num_text, layout.text_first, q.device, q.dtype, scale)
        st = self._states.get(layer)
        if st is not None and st.key != key:
            st = None  # another shape at this layer (a new resolution): search afresh
        later = [s for s in searches if s > step]
        if st is None:
            with self.meter.time("dense_lse", layer, q.device):
                out, lse = attention_with_lse(q, k, v, scale=scale, backend=cfg.backend)
            with self.meter.time("search", layer, q.device):
                self._search(q, k, lse, layout, layer, step, key, scale, keep_lse=bool(later), heads=ctx.heads)
            self.searches.append((layer, step, "fused"))
            return out
        if step in searches and st.searched_at != step and st.lse is not None:
            with self.meter.time("search", layer, q.device):
                self._search(q, k, st.lse, layout, layer, step, key, scale, keep_lse=bool(later), heads=ctx.heads)
            self.searches.append((layer, step, "cached"))
            st = self._states[layer]
        with self.meter.time("sparse", layer, q.device):
            return block_sparse_attention_unchecked(q, k, v, st.mask, scale=scale, backend=cfg.backend)

    def _search(self, q, k, lse, layout, layer, step, key, scale, *, keep_lse: bool,
                heads: HeadShard | None = None) -> None:
        cfg = self.config
        n = q.shape[2]
        mass = block_attention_mass(q, k, lse, cfg.block_size, scale=scale, backend=cfg.backend)
        tq = text_blocks(layout, n, cfg.block_size, q.device)
        sel = select_blocks(mass, tq, tq, sparsity=cfg.sparsity, recall_threshold=cfg.recall_threshold,
                            head_adaptive=cfg.head_adaptive, min_recall=cfg.min_recall, heads=heads)
        mask = SparseBlockMask.from_block_keep(
            sel.keep, q_len=n, kv_len=n, q_block_size=cfg.block_size, kv_block_size=cfg.block_size, validate=False)
        self._states[layer] = _LayerState(key, mask, sel.keep, lse if keep_lse else None, step, sel)
