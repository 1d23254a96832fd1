"""SoftPAG: perturbed-attention guidance on selected heads, interpolated toward the identity map.

Ahn et al., "Fine-Grained Perturbation Guidance via Attention Head Selection" (arXiv 2506.10978; v4 "Where and
How to Perturb", NeurIPS 2025), code ``cvlab-kaist/HeadHunter``. For each selected (layer, head), in the
*perturbed* guidance branch only, the attention map becomes ``A' = (1 - u)·A + u·I`` (Eq. 7): ``u = 1`` is PAG
(Ahn et al., ECCV 2024), ``u = 0`` no perturbation. Being linear in ``A``, the output is

    O' = (1 - u)·attention(Q, K, V) + u·V

so no ``N × N`` map is needed: the attention output of the selected heads is blended with ``V`` per head, before
the output projection. This is the paper's (and diffusers' ``PerturbedAttentionGuidance`` guider's) identity
over the whole joint sequence, ``identity="full"``.

``identity="image"`` is the target of diffusers' ``PAGJointAttnProcessor2_0`` (SD3 PAG pipelines): only the
image→image block of the joint map is replaced by the identity, so an image query attends to itself and to
every text token, and text queries are unchanged. Its output row for image query ``i`` is the softmax over
``{q_i·k_i} ∪ {q_i·k_t}`` applied to ``{v_i} ∪ {v_t}``: ``O(N_image · N_text)`` work.

Which batch rows are the perturbed branch is written in the method's ``perturbed_rows`` by the guidance wrapper
(:mod:`diffaccel.pipelines.guidance`), which also triples the batch and combines the predictions; without it
this method only runs its inner method. The class says ``wraps_denoiser = True``: :func:`diffaccel.apply` hands
it to the installer the guidance module registers, instead of installing processors only. The unperturbed rows, the unselected heads and layers, and the
attention itself all come from the inner method, so SoftPAG composes with every sparse method.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from diffaccel.context import RunContext
from diffaccel.errors import ConfigError
from diffaccel.layout import TokenLayout
from diffaccel.methods.base import (
    AttentionMethod,
    MethodConfig,
    build_config,
    check_choice,
    config_help,
    get_method,
    register_method,
)
from diffaccel.warn import warn_once

IDENTITIES = ("full", "image")
HEADS_FORMAT = "diffaccel.softpag.heads/1"
"""``format`` tag of the head-list JSON files that ``diffaccel headhunt`` writes."""

HeadSpec = dict[str, "list[int] | str"]


@dataclass
class SoftPAGConfig(MethodConfig):
    """SoftPAG settings. ``scale`` and ``adaptive_scale`` are diffusers' ``pag_scale`` / ``pag_adaptive_scale``."""

    heads: dict[str, Any] | str | None = field(default=None, metadata=config_help(
        "{attention module name: [head, ...] or 'all'} or the path of a head-list JSON written by "
        "'diffaccel headhunt'; a block name selects the self-attention modules inside it. With neither heads nor "
        "layers, diffusers' PAG default layer of the model family (SD/SDXL: mid_block, SD3: transformer_blocks.1)"))
    layers: list[str] | None = field(default=None, metadata=config_help(
        "module names whose every head is perturbed (layer-level PAG); combined with heads"))
    strength: float = field(default=1.0, metadata=config_help(
        "u in A' = (1-u)A + uI: 1 is PAG, 0 no perturbation (the paper's best trade-off: u=0.5 with 9 heads)"))
    scale: float = field(default=3.0, metadata=config_help("guidance weight of (cond - perturbed); diffusers pag_scale"))
    adaptive_scale: float = field(default=0.0, metadata=config_help(
        "s_t = max(0, scale - adaptive_scale*(1000 - t)); diffusers pag_adaptive_scale"))
    identity: str = field(default="full", metadata=config_help(
        "'full': identity over the whole joint sequence (paper, HeadHunter); 'image': image->image block only, "
        "image queries still see text (diffusers' SD3 PAG processors)"))
    method: str | None = field(default=None, metadata=config_help(
        "attention method of every branch; None: the method already applied with diffaccel.apply, else dense"))
    method_config: dict[str, Any] = field(default_factory=dict, metadata=config_help(
        "parameters of that method"))

    def validate(self) -> None:
        if isinstance(self.heads, (str, Path)):
            self.heads = load_heads(self.heads)
        if self.heads is not None and not isinstance(self.heads, dict):
            raise ConfigError(
                f"heads must be a dict {{layer name: [head, ...] or 'all'}} or a JSON path, got {type(self.heads).__name__}"
            )
        for layer, heads in (self.heads or {}).items():
            if not isinstance(layer, str) or not layer:
                raise ConfigError(f"heads keys must be attention module names (str), got {layer!r}")
            _check_head_list(layer, heads)
        if self.layers is not None:
            if isinstance(self.layers, str):
                self.layers = [self.layers]
            if not all(isinstance(name, str) and name for name in self.layers):
                raise ConfigError(f"layers must be a list of module names, got {self.layers!r}")
        if not _is_number(self.strength) or not 0.0 <= float(self.strength) <= 1.0:
            raise ConfigError(f"strength must be in [0, 1], got {self.strength!r}")
        for name in ("scale", "adaptive_scale"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        check_choice("identity", self.identity, IDENTITIES)
        if self.method == "softpag":
            raise ConfigError("method must be the attention method under SoftPAG, not 'softpag' itself")
        if not isinstance(self.method_config, dict):
            raise ConfigError(f"method_config must be a dict, got {type(self.method_config).__name__}")

    def selection(self) -> dict[str, tuple[int, ...] | None]:
        """``{name: heads}`` with ``None`` for every head; ``layers`` entries select all heads."""
        selected: dict[str, tuple[int, ...] | None] = {}
        for name in self.layers or ():
            selected[name] = None
        for name, heads in (self.heads or {}).items():
            if heads == "all" or selected.get(name, ()) is None:
                selected[name] = None
            else:
                selected[name] = tuple(sorted(set(selected.get(name, ())) | {int(h) for h in heads}))
        return selected


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_head_list(layer: str, heads: Any) -> None:
    if heads == "all":
        return
    if not isinstance(heads, (list, tuple)) or not heads or not all(
        isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in heads
    ):
        raise ConfigError(f"heads[{layer!r}] must be 'all' or a non-empty list of head indices >= 0, got {heads!r}")


def load_heads(path: str | Path) -> dict[str, Any]:
    """The ``{layer: [head, ...]}`` selection of a head-list JSON (``diffaccel headhunt`` output or a plain dict)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"heads file {str(path)!r} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"heads file {str(path)!r} is not valid JSON: {exc}") from None
    if isinstance(data, dict) and "heads" in data:
        data = data["heads"]
    if not isinstance(data, dict):
        raise ConfigError(f"heads file {str(path)!r} must hold {{layer: [head, ...]}} or {{'heads': {{...}}}}")
    return data


def layer_or_parent_matches(key: str, module_name: str) -> bool:
    """``key`` names ``module_name`` exactly or is one of its parent modules (whole dotted components only).

    ``transformer_blocks.1`` selects ``transformer_blocks.1.attn`` but never ``transformer_blocks.10.attn``
    (diffusers' regex ``blocks.1`` selects blocks 10-19 too, huggingface/diffusers#13594).
    """
    return module_name == key or module_name.startswith(key + ".")


@register_method
class SoftPAGMethod:
    """Wraps an attention method: its output, with the selected heads of the perturbed rows pulled toward ``V``.

    Args:
        config: a :class:`SoftPAGConfig`, or its fields as keywords.
        inner: the attention method computing every branch; default: ``config.method`` (dense when None).
    """

    name: ClassVar[str] = "softpag"
    config_class: ClassVar[type[MethodConfig]] = SoftPAGConfig
    wraps_denoiser: ClassVar[bool] = True
    """Guidance: the pipeline layer must also wrap the denoiser call (batch expansion, prediction combination)."""

    def __init__(self, config: SoftPAGConfig | None = None, *, inner: AttentionMethod | None = None, **overrides: Any):
        if config is None:
            config = build_config(SoftPAGConfig, overrides, method=self.name)
        else:
            if overrides:
                raise TypeError("pass either a SoftPAGConfig or keywords, not both")
            config.validate()
        self.config: SoftPAGConfig = config
        if inner is None:
            inner = get_method(config.method or "dense", **config.method_config)
        self.inner = inner
        self.perturbed_rows: slice | None = None
        """Batch rows of the perturbed guidance branch in the current denoiser call (set by the guidance hooks)."""
        self.set_heads(config.selection())

    def set_heads(self, selection: dict[str, tuple[int, ...] | None]) -> None:
        """Replace the perturbed (module name or parent name) -> heads selection (``None``: every head)."""
        self._selection = dict(selection)
        self._per_layer: dict[str, tuple[int, ...] | None | bool] = {}
        self._head_index: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}

    @property
    def selection(self) -> dict[str, tuple[int, ...] | None]:
        return dict(self._selection)

    def heads_for(self, layer: str | None, num_heads: int) -> list[int] | None:
        """Head indices perturbed in module ``layer`` (``None`` when the layer is not selected)."""
        if layer is None:
            return None
        if layer not in self._per_layer:
            chosen: set[int] | None = None
            for key, heads in self._selection.items():
                if layer_or_parent_matches(key, layer):
                    chosen = (chosen or set()) | set(range(num_heads) if heads is None else heads)
            self._per_layer[layer] = False if chosen is None else tuple(sorted(chosen))
        heads = self._per_layer[layer]
        if heads is False:
            return None
        if heads and heads[-1] >= num_heads:
            raise ConfigError(f"head {heads[-1]} selected in {layer!r}, which has {num_heads} heads (0..{num_heads - 1})")
        return list(heads)

    def __call__(
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
        out = self.inner(q, k, v, layout, ctx, attn_mask=attn_mask, scale=scale)
        rows = self.perturbed_rows
        strength = float(self.config.strength)
        if rows is None or strength == 0.0 or layout.is_cross:
            return out
        heads = self.heads_for(ctx.layer, q.shape[1])
        if not heads:
            return out
        if k.shape[2] != q.shape[2]:
            warn_once(f"softpag-kv-{ctx.layer}", f"softpag: {ctx.layer} has {k.shape[2]} keys for {q.shape[2]} "
                      "queries, so no identity map exists; the layer is not perturbed")
            return out
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        key = (tuple(heads), out.device)
        idx = self._head_index.get(key)
        if idx is None:  # built once per head list and device: no host-to-device copy in every layer call
            idx = self._head_index[key] = torch.tensor(heads, device=out.device)
        return soft_identity(out, q, k, v, layout, rows, idx, strength, self.config.identity, scale)

    @property
    def needs_grid(self) -> bool:
        """The inner method's (``MethodBase.needs_grid``): with a dense inner method, strict mode never refuses."""
        return bool(getattr(self.inner, "needs_grid", True))

    def kept_blocks(self, layer: str) -> torch.Tensor | None:
        """The inner method's kept key blocks of ``layer`` (SoftPAG keeps no mask of its own)."""
        inner = getattr(self.inner, "kept_blocks", None)
        return inner(layer) if callable(inner) else None

    def __repr__(self) -> str:
        return f"SoftPAGMethod(inner={self.inner!r}, heads={self._selection}, strength={self.config.strength})"


def soft_identity(
    out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: TokenLayout,
    rows: slice,
    heads: list[int] | torch.Tensor,
    strength: float,
    identity: str,
    scale: float,
) -> torch.Tensor:
    """``out`` with ``(1 - strength)·out + strength·target`` on batch ``rows`` and ``heads`` (indices or a tensor).

    ``target`` is ``V`` (``identity="full"``) or the image→image-identity attention output (``"image"``, equal
    to ``V`` when the call has no text tokens; text rows keep ``out``).

    ``out`` is written in place and returned: it is the inner method's fresh output, so no copy of the whole
    tensor is needed (review 2026-12, finding 3). Pass a copy to keep the original.
    """
    idx = heads if isinstance(heads, torch.Tensor) else torch.tensor(heads, device=out.device)
    part = out[rows].index_select(1, idx)
    values = v[rows].index_select(1, idx)
    if identity == "image" and layout.num_text:
        visual = layout.visual
        target = part.clone()
        target[:, :, visual] = image_identity_output(
            q[rows].index_select(1, idx), k[rows].index_select(1, idx), values, layout, scale
        ).to(out.dtype)
    else:
        target = values.to(out.dtype)
    out[rows.start : rows.stop, idx] = torch.lerp(part, target, strength)
    return out


def image_identity_output(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, scale: float
) -> torch.Tensor:
    """Visual rows of attention whose image→image block is the identity: ``softmax([q_i·k_i, q_i·K_text])``.

    Returns ``(B, H, num_visual, d)`` in float32 (softmax over ``1 + num_text`` logits per query).
    """
    visual, text = layout.visual, layout.text
    qv, kv, vv = q[:, :, visual].float(), k[:, :, visual].float(), v[:, :, visual].float()
    kt, vt = k[:, :, text].float(), v[:, :, text].float()
    self_logit = (qv * kv).sum(-1, keepdim=True) * scale
    text_logits = qv @ kt.transpose(-1, -2) * scale
    weights = torch.softmax(torch.cat([self_logit, text_logits], dim=-1), dim=-1)
    return weights[..., :1] * vv + weights[..., 1:] @ vt
