"""Per-layer configuration and the hot path shared by the locality methods (GNA, attention tiles, CLEAR, MSW-MSA).

:class:`LocalityConfig` holds what every locality method shares: include/exclude patterns on qualified layer names,
per-layer overrides, dense warm-up steps, the kernel backend and block size. :class:`LocalityMethod` turns a call
into a plan of :mod:`diffaccel.sparse` and runs it:

* ``plan(layout, ctx)`` is the method's :class:`~diffaccel.sparse.plans.AttentionPlan` for a layer and step, or
  ``None`` where the layer/step runs dense. Plans are cached per layer, keyed by (layer, grid, text length and
  place, UNet level, heads, device) plus the step-dependent part a method declares (:meth:`plan_key`, e.g. MSW's
  shift), so in steady state a call costs one dict lookup and one kernel launch, with no spec rebuilt or
  re-validated (validation happened when the plan was built).
* Padded prompts: when the adapter sets ``layout.text_lengths`` (valid text tokens per batch row, host ints; the
  call's mask is then exactly that key-padding mask), rows are grouped by length with no host sync. Any other
  mask runs dense with a one-time warning.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from diffaccel.context import RunContext
from diffaccel.errors import ConfigError
from diffaccel.layout import TokenLayout
from diffaccel.methods._online import attend_valid_text
from diffaccel.methods.base import (
    BACKENDS,
    MethodBase,
    MethodConfig,
    check_choice,
    check_positive_int,
    config_help,
    in_dense_steps,
    sdpa,
)
from diffaccel.sparse.checks import check_block_size
from diffaccel.sparse.plans import AttentionPlan
from diffaccel.sparse.run import run_plan
from diffaccel.warn import warn_once

# ----------------------------------------------------------------------------------------------- configs

LAYER_FIELDS = ("layers", "exclude_layers", "layer_overrides")


def _as_patterns(name: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) and p for p in value):
        raise ConfigError(f"{name} must be a list of qualified layer names or glob patterns, got {value!r}")
    return tuple(value)


def layer_matches(layer: str | None, pattern: str) -> bool:
    """Exact match on the qualified name, or a glob (``*``, ``?``, ``[...]``) over the whole name.

    Unlike diffusers' PAG regex search, ``transformer_blocks.1`` matches only that block, never blocks 10-19.
    """
    if layer is None:
        return False
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(layer, pattern)
    return layer == pattern


@dataclass
class LocalityConfig(MethodConfig):
    """Fields every locality method shares: where it applies, warm-up, kernel choices."""

    dense_steps: int = field(default=0, metadata=config_help("first denoising steps run dense (exact)"))
    layers: tuple[str, ...] | None = field(default=None, metadata=config_help(
        "qualified attention-module names (or glob patterns over the whole name) to change; None: every "
        "self/joint attention"))
    exclude_layers: tuple[str, ...] = field(default=(), metadata=config_help(
        "qualified names or glob patterns kept dense"))
    layer_overrides: dict[str, dict[str, Any]] = field(default_factory=dict, metadata=config_help(
        "{name or glob: {field: value}}: per-layer parameters (later patterns win)"))
    block_size: int = field(default=128, metadata=config_help("kernel block (tokens per query/key block, power of 2)"))
    backend: str = field(default="auto", metadata=config_help("'auto', 'triton' or 'reference' (PyTorch)"))

    def validate(self) -> None:
        check_positive_int("dense_steps", self.dense_steps, minimum=0)
        self.layers = _as_patterns("layers", self.layers)
        self.exclude_layers = _as_patterns("exclude_layers", self.exclude_layers) or ()
        check_block_size(self.block_size)
        check_choice("backend", self.backend, BACKENDS)
        if not isinstance(self.layer_overrides, dict):
            raise ConfigError(f"layer_overrides must be a dict {{layer pattern: {{field: value}}}}, got {self.layer_overrides!r}")
        allowed = {f.name for f in dataclasses.fields(self)} - set(LAYER_FIELDS)
        for pattern, values in self.layer_overrides.items():
            if not isinstance(pattern, str) or not pattern or not isinstance(values, dict):
                raise ConfigError(
                    f"layer_overrides maps a layer name or glob to a dict of parameters, got {pattern!r}: {values!r}"
                )
            unknown = sorted(set(values) - allowed)
            if unknown:
                raise ConfigError(
                    f"layer_overrides[{pattern!r}] has unknown parameter(s) {', '.join(unknown)}; allowed: "
                    f"{', '.join(sorted(allowed))}"
                )
            override = dataclasses.replace(self, **values, layer_overrides={}, layers=None, exclude_layers=())
            try:
                override.validate()
            except ConfigError as exc:
                raise ConfigError(f"layer_overrides[{pattern!r}]: {exc}") from None

    def applies_to(self, layer: str | None) -> bool:
        """Whether the method changes attention module ``layer`` (else it runs dense)."""
        if self.layers is not None and not any(layer_matches(layer, p) for p in self.layers):
            return False
        return not any(layer_matches(layer, p) for p in self.exclude_layers)

    def for_layer(self, layer: str | None) -> LocalityConfig:
        """The configuration of ``layer``: this one with every matching override applied in order."""
        values: dict[str, Any] = {}
        for pattern, override in self.layer_overrides.items():
            if layer_matches(layer, pattern):
                values.update(override)
        if not values:
            return self
        resolved = dataclasses.replace(self, **values, layer_overrides={})
        resolved.validate()
        return resolved


def as_int_tuple(name: str, value: Any, *, allow_none: bool = True) -> tuple[int, ...] | int | None:
    """Normalize an int or a list of ints (JSON from the CLI) to an int or a tuple; None passes through."""
    if value is None:
        if allow_none:
            return None
        raise ConfigError(f"{name} must be an integer or a list of integers, got None")
    if isinstance(value, (list, tuple)):
        if not value or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            raise ConfigError(f"{name} must be an integer or a list of integers (one per grid dimension), got {value!r}")
        return tuple(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ConfigError(f"{name} must be an integer or a list of integers (one per grid dimension), got {value!r}")



_MISSING = object()


class LocalityMethod(MethodBase):
    """Base of the locality methods: layer selection, dense steps, per-layer plan cache, padded prompts.

    Subclasses implement :meth:`build_plan` (and :meth:`plan_key` when the plan depends on the step).
    """

    config_class: ClassVar[type[MethodConfig]] = LocalityConfig
    config: LocalityConfig

    def __init__(self, config: LocalityConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self._layer_configs: dict[str | None, LocalityConfig | None] = {}
        self._plans: dict[tuple, AttentionPlan | None] = {}
        self._row_groups: dict[tuple, list[tuple[int, torch.Tensor | None]]] = {}
        self._last_plans: dict[str | None, tuple[AttentionPlan, int, int] | None] = {}
        """(plan, tokens, block size) of each layer's most recent call (None: it ran dense), for :meth:`kept_blocks`."""

    def config_for(self, layer: str | None) -> LocalityConfig | None:
        """The resolved configuration of ``layer``, or None where the method keeps the layer dense."""
        try:
            return self._layer_configs[layer]
        except KeyError:
            cfg = self.config
            resolved = self._layer_configs[layer] = cfg.for_layer(layer) if cfg.applies_to(layer) else None
            return resolved

    # -- plans -----------------------------------------------------------------------------------------------------
    def plan(
        self, layout: TokenLayout, ctx: RunContext, *, heads: int = 1, device: torch.device | str = "cpu"
    ) -> AttentionPlan | None:
        """The plan of a self/joint call of ``layer`` = ``ctx.layer`` at ``ctx.step``, or None: the call runs dense.

        Cached per (layer, grid, text, UNet level, heads, device, :meth:`plan_key`); ``heads`` matters only for
        per-head masks, ``device`` is where the block mask and the token order live.
        """
        cfg = self.config_for(ctx.layer)
        if cfg is None or in_dense_steps(ctx, cfg.dense_steps) or not layout.has_grid:
            self._last_plans[ctx.layer] = None
            return None
        dev = device if isinstance(device, torch.device) else torch.device(device)
        key = (ctx.layer, layout.grid, layout.num_text, layout.text_first, layout.downsample, layout.hierarchical,
               heads if ctx.heads is None else (heads, ctx.heads.offset, ctx.heads.total),  # per-head masks: global ids
               dev, self.plan_key(layout, ctx, cfg))
        plan = self._plans.get(key, _MISSING)
        if plan is _MISSING:
            plan = self._plans[key] = self.build_plan(layout, ctx, cfg, heads=heads, device=dev)
        self._last_plans[ctx.layer] = None if plan is None else (plan, layout.num_tokens, cfg.block_size)  # type: ignore[assignment]
        return plan  # type: ignore[return-value]

    def kept_blocks(self, layer: str) -> torch.Tensor | None:  # type: ignore[override]
        """The kept key blocks of ``layer``'s most recent call: its plan's block mask, full or partial, as a bool
        ``(heads or 1, q_blocks, kv_blocks)`` tensor in kernel order (batch row 0; for a per-frame plan folded into
        the batch, one frame's mask; a plan whose mask keeps every pair, run as SDPA, is all True). ``None`` when
        that call ran dense (a dense step, an excluded layer) or the layer has not run."""
        last = self._last_plans.get(layer)
        if last is None:
            return None
        plan, tokens, block = last
        if plan.block_mask is None:
            nb = -(-tokens // block)
            return torch.ones(1, nb, nb, dtype=torch.bool)
        full, partial = plan.block_mask.block_keep()
        return (full | partial)[0]

    def plan_key(self, layout: TokenLayout, ctx: RunContext, cfg: LocalityConfig) -> Any:
        """The step-dependent part of the plan cache key (None: the plan does not depend on the step)."""
        return None

    def build_plan(
        self, layout: TokenLayout, ctx: RunContext, cfg: LocalityConfig, *, heads: int, device: torch.device
    ) -> AttentionPlan | None:
        """Build the plan of one call (validating the configuration against the grid); None runs dense."""
        raise NotImplementedError

    def plan_parameters(self, layout: TokenLayout, ctx: RunContext, *, heads: int = 1) -> dict[str, Any]:
        """The parameters the plan of this call resolves to (for reports and benchmarks), JSON-friendly."""
        return {}

    # -- calls -----------------------------------------------------------------------------------------------------
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
        cfg = self.config_for(ctx.layer)
        if cfg is None or in_dense_steps(ctx, cfg.dense_steps) or k.shape[2] != q.shape[2]:
            self._last_plans[ctx.layer] = None
            return self.dense_fallback(q, k, v, attn_mask=attn_mask, scale=scale)
        if attn_mask is not None:
            lengths = layout.text_lengths
            if lengths is None or len(lengths) != q.shape[0]:
                warn_once(
                    f"{self.name}-mask",
                    f"{self.name}: an attention call with a mask other than a text key-padding mask (valid text "
                    "first, layout.text_lengths set by the adapter) runs dense",
                )
                self._last_plans[ctx.layer] = None
                return self.dense_fallback(q, k, v, attn_mask=attn_mask, scale=scale)
            return self._with_text_lengths(q, k, v, layout, ctx, cfg, lengths, scale)
        return self.local_attention(q, k, v, layout, ctx, cfg, scale=scale)

    def local_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: TokenLayout,
        ctx: RunContext,
        cfg: LocalityConfig,
        *,
        scale: float | None,
    ) -> torch.Tensor:
        """The method's attention on a self/joint call with a visual grid (no mask): its plan, one kernel call."""
        plan = self.plan(layout, ctx, heads=q.shape[1], device=q.device)
        if plan is None:
            return self.dense_fallback(q, k, v, scale=scale)
        return run_plan(q, k, v, plan, scale=scale, backend=cfg.backend)

    def _groups(self, lengths: tuple[int, ...], device: torch.device) -> list[tuple[int, torch.Tensor | None]]:
        """``(valid text length, batch rows)`` groups of ``lengths`` (rows None for a single group), cached."""
        key = (lengths, device)
        groups = self._row_groups.get(key)
        if groups is None:
            distinct = sorted(set(lengths))
            if len(distinct) == 1:
                groups = [(distinct[0], None)]
            else:
                groups = [
                    (n, torch.tensor([i for i, m in enumerate(lengths) if m == n], dtype=torch.long, device=device))
                    for n in distinct
                ]
            self._row_groups[key] = groups
        return groups

    def _with_text_lengths(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: TokenLayout,
        ctx: RunContext,
        cfg: LocalityConfig,
        lengths: tuple[int, ...],
        scale: float | None,
    ) -> torch.Tensor:
        """Joint attention whose mask hides padding text keys at the end of the text (suffix or prefix).

        Per batch group with the same number ``L`` of valid text tokens: the valid tokens (visual + ``L``) are a
        plain joint call laid out as an unpadded prompt (:func:`~diffaccel.methods._online.attend_valid_text`); the
        padding text queries, whose rows the stock processor computes over the valid keys, attend densely over them
        (as text queries do).
        """
        groups = self._groups(lengths, q.device)
        out = None if len(groups) == 1 else torch.empty_like(q)
        for length, rows in groups:
            qb, kb, vb = (q, k, v) if rows is None else (t.index_select(0, rows) for t in (q, k, v))
            part = attend_valid_text(qb, kb, vb, layout, int(length), scale,
                                     lambda a, b, c, sub: self.local_attention(a, b, c, sub, ctx, cfg, scale=scale))
            if out is None:
                return part
            out.index_copy_(0, rows, part)
        assert out is not None
        return out
