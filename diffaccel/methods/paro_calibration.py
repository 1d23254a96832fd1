"""PARO calibration as a recording method: dense attention that measures what the plan needs, layer by layer.

PAROAttention (arXiv 2506.16054, §4.1; ``research/sparse_quant.md`` §1.3-1.4) calibrates offline on 1-2 prompts.
:class:`ParoCalibrator` is applied to a pipeline like any method (``diffaccel.apply(pipe, calibrator)``) and runs
dense attention with :func:`~diffaccel.kernels.attention_with_lse`, so the generation is the dense one; from the
cached log-sum-exp it measures, per call:

* during the first ``search_steps`` steps of the first prompt, for each candidate axis order: the paper's two
  metrics on ``sample_blocks`` sampled query blocks of the visual tokens (exact probabilities of those rows against
  every visual key: ``sample_blocks * block x N`` values, never ``N x N``) -- ``M_sparse``, the fraction of 64x64
  blocks with at least ``sigma`` = 90% of entries below ``eps`` = 1e-3, and ``M_quant``, the mean block incoherence
  max|P| / mean|P| -- and the block attention mass under that order (:func:`~diffaccel.kernels.block_attention_mass`);
* at every other step: the block mass under the head's chosen order (one block-mass pass per call).

Masses are summed per (timestep bucket, layer) over batch rows, steps and prompts; :meth:`ParoCalibrator.build_plan`
turns them into masks at the target density (:func:`~diffaccel.methods.paro_plan.keep_from_mass`) and records the
recall (the mass the kept blocks hold).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from diffaccel.context import RunContext
from diffaccel.errors import ConfigError
from diffaccel.kernels import attention_with_lse, block_attention_mass
from diffaccel.layout import TokenLayout
from diffaccel.methods.base import MethodBase, sdpa
from diffaccel.methods.paro import (
    DEFAULT_BLOCK,
    DEFAULT_DENSITY,
    ParoConfig,
    _mask_is_no_op,
    check_paro_layout,
    suffix_padding,
)
from diffaccel.methods.paro_plan import (
    ParoPlan,
    bucket_of,
    check_num_buckets,
    default_num_buckets,
    keep_from_mass,
    pack_bits,
    select_orders,
    text_blocks,
)
from diffaccel.sparse.axis_orders import axis_orders_for, head_token_order, visual_axis_order
from diffaccel.sparse.text import layout_text_spec
from diffaccel.warn import warn_once

EPS = 1e-3
"""A probability below it counts as negligible in ``M_sparse`` (the paper's epsilon, per the notes)."""
SIGMA = 0.9
"""A block is sparse when at least this fraction of its entries is negligible (the paper's sigma)."""


@dataclass
class _LayerStats:
    grid: tuple[int, ...]
    num_tokens: int
    num_text: int
    text_first: bool
    heads: int
    sparse_sum: torch.Tensor  # (heads, orders) float64: sum of M_sparse over search calls
    quant_sum: torch.Tensor  # (heads, orders) float64: sum of M_quant
    searches: int = 0
    orders: torch.Tensor | None = None  # (heads,) chosen order indices
    pending: dict[int, torch.Tensor] = field(default_factory=dict)  # bucket -> (orders, heads, nqb, nkb) mass
    mass: dict[int, torch.Tensor] = field(default_factory=dict)  # bucket -> (heads, nqb, nkb) under chosen orders
    token_order: torch.Tensor | None = None  # (heads, tokens) on the device of the calls


class ParoCalibrator(MethodBase):
    """Dense attention (exact) that records PARO's order metrics and block masses (see the module docstring)."""

    name = "paro-calibration"
    config_class = ParoConfig
    config: ParoConfig

    def __init__(self, config: ParoConfig | None = None, *, num_steps: int | None = None, eps: float = EPS,
                 sigma: float = SIGMA, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self.num_steps = num_steps
        self.eps, self.sigma = float(eps), float(sigma)
        self.prompt_index = 0
        self.stats: dict[str, _LayerStats] = {}
        self.seconds = 0.0

    @property
    def density(self) -> float:
        return DEFAULT_DENSITY if self.config.density is None else float(self.config.density)

    @property
    def block(self) -> int:
        return DEFAULT_BLOCK if self.config.block_size is None else int(self.config.block_size)

    def _steps(self, ctx: RunContext) -> int:
        steps = self.num_steps if self.num_steps is not None else ctx.num_steps
        if steps is None:
            raise ConfigError("paro calibration needs the number of denoising steps (the scheduler did not tell it)")
        return int(steps)

    def num_buckets(self, steps: int) -> int:
        nb = default_num_buckets(steps) if self.config.num_buckets is None else self.config.num_buckets
        check_num_buckets(nb, steps)
        return nb

    # ------------------------------------------------------------------ recording
    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: TokenLayout,
        ctx: RunContext,
        *,
        attn_mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        check_paro_layout(layout, ctx.layer)
        padded = attn_mask is not None and not _mask_is_no_op(layout)
        if padded and not suffix_padding(layout):
            warn_once("paro-calibration-masked", "diffaccel: paro calibration skips calls with an attention mask "
                      "other than a suffix prompt's padding; they run dense and are not measured")
            return sdpa(q, k, v, attn_mask=attn_mask, scale=scale)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        backend = self.config.backend
        if not padded:
            out, lse = attention_with_lse(q, k, v, scale=scale, backend=backend)
            with torch.no_grad():
                self._record(q, k, lse, layout, ctx, scale, q.shape[2])
            return out
        # A padded suffix prompt (HunyuanVideo): rows grouped by valid text length, each measured on its valid
        # tokens (the order's first nv + L entries are those tokens); padded queries attend to the valid keys.
        assert layout.text_lengths is not None
        out = torch.empty_like(q)
        nv = layout.num_visual
        for length in sorted(set(layout.text_lengths)):
            sel = [i for i, n in enumerate(layout.text_lengths) if n == length]
            n = nv + length
            qs, ks, vs = q[sel], k[sel], v[sel]
            o, lse = attention_with_lse(qs[:, :, :n], ks[:, :, :n], vs[:, :, :n], scale=scale, backend=backend)
            out[sel, :, :n] = o
            if n < q.shape[2]:
                out[sel, :, n:] = sdpa(qs[:, :, n:], ks[:, :, :n], vs[:, :, :n], scale=scale)
            with torch.no_grad():
                self._record(qs[:, :, :n], ks[:, :, :n], lse, layout, ctx, scale, n)
        return out

    def _layer(self, layer: str, layout: TokenLayout, heads: int, device: torch.device) -> _LayerStats:
        st = self.stats.get(layer)
        assert layout.grid is not None
        geometry = (layout.grid, layout.num_tokens, layout.num_text, layout.text_first, heads)
        if st is None:
            n_orders = len(axis_orders_for(len(layout.grid)))
            st = _LayerStats(*geometry, sparse_sum=torch.zeros(heads, n_orders, dtype=torch.float64),
                             quant_sum=torch.zeros(heads, n_orders, dtype=torch.float64))
            first = next(iter(self.stats.values()), None)
            if first is not None and (first.grid, first.num_tokens, first.num_text, first.text_first,
                                      first.heads) != geometry:
                if (first.grid, first.heads) == (layout.grid, heads):  # the model itself mixes token sets
                    raise ConfigError(
                        f"paro calibration: layer {layer} attends over {layout.num_text} text tokens with the "
                        f"{'x'.join(map(str, layout.grid))} grid, earlier layers over {first.num_text} (e.g. FLUX.3's "
                        "image mode blocks without text and its joint blocks with it): one PARO plan serves one token "
                        "geometry, so PARO does not run on this model (any size)"
                    )
                raise ConfigError(
                    f"paro calibration: layer {layer} has grid {layout.grid}, {layout.num_text} text tokens and {heads} "
                    f"heads but earlier layers had {first.grid}, {first.num_text} and {first.heads}: one plan serves "
                    "one geometry; calibrate with one size"
                )
            self.stats[layer] = st
        elif (st.grid, st.num_tokens, st.num_text, st.text_first, st.heads) != geometry:
            raise ConfigError(
                f"paro calibration: layer {layer} changed geometry between calls (grid {st.grid}, {st.num_tokens} "
                f"tokens, {st.num_text} text -> grid {layout.grid}, {layout.num_tokens} tokens, {layout.num_text} "
                "text): one PARO plan serves one token geometry; calibrate every prompt at the same size (a pipeline "
                "that runs its prompt and negative prompt at different text lengths, as Qwen-Image does, cannot use "
                "PARO)"
            )
        return st

    def _record(self, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, layout: TokenLayout, ctx: RunContext,
                scale: float, n: int) -> None:
        """Record one call's statistics; ``q``/``k``/``lse`` hold the first ``n`` tokens of the layout's sequence
        (all of them, or the valid ones of a padded suffix prompt)."""
        layer = ctx.layer or ""
        heads = q.shape[1]
        st = self._layer(layer, layout, heads, q.device)
        steps = self._steps(ctx)
        bucket = bucket_of(ctx.step, steps, self.num_buckets(steps))
        text = layout_text_spec(layout)
        grid = layout.grid
        assert grid is not None
        if st.orders is None and self.prompt_index == 0 and ctx.step < self.config.search_steps:
            n_orders = st.sparse_sum.shape[1]
            offset = layout.num_text if layout.text_first else 0
            pending = []
            for o in range(n_orders):
                vis = visual_axis_order(grid, o).to(q.device) + offset
                sparse, quant = order_metrics(q, k, lse, vis, self.block, self.config.sample_blocks, scale,
                                              self.eps, self.sigma)
                st.sparse_sum[:, o] += sparse.double().cpu()
                st.quant_sum[:, o] += quant.double().cpu()
                full = head_token_order(grid, [o], text)[0, :n].to(q.device)
                pending.append(_padded_mass(_mass(q, k, lse, full.expand(heads, -1), self.block, scale,
                                                  self.config.backend), layout.num_tokens, self.block))
            st.searches += 1
            stacked = torch.stack(pending)
            st.pending[bucket] = st.pending[bucket] + stacked if bucket in st.pending else stacked
            return
        if st.orders is None:
            self._choose(st)
        assert st.token_order is not None or st.orders is not None
        if st.token_order is None or st.token_order.device != q.device:
            st.token_order = head_token_order(grid, st.orders.tolist(), text).to(q.device)
        mass = _padded_mass(_mass(q, k, lse, st.token_order[:, :n], self.block, scale, self.config.backend),
                            layout.num_tokens, self.block)
        st.mass[bucket] = st.mass[bucket] + mass if bucket in st.mass else mass

    def _choose(self, st: _LayerStats) -> None:
        """Fix the layer's orders from the search statistics and fold the search steps' masses into its buckets."""
        if st.searches == 0:
            raise ConfigError("paro calibration: no search step was recorded (search_steps must cover step 0)")
        st.orders = select_orders(st.sparse_sum / st.searches, st.quant_sum / st.searches, float(self.config.alpha))
        for bucket, stacked in st.pending.items():
            chosen = stacked[st.orders.to(stacked.device), torch.arange(st.heads, device=stacked.device)]
            st.mass[bucket] = st.mass[bucket] + chosen if bucket in st.mass else chosen
        st.pending.clear()

    # ------------------------------------------------------------------ the plan
    def build_plan(self, *, model: str, config_hash: str, package_version: str, prompts: int) -> ParoPlan:
        """Masks at the target density per (bucket, layer, head) from the recorded masses, orders, recall."""
        if not self.stats:
            raise ConfigError("paro calibration recorded no attention call: is the model a supported DiT?")
        steps = self.num_steps
        if steps is None:
            raise ConfigError("paro calibration: the number of steps is unknown")
        nb = self.num_buckets(steps)
        layers = list(self.stats)
        first = self.stats[layers[0]]
        flags = text_blocks(first.num_tokens, first.num_text, first.text_first, self.block)
        masks, orders, recall, density = [], [], [], []
        for name in layers:
            st = self.stats[name]
            if st.orders is None:
                self._choose(st)
            missing = [b for b in range(nb) if b not in st.mass]
            if missing:
                raise ConfigError(
                    f"paro calibration: layer {name} recorded no step of bucket(s) {missing}; run all {steps} steps"
                )
            per_bucket, rec, den = [], [], []
            for b in range(nb):
                mass = st.mass[b].float().cpu()
                keep = keep_from_mass(mass, self.density, flags)
                total = mass.sum((-1, -2)).clamp_min(1e-30)
                rec.append((mass * keep).sum((-1, -2)) / total)
                den.append(keep.float().mean((-1, -2)))
                per_bucket.append(pack_bits(keep))
            masks.append(torch.stack(per_bucket))
            orders.append(st.orders.to(torch.int8).cpu())
            recall.append(torch.stack(rec).mean(0))
            density.append(torch.stack(den).mean(0))
        return ParoPlan(
            model=model, config_hash=config_hash, grid=first.grid, text_len=first.num_text,
            text_first=first.text_first, heads=first.heads, layers=tuple(layers), density=self.density,
            steps=steps, num_buckets=nb, block=self.block, alpha=float(self.config.alpha),
            orders=torch.stack(orders), masks=torch.stack(masks, dim=1).contiguous(),
            recall=torch.stack(recall).float(), kept_density=torch.stack(density).float(), prompts=prompts,
            package_version=package_version,
        )


def _gather(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` (B, H, N[, D]) in a per-head order (H, N)."""
    B, H = x.shape[:2]
    if x.dim() == 3:
        return x.gather(2, order.unsqueeze(0).expand(B, H, -1))
    return x.gather(2, order.view(1, H, -1, 1).expand(B, H, -1, x.shape[-1]))


def _padded_mass(mass: torch.Tensor, num_tokens: int, block: int) -> torch.Tensor:
    """A block mass of the first tokens, zero-padded to the blocks of the whole ``num_tokens`` sequence."""
    nb = -(-num_tokens // block)
    return torch.nn.functional.pad(mass, (0, nb - mass.shape[-1], 0, nb - mass.shape[-2]))


def _mass(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, order: torch.Tensor, block: int, scale: float,
          backend: str) -> torch.Tensor:
    """Block attention mass in the kernel order ``order`` (heads, N), summed over the batch: (H, nqb, nkb)."""
    order = order.long()
    mass = block_attention_mass(_gather(q, order), _gather(k, order), _gather(lse, order), block, scale=scale,
                                backend=backend)
    return mass.sum(0)


def order_metrics(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, visual: torch.Tensor, block: int,
                  sample_blocks: int, scale: float, eps: float = EPS, sigma: float = SIGMA,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """PARO's ``M_sparse`` and ``M_quant`` per head on sampled query blocks of the visual tokens in one order.

    ``visual`` lists the sequence positions of the visual tokens in the order under test. Query blocks are
    ``sample_blocks`` evenly spaced blocks of that order (the same block indices for every order); their exact
    probabilities ``exp(scale * q.k - lse)`` against every visual key are tiled into ``block x block`` groups
    (ragged last groups counted by their valid entries). Returns ``(sparse_fraction, incoherence)``, each
    ``(heads,)`` float64, averaged over the batch and the sampled blocks.
    """
    B, H, _, D = q.shape
    nv = visual.numel()
    nvb = -(-nv // block)
    picks = torch.linspace(0, nvb - 1, min(sample_blocks, nvb)).round().long().unique().tolist()
    kv = k[:, :, visual].float()
    pad = nvb * block - nv
    col_valid = torch.ones(nvb * block, dtype=torch.bool, device=q.device)
    if pad:
        col_valid[nv:] = False
    sparse_blocks = torch.zeros(H, dtype=torch.float64, device=q.device)
    incoh_sum = torch.zeros(H, dtype=torch.float64, device=q.device)
    incoh_n = torch.zeros(H, dtype=torch.float64, device=q.device)
    total = 0
    for b in picks:
        rows = visual[b * block: min((b + 1) * block, nv)]
        r = rows.numel()
        p = torch.exp((q[:, :, rows].float() @ kv.transpose(-1, -2)) * scale - lse[:, :, rows, None])
        p = torch.nn.functional.pad(p, (0, pad)).view(B, H, r, nvb, block)
        valid = col_valid.view(1, 1, 1, nvb, block)
        count = (valid.sum((2, 4)) * r).double()  # (1, 1, nvb): valid entries per group
        small = ((p < eps) & valid).sum((2, 4)).double() / count
        sparse_blocks += (small >= sigma).double().sum((0, 2))
        pmax = p.masked_fill(~valid, 0.0).amax((2, 4)).double()
        pmean = p.masked_fill(~valid, 0.0).sum((2, 4)).double() / count
        ok = pmean > 0
        incoh_sum += torch.where(ok, pmax / pmean.clamp_min(1e-300), torch.zeros_like(pmax)).sum((0, 2))
        incoh_n += ok.double().sum((0, 2))
        total += B * nvb
    return sparse_blocks / max(total, 1), incoh_sum / incoh_n.clamp_min(1)
