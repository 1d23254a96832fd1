"""Agent Attention: softmax attention through a small set of agent tokens, linear in the number of tokens.

Han et al., "Agent Attention: On the Integration of Softmax and Linear Attention" (ECCV 2024), code
``LeapLabTHU/Agent-Attention``. With ``n`` agent tokens ``A`` (``n`` much smaller than the ``N`` tokens),

    stage 1 (agents gather):     V_A = softmax(A·Kᵀ·s) · V                     n × d
    stage 2 (agents broadcast):  O   = softmax(Q·Aᵀ·s^p) · V_A  +  c·V          N × d

with ``s = d^-½``. Both stages are ordinary softmax attentions (SDPA calls) of cost ``O(N·n·d)``.

Two ways to choose the agents (``mode``):

* ``"agentsd"``, the training-free Stable Diffusion recipe (``agentsd/patch.py``, ``agentsd/merge.py``, README):
  the block's self-attention tokens are merged with ToMe (ratio ``ratio``) and the agents are the same tokens
  merged much further (``agent_ratio``) from one similarity ranking; ``p = 0.3`` (logits × d^-0.15), ``c =
  0.075``, no agent bias or depthwise convolution. Only in the highest-resolution attention level, only for the
  first 20 of 50 steps (``agent_fraction=0.4``); afterwards plain ToMe (stride 2, ratio 0.4). Agent attention is
  used only when ``2·n < N'`` (``N'`` merged tokens), as upstream.
* ``"pooled"``, for DiTs: agents are the queries average-pooled over the visual grid to ``agent_grid`` (the
  paper's general form: A = AdaptiveAvgPool(Q), 7×7 = 49 agents). No merging.
* ``"auto"`` (default) picks ``agentsd`` on UNet levels (``layout.hierarchical``, set by the adapter) and
  ``pooled`` on transformers (joint-attention and video DiTs).

Text tokens of joint attention (SD3, FLUX, video DiTs) stay exact: text queries attend to every key with plain
softmax attention; visual queries go through the agents, whose stage 1 attends to every key (text included).
Cross-attention and calls with an attention mask are not changed (agent attention cannot take arbitrary
masks, maintainers in LeapLabTHU/Agent-Attention#32; a mask falls back to dense with a warning).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F

from diffaccel.context import RunContext
from diffaccel.errors import ConfigError
from diffaccel.layout import TokenLayout
from diffaccel.methods.base import (
    MethodBase,
    MethodConfig,
    check_choice,
    check_positive_int,
    config_help,
    options_without_effect,
    register_method,
    sdpa,
)
from diffaccel.methods._tome import MergePlan, bipartite_matching
from diffaccel.warn import warn_once

MODES = ("auto", "agentsd", "pooled")
MODE_SCOPES = ("agentsd", "pooled")
"""Modes whose options are marked by a ``"mode: ..."`` help prefix (a changed option of the other mode warns once)."""
METRICS = ("keys", "queries", "values")

# AgentSD README recipe for SD 1.5, 50 PLMS steps: apply_patch(sx=4, sy=4, ratio=0.4, agent_ratio=0.95) at
# step 0, apply_patch(sx=2, sy=2, ratio=0.4, agent_ratio=0.5) at step 20 (which leaves only ToMe active).
_UPSTREAM_AGENT_STEPS = 20


@dataclass
class AgentConfig(MethodConfig):
    """Agent attention settings; defaults are the AgentSD README recipe (``agentsd/README.md``) and the paper."""

    mode: str = field(default="auto", metadata=config_help(
        "'agentsd' (UNets: ToMe-merged agents, AgentSD recipe), 'pooled' (DiTs: agents = queries average-pooled), "
        "or 'auto': agentsd on UNet levels (layout.hierarchical), pooled on transformers"))
    agent_fraction: float | None = field(default=None, metadata=config_help(
        "fraction of the denoising steps that use agent attention, from the start; None: 0.4 for agentsd "
        "(20 of 50 steps, AgentSD README), 1.0 for pooled"))
    stage2_power: float = field(default=0.3, metadata=config_help(
        "stage-2 logit scale is scale**power: 0.3 gives d^-0.15 (AgentSD k_scale2)"))
    shortcut: float = field(default=0.075, metadata=config_help(
        "weight c of the +c*V term that replaces the trained depthwise conv (AgentSD k_shortcut)"))
    fp32_logits: bool = field(default=False, metadata=config_help(
        "compute both stages in float32 (AgentSD attn_precision='fp32'; recommended for SD 2.1)"))
    # agentsd
    ratio: float = field(default=0.4, metadata=config_help("agentsd: fraction of tokens ToMe merges away for attention"))
    agent_ratio: float = field(default=0.95, metadata=config_help(
        "agentsd: fraction of tokens merged away to form the agents (same similarity ranking)"))
    stride: tuple[int, int] = field(default=(4, 4), metadata=config_help(
        "agentsd: (sy, sx) destination cell during the agent steps"))
    late_stride: tuple[int, int] = field(default=(2, 2), metadata=config_help(
        "agentsd: (sy, sx) destination cell of the ToMe-only steps after the agent steps"))
    late_tome: bool = field(default=True, metadata=config_help(
        "agentsd: after the agent steps keep ToMe merging (upstream recipe); False runs exact attention"))
    max_downsample: int | None = field(default=None, metadata=config_help(
        "agentsd: deepest UNet level (layout.downsample: latent/level size) to change; None: the highest-"
        "resolution level that has attention (1 on SD 1.x as upstream, 2 on SDXL)"))
    metric: str = field(default="keys", metadata=config_help(
        "agentsd: token similarity for merging ('keys' as in ToMe; AgentSD uses the block input, which an "
        "attention processor does not see)"))
    use_rand: bool = field(default=True, metadata=config_help(
        "agentsd: random destination inside each cell (ToMeSD); off for odd batch sizes, as upstream"))
    seed: int = field(default=0, metadata=config_help("agentsd: seed of the destination choice"))
    # pooled
    agent_grid: tuple[int, ...] = field(default=(7, 7), metadata=config_help(
        "pooled: agent grid, aligned to the trailing grid dimensions (a 2-entry grid pools all frames of a video "
        "together); clamped to the token grid. Paper: 7x7 = 49 agents"))

    def validate(self) -> None:
        check_choice("mode", self.mode, MODES)
        check_choice("metric", self.metric, METRICS)
        if self.agent_fraction is not None and not (
            isinstance(self.agent_fraction, (int, float)) and 0.0 <= float(self.agent_fraction) <= 1.0
        ):
            raise ConfigError(f"agent_fraction must be in [0, 1] or None, got {self.agent_fraction!r}")
        for name in ("ratio", "agent_ratio"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not (0.0 <= float(value) < 1.0):
                raise ConfigError(f"{name} must be in [0, 1), got {value!r}")
        if self.agent_ratio < self.ratio:
            raise ConfigError(
                f"agent_ratio ({self.agent_ratio}) must be >= ratio ({self.ratio}): agents merge further than the "
                "attention tokens"
            )
        for name in ("stage2_power", "shortcut"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("stride", "late_stride"):
            value = tuple(getattr(self, name)) if isinstance(getattr(self, name), (tuple, list)) else None
            if value is None or len(value) != 2 or any(not isinstance(s, int) or s < 1 for s in value):
                raise ConfigError(f"{name} must be two positive integers (sy, sx), got {getattr(self, name)!r}")
            setattr(self, name, value)
        if self.max_downsample is not None:
            check_positive_int("max_downsample", self.max_downsample)
        grid = tuple(self.agent_grid) if isinstance(self.agent_grid, (tuple, list)) else None
        if grid is None or not (1 <= len(grid) <= 3) or any(not isinstance(s, int) or s < 1 for s in grid):
            raise ConfigError(f"agent_grid must be 1 to 3 positive integers, got {self.agent_grid!r}")
        self.agent_grid = grid
        check_positive_int("seed", self.seed, minimum=0)

    def resolved_agent_fraction(self, mode: str) -> float:
        if self.agent_fraction is not None:
            return float(self.agent_fraction)
        return 0.4 if mode == "agentsd" else 1.0


@register_method
class AgentMethod(MethodBase):
    """Agent attention on self/joint attention with a visual grid (see the module docstring)."""

    name = "agent"
    config_class = AgentConfig
    config: AgentConfig

    def __init__(self, config: AgentConfig | None = None, **overrides) -> None:
        super().__init__(config, **overrides)
        self._generators: dict[torch.device, torch.Generator] = {}

    # ------------------------------------------------------------------------------------------ dispatch

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
        if attn_mask is not None:
            warn_once("agent-mask", "agent: attention calls with a mask run dense (agent attention cannot take masks)")
            return self.dense_fallback(q, k, v, attn_mask=attn_mask, scale=scale)
        if k.shape[2] != q.shape[2]:
            return self.dense_fallback(q, k, v, scale=scale)
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        cfg = self.config
        mode = resolve_mode(cfg.mode, layout, ctx)
        unused = options_without_effect(cfg, mode, MODE_SCOPES)
        if unused:
            where = "UNets (agentsd mode)" if mode == "pooled" else "transformers (pooled mode)"
            warn_once(f"agent-unused-{mode}", f"agent: {', '.join(unused)} has no effect in {mode} mode (this "
                      f"model); it applies to {where}")
        agent_step = self._in_agent_steps(ctx, mode)
        if mode == "pooled":
            if not agent_step:
                return self.dense_fallback(q, k, v, scale=scale)
            return pooled_agent_attention(
                q, k, v, layout, agent_grid=cfg.agent_grid, scale=scale, stage2_power=cfg.stage2_power,
                shortcut=cfg.shortcut, fp32=cfg.fp32_logits,
            )
        if not self._in_high_resolution_level(layout, ctx):
            return self.dense_fallback(q, k, v, scale=scale)
        if not agent_step and not cfg.late_tome:
            return self.dense_fallback(q, k, v, scale=scale)
        stride = cfg.stride if agent_step else cfg.late_stride
        generator = self._generator(ctx, q.shape[0], q.device) if cfg.use_rand else None
        metric = {"keys": k, "queries": q, "values": v}[cfg.metric]
        visual = layout.visual
        metric = metric[:, :, visual].transpose(1, 2).reshape(q.shape[0], layout.num_visual, -1)
        grid = layout.grid
        matching = bipartite_matching(metric, grid, _stride_for(grid, stride), generator=generator)
        n = layout.num_visual
        plan = matching.plan(int(n * cfg.ratio))
        agent_plan = matching.plan(int(n * cfg.agent_ratio)) if agent_step else None
        return agentsd_attention(
            q, k, v, layout, plan, agent_plan, scale=scale, stage2_power=cfg.stage2_power,
            shortcut=cfg.shortcut, fp32=cfg.fp32_logits,
        )

    # ------------------------------------------------------------------------------------------ schedule

    def _in_agent_steps(self, ctx: RunContext, mode: str) -> bool:
        fraction = self.config.resolved_agent_fraction(mode)
        if fraction >= 1.0:
            return True
        if ctx.num_steps is None:
            warn_once(
                "agent-num-steps",
                f"agent: the number of denoising steps is unknown (processor installed without diffaccel.apply, or "
                f"a pipeline without a scheduler); agent attention runs for the first {_UPSTREAM_AGENT_STEPS} steps "
                "as in the AgentSD recipe",
            )
            return ctx.step < _UPSTREAM_AGENT_STEPS
        return ctx.step < round(fraction * ctx.num_steps)

    def _in_high_resolution_level(self, layout: TokenLayout, ctx: RunContext) -> bool:
        """``layout.downsample <= max_downsample``; by default the highest-resolution attention level
        (``layout.finest_downsample``: 1 on SD 1.x, 2 on SDXL), both from the adapter."""
        limit = layout.finest_downsample if self.config.max_downsample is None else self.config.max_downsample
        return layout.downsample <= limit

    def _generator(self, ctx: RunContext, batch: int, device: torch.device) -> torch.Generator | None:
        """A generator on ``device`` seeded by (seed, step, layer): reproducible, and drawn without host syncs.

        Streams differ between CPU and CUDA, so the destinations do too.
        """
        if batch % 2 == 1:
            return None  # ToMeSD: random destinations only with paired (uncond, cond) batches
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device)
        layer = zlib.crc32((ctx.layer or "").encode())
        return generator.manual_seed((self.config.seed * 1_000_003 + ctx.step * 7919 + layer) % (2**63))


def resolve_mode(mode: str, layout: TokenLayout, ctx: RunContext) -> str:
    """``auto``: ``agentsd`` on a UNet level (``layout.hierarchical``, set by the adapter), ``pooled`` on a
    transformer (joint-attention and video DiTs)."""
    if mode != "auto":
        return mode
    return "agentsd" if layout.hierarchical else "pooled"


def _stride_for(grid: tuple[int, ...], stride: tuple[int, int]) -> tuple[int, ...]:
    """The (sy, sx) cell on the trailing two grid dimensions; frames (and 1-D grids) are not grouped."""
    if len(grid) == 1:
        return (stride[1],)
    return (1,) * (len(grid) - 2) + tuple(min(s, g) for s, g in zip(stride, grid[-2:]))


# ---------------------------------------------------------------------------------------------- the math


def two_stage_attention(
    q: torch.Tensor,
    agents: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    stage2_power: float,
) -> torch.Tensor:
    """``softmax(q·agentsᵀ·scale^power) · softmax(agents·kᵀ·scale) · v`` as two SDPA calls."""
    agent_values = F.scaled_dot_product_attention(agents, k, v, scale=scale)
    return F.scaled_dot_product_attention(q, agents, agent_values, scale=scale**stage2_power)


def pool_queries(q_visual: torch.Tensor, grid: tuple[int, ...], agent_grid: tuple[int, ...]) -> torch.Tensor:
    """Visual queries ``(B, H, N, d)`` average-pooled over ``grid`` to ``agent_grid``: ``(B, H, n, d)``.

    ``agent_grid`` is aligned to the trailing grid dimensions, leading ones pool to 1; every size is clamped to
    the grid. Windows are those of ``adaptive_avg_pool`` (``[floor(i·G/g), ceil((i+1)·G/g))``).
    """
    target = (1,) * (len(grid) - len(agent_grid)) + tuple(agent_grid[-len(grid):])
    target = tuple(min(t, g) for t, g in zip(target, grid))
    b, h, n, d = q_visual.shape
    # Separable: adaptive windows are products of per-axis windows, so sum along one axis at a time with a small
    # 0/1 (out x size) matrix (tensor-core GEMMs, no N-sized table), then divide by the window sizes once.
    x = q_visual.transpose(1, 2).reshape(b, *grid, h * d)
    for axis, (size, out) in enumerate(zip(grid, target)):
        members = _window_members(size, out, q_visual.device, q_visual.dtype)
        x = torch.matmul(members, x.movedim(1 + axis, -2)).movedim(-2, 1 + axis)
    agents = x.reshape(b, -1, h * d) * _inverse_window_sizes(tuple(grid), target, q_visual.device, q_visual.dtype)
    return agents.reshape(b, -1, h, d).transpose(1, 2)


@lru_cache(maxsize=64)
def _window_members(size: int, out: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(out, size)`` 0/1: position ``j`` lies in adaptive-pooling window ``[floor(i·size/out), ceil((i+1)·size/out))``."""
    pos = torch.arange(size)
    lo = torch.tensor([(i * size) // out for i in range(out)])
    hi = torch.tensor([-((-(i + 1) * size) // out) for i in range(out)])
    return ((pos[None, :] >= lo[:, None]) & (pos[None, :] < hi[:, None])).to(device=device, dtype=dtype)


@lru_cache(maxsize=64)
def _inverse_window_sizes(
    grid: tuple[int, ...], target: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """``(prod(target), 1)``: 1 / the number of tokens in each agent's window (row-major over the agent grid)."""
    sizes = torch.ones(1, dtype=torch.float64)
    for size, out in zip(grid, target):
        per_axis = _window_members(size, out, torch.device("cpu"), torch.float64).sum(dim=1)
        sizes = (sizes[:, None] * per_axis[None, :]).reshape(-1)
    return (1.0 / sizes).unsqueeze(1).to(device=device, dtype=dtype)


def pooled_agent_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: TokenLayout,
    *,
    agent_grid: tuple[int, ...],
    scale: float,
    stage2_power: float = 0.3,
    shortcut: float = 0.075,
    fp32: bool = False,
) -> torch.Tensor:
    """Pooled-agent attention of a self/joint call: visual rows through the agents, text rows exact."""
    visual = layout.visual
    grid = layout.grid
    dtype = q.dtype
    qv = q[:, :, visual]
    agents = pool_queries(qv, grid, agent_grid)
    if 2 * agents.shape[2] >= layout.num_visual:
        return sdpa(q, k, v, scale=scale)  # agents would not be fewer than the tokens: exact attention
    qs, ks, vs, agents = _maybe_fp32((qv, k, v, agents), fp32)
    out_visual = two_stage_attention(qs, agents, ks, vs, scale=scale, stage2_power=stage2_power)
    if shortcut:
        out_visual.add_(vs[:, :, visual], alpha=shortcut)
    return _assemble(out_visual.to(dtype), q, k, v, layout, scale)


def agentsd_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: TokenLayout,
    plan: MergePlan,
    agent_plan: MergePlan | None,
    *,
    scale: float,
    stage2_power: float = 0.3,
    shortcut: float = 0.075,
    fp32: bool = False,
) -> torch.Tensor:
    """AgentSD self-attention on ToMe-merged visual tokens, unmerged back; text rows exact.

    ``plan`` merges the attention tokens, ``agent_plan`` (or ``None`` for ToMe only) the agents. Merging
    projected q, k, v equals projecting merged hidden states, as the projections are affine.
    """
    visual = layout.visual
    dtype = q.dtype
    qm, km, vm = plan.merge_many(q[:, :, visual], k[:, :, visual], v[:, :, visual])
    text = layout.text if layout.num_text else None
    keys = km if text is None else torch.cat([km, k[:, :, text]], dim=2)
    values = vm if text is None else torch.cat([vm, v[:, :, text]], dim=2)
    agents = agent_plan.merge(q[:, :, visual]) if agent_plan is not None else None
    if agents is not None and 2 * agents.shape[2] < plan.num_merged_tokens:
        qs, ks, vs, agents = _maybe_fp32((qm, keys, values, agents), fp32)
        out = two_stage_attention(qs, agents, ks, vs, scale=scale, stage2_power=stage2_power)
        if shortcut:
            out.add_(vs[:, :, : plan.num_merged_tokens], alpha=shortcut)
        out = out.to(dtype)
    else:
        out = sdpa(qm, keys, values, scale=scale)
    return _assemble(plan.unmerge(out), q, k, v, layout, scale)


def _assemble(
    out_visual: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, scale: float
) -> torch.Tensor:
    """Visual rows plus exact text rows, in the layout's token order."""
    if not layout.num_text:
        return out_visual
    out_text = sdpa(q[:, :, layout.text], k, v, scale=scale)
    parts = [out_text, out_visual] if layout.text_first else [out_visual, out_text]
    return torch.cat(parts, dim=2)


def _maybe_fp32(tensors: tuple[torch.Tensor, ...], fp32: bool) -> tuple[torch.Tensor, ...]:
    return tuple(t.float() for t in tensors) if fp32 else tensors
