"""PAROAttention: calibrated per-head token reordering, static block masks per timestep bucket, optional INT8.

Zhao et al., "PAROAttention: Pattern-Aware ReOrdering for Efficient Sparse and Quantized Attention in Visual
Generation Models" (arXiv 2506.16054, NeurIPS 2025); ``research/sparse_quant.md`` §1 and ``METHODS.md``.

Offline, ``diffaccel calibrate --method paro`` picks one axis order of the visual grid per (layer, head) and block
masks per (timestep bucket, layer, head) at a target density (:mod:`diffaccel.methods.paro_calibration`), written
as a plan (:mod:`diffaccel.methods.paro_plan`). At run time each call is one kernel launch:

* the head's order as the kernel's ``token_order`` ``(heads, tokens)``: Q, K, V rows are read through it and output
  rows written back through it (the inverse order costs no pass); text stays in place, its blocks dense;
* the plan's block mask of the current step's bucket (``ctx.step`` / ``ctx.num_steps``), uploaded to the device once
  per layer (bit-packed) and unpacked once per bucket change, never per call;
* optional ``qk_int8`` (per-block scales, K smoothed) and ``pv_int8`` (P with the fixed scale 1/127 after the online
  softmax, V per channel; accumulation in float32, so large-magnitude V does not overflow fp16 as the authors'
  FP16-accumulating kernel did, which had to rescale ``to_v`` by 8).

Families: every DiT whose visual grid is ``(F, H, W)`` (Wan, HunyuanVideo, CogVideoX, LTX) or ``(H, W)`` (FLUX,
SD3). UNets (hierarchical layouts) are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffaccel.context import RunContext
from diffaccel.errors import ConfigError
from diffaccel.kernels import SparseBlockMask, block_sparse_attention_unchecked
from diffaccel.layout import TokenLayout
from diffaccel.methods.base import (
    MethodBase,
    MethodConfig,
    check_backend,
    check_density,
    check_positive_int,
    config_help,
    register_method,
    sdpa,
)
from diffaccel.methods.paro_plan import ParoPlan, bucket_of, load_plan, unpack_bits
from diffaccel.sparse.axis_orders import head_token_order
from diffaccel.sparse.checks import check_block_size
from diffaccel.sparse.text import layout_text_spec
from diffaccel.warn import warn_once

DEFAULT_DENSITY = 0.5
"""Calibration density when neither the plan nor the user says: the paper's headline setting (CogVideoX-5B PSNR
29.14 at 0.5, Table 1)."""
DEFAULT_BLOCK = 64
"""64x64 blocks: the paper's mask and quantization granularity (aligned with its FlashAttention tiles)."""
DEFAULT_ALPHA = 0.5
"""The paper does not report alpha; 0.5 weighs sparsity and incoherence equally (our choice, documented)."""


@dataclass
class ParoConfig(MethodConfig):
    """A PARO plan and the kernel options; the calibration fields are used when no plan is given."""

    plan: Any = field(default=None, metadata=config_help(
        "plan.safetensors written by `diffaccel calibrate --method paro` (or a loaded ParoPlan); None: "
        "`diffaccel generate` calibrates on the prompt and saves the plan next to the outputs"))
    density: float | None = field(default=None, metadata=config_help(
        "fraction of key blocks kept (calibration); None: the plan's, 0.5 when calibrating (paper Table 1)"))
    block_size: int | None = field(default=None, metadata=config_help(
        "mask block in tokens (calibration); None: the plan's, 64 when calibrating (paper)"))
    alpha: float = field(default=DEFAULT_ALPHA, metadata=config_help(
        "order choice weight: alpha * (1 - sparsity) + (1 - alpha) * incoherence, each normalised over the orders"))
    num_buckets: int | None = field(default=None, metadata=config_help(
        "mask buckets over the steps (calibration); None: one per step of the first half + one shared"))
    search_steps: int = field(default=2, metadata=config_help(
        "calibration steps (of the first prompt) whose attention chooses the orders"))
    sample_blocks: int = field(default=4, metadata=config_help(
        "query blocks per head sampled for the order search's element statistics"))
    qk_int8: bool = field(default=False, metadata=config_help(
        "INT8 Q.K (per-block scales, K smoothed)"))
    pv_int8: bool = field(default=False, metadata=config_help(
        "INT8 P.V (P with the fixed scale 1/127, V per channel, float32 accumulation)"))
    backend: str = field(default="auto", metadata=config_help("kernel backend: auto, triton or reference"))

    def validate(self) -> None:
        if self.plan is not None and not isinstance(self.plan, (str, Path, ParoPlan)):
            raise ConfigError(f"plan must be a path to a plan.safetensors, a ParoPlan or None, got {self.plan!r}")
        if isinstance(self.plan, (str, Path)) and not Path(self.plan).is_file():
            raise ConfigError(
                f"plan {str(self.plan)!r} does not exist; write one with `diffaccel calibrate --method paro --model "
                "MODEL --prompts PROMPTS --out PLAN`, or leave plan unset to calibrate on the fly"
            )
        if self.density is not None:
            check_density("density", self.density)
        if self.block_size is not None:
            check_block_size(self.block_size)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be a number in [0, 1], got {self.alpha!r}")
        if self.num_buckets is not None:
            check_positive_int("num_buckets", self.num_buckets)
        check_positive_int("search_steps", self.search_steps)
        check_positive_int("sample_blocks", self.sample_blocks)
        for name in ("qk_int8", "pv_int8"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        check_backend(self.backend)


@dataclass
class _LayerState:
    """One layer's run state on one device: the per-head order, the packed masks, the current bucket's mask."""

    order: torch.Tensor  # (heads, tokens) int32 on the device
    packed: torch.Tensor  # (buckets, heads, q_blocks, kv_bytes) uint8 on the device
    all_kept: tuple[bool, ...]  # per bucket: every block kept (density 1) -> the dense mask, SDPA fast path
    bucket: int = -1
    mask: SparseBlockMask | None = None
    keep: torch.Tensor | None = None
    cut: dict = field(default_factory=dict)  # valid tokens -> (mask, order) of a padded suffix prompt, this bucket


@register_method
class ParoMethod(MethodBase):
    """PAROAttention: calibrated per-head axis orders + static block masks per timestep bucket + optional INT8."""

    name = "paro"
    config_class = ParoConfig
    config: ParoConfig

    def __init__(self, config: ParoConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self._plan: ParoPlan | None = None
        self._states: dict[tuple, _LayerState] = {}
        self._last: dict[str, _LayerState] = {}
        self._model: tuple[str, str] | None = None
        if self.config.plan is not None:
            self.set_plan(self.config.plan)

    # ------------------------------------------------------------------ plan
    @property
    def plan(self) -> ParoPlan | None:
        return self._plan

    def set_plan(self, plan: ParoPlan | str | Path) -> None:
        """Use ``plan`` (a ParoPlan or a path) from now on; cached device state is dropped."""
        loaded = plan if isinstance(plan, ParoPlan) else load_plan(plan)
        cfg = self.config
        if cfg.density is not None and abs(cfg.density - loaded.density) > 1e-9:
            raise ConfigError(
                f"paro: density={cfg.density} but the plan was calibrated at density {loaded.density}; leave density "
                f"unset to use the plan's, or recalibrate with --density {cfg.density}"
            )
        if cfg.block_size is not None:
            loaded.check_block(cfg.block_size)
        if self._model is not None:
            loaded.check_model(*self._model)
        self._plan = loaded
        self._states.clear()
        self._last.clear()

    def note_model(self, model: str, config_hash: str) -> None:
        """Told by the pipeline layer when applied (:mod:`diffaccel.pipelines.model_setup`): refuse a plan of
        another model now, and any plan set later."""
        self._model = (model, config_hash)
        if self._plan is not None:
            self._plan.check_model(model, config_hash)

    # ------------------------------------------------------------------ running
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
        plan = self._plan
        if plan is None:
            raise ConfigError(
                "paro needs a calibrated plan: pass plan=PATH (from `diffaccel calibrate --method paro`), or run "
                "`diffaccel generate --method paro`, which calibrates on its prompt first"
            )
        padded = attn_mask is not None and not _mask_is_no_op(layout)
        if padded and not suffix_padding(layout):
            warn_once(
                "paro-padded-prompt",
                "diffaccel: paro runs dense attention on calls with an attention mask other than the padding of a "
                "suffix prompt (its plan assumes every text token it sees is valid)",
            )
            return self.dense_fallback(q, k, v, attn_mask=attn_mask, scale=scale)
        state = self._state(plan, layout, ctx, q.shape[1], q.device)
        bucket = bucket_of(ctx.step, plan.steps, plan.num_buckets)
        if bucket != state.bucket:
            self._load_bucket(plan, state, bucket, q.shape[2], q.device)
        self._last[ctx.layer or ""] = state
        cfg = self.config
        if padded:
            return self._padded(q, k, v, layout, state, plan.block, scale)
        return block_sparse_attention_unchecked(
            q, k, v, state.mask, scale=scale, qk_int8=cfg.qk_int8, pv_int8=cfg.pv_int8,
            token_order=state.order, backend=cfg.backend,
        )

    def _padded(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, state: _LayerState,
                block: int, scale: float | None) -> torch.Tensor:
        """A padded suffix prompt (HunyuanVideo): per group of rows with ``L`` valid text tokens, the first
        ``nv + L`` tokens run the plan cut to them (text is in place, so the order's first ``nv + L`` entries are
        exactly those tokens); padded text queries attend densely to the valid keys, as the stock mask makes them."""
        assert layout.text_lengths is not None and state.keep is not None
        cfg = self.config
        out = torch.empty_like(q)
        nv = layout.num_visual
        for length in sorted(set(layout.text_lengths)):
            rows = [i for i, n in enumerate(layout.text_lengths) if n == length]
            sel = slice(rows[0], rows[-1] + 1) if rows == list(range(rows[0], rows[-1] + 1)) else rows
            n = nv + length
            cut = state.cut.get(n)
            if cut is None:
                nb = -(-n // block)
                mask = SparseBlockMask.from_block_keep(state.keep[:, :nb, :nb].unsqueeze(0), q_len=n, kv_len=n,
                                                       q_block_size=block, kv_block_size=block, validate=False)
                cut = state.cut[n] = (mask, state.order[:, :n].contiguous())
            qs, ks, vs = q[sel], k[sel], v[sel]
            out[sel, :, :n] = block_sparse_attention_unchecked(
                qs[:, :, :n], ks[:, :, :n], vs[:, :, :n], cut[0], scale=scale, qk_int8=cfg.qk_int8,
                pv_int8=cfg.pv_int8, token_order=cut[1], backend=cfg.backend,
            )
            if n < q.shape[2]:
                out[sel, :, n:] = sdpa(qs[:, :, n:], ks[:, :, :n], vs[:, :, :n], scale=scale)
        return out

    def _state(self, plan: ParoPlan, layout: TokenLayout, ctx: RunContext, heads: int,
               device: torch.device) -> _LayerState:
        key = (ctx.layer, layout.grid, layout.num_text, layout.text_first, heads, ctx.num_steps, device)
        state = self._states.get(key)
        if state is not None:
            return state
        assert layout.grid is not None
        plan.check_call(grid=layout.grid, text_len=layout.num_text, text_first=layout.text_first, heads=heads,
                        num_steps=ctx.num_steps)
        li = plan.layer_index(ctx.layer or "")
        order = head_token_order(layout.grid, plan.orders[li].tolist(), layout_text_spec(layout))
        packed = plan.masks[:, li]
        nb = plan.num_blocks
        all_kept = tuple(bool(unpack_bits(packed[b].cpu(), nb).all()) for b in range(plan.num_buckets))
        state = _LayerState(order=order.to(device=device, dtype=torch.int32).contiguous(),
                            packed=packed.to(device), all_kept=all_kept)
        self._states[key] = state
        return state

    def _load_bucket(self, plan: ParoPlan, state: _LayerState, bucket: int, n: int, device: torch.device) -> None:
        keep = unpack_bits(state.packed[bucket], plan.num_blocks)
        if state.all_kept[bucket]:
            mask = SparseBlockMask.dense(n, n, plan.block, device=device)
        else:
            mask = SparseBlockMask.from_block_keep(keep.unsqueeze(0), q_len=n, kv_len=n, q_block_size=plan.block,
                                                   kv_block_size=plan.block, validate=False)
        state.bucket, state.mask, state.keep = bucket, mask, keep
        state.cut.clear()

    def kept_blocks(self, layer: str) -> torch.Tensor | None:
        """The key blocks kept at this layer's most recent call: ``(heads, q_blocks, kv_blocks)`` bool, kernel order
        (each head's axis order, text in place); ``None`` before the layer ran."""
        state = self._last.get(layer)
        return None if state is None else state.keep

    def overhead(self) -> dict[str, float] | None:
        """PARO searches nothing at run time (its plan is static)."""
        return None


def check_paro_layout(layout: TokenLayout, layer: str | None) -> None:
    """PARO needs the single 2-D or 3-D token grid of a DiT; a UNet level or a 1-D grid is refused."""
    if layout.hierarchical:
        raise ConfigError(
            f"paro: layer {layer} is a UNet level (hierarchical layout, several token grids per denoiser); PARO's "
            "axis orders and static masks are defined on a DiT's single token grid: use it on FLUX, SD3, Wan, "
            "HunyuanVideo, CogVideoX or LTX-Video"
        )
    if layout.grid is None or len(layout.grid) not in (2, 3):
        raise ConfigError(f"paro: layer {layer} has grid {layout.grid}; PARO needs an (H, W) or (F, H, W) grid")


def suffix_padding(layout: TokenLayout) -> bool:
    """The call's mask is the padding of a suffix prompt described by ``text_lengths`` (valid tokens first)."""
    return layout.text_lengths is not None and layout.num_text > 0 and not layout.text_first


def _mask_is_no_op(layout: TokenLayout) -> bool:
    """The call's mask is the prompt-padding mask with no padding (every text token valid)."""
    lengths = layout.text_lengths
    return lengths is not None and all(n == layout.num_text for n in lengths)
