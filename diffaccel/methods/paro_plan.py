"""PARO plans: per-head axis orders and per-(timestep bucket, layer, head) block masks, on disk as safetensors.

A plan is what ``diffaccel calibrate --method paro`` measures once per model and the ``paro`` method runs with
(PAROAttention, Zhao et al., arXiv 2506.16054; ``research/sparse_quant.md`` §1.3-1.4):

* ``orders`` ``(layers, heads)`` int8: the axis-order index of each head (:mod:`diffaccel.sparse.axis_orders`);
* ``masks`` ``(buckets, layers, heads, q_blocks, ceil(kv_blocks / 8))`` uint8: the kept key blocks, bit-packed
  (bit ``j % 8`` of byte ``j // 8``, little-endian), in kernel order (the head's axis order, text in place);
* ``recall`` and ``density`` ``(layers, heads)`` float32: the attention mass the kept blocks held at calibration
  and the fraction of blocks kept, averaged over buckets.

The JSON header (safetensors metadata key ``diffaccel_paro``) says what the plan was measured on: model id and a
hash of the denoiser's config, grid, text length and place, heads, layer names, density, steps, buckets, block
size, alpha and the package version. :func:`load_plan` validates it against the tensors; :meth:`ParoPlan.check_call`
refuses a run that differs, saying what differs and how to recalibrate. No pickle anywhere.

Timestep buckets (the paper's sharing): the first half of the steps has one mask per step, the second half one
shared mask (:func:`bucket_of`; fewer buckets split the first half evenly). The authors' table 3 measured sharing
as free (PSNR 29.14 vs 29.09).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffaccel.errors import ConfigError
from diffaccel.sparse.axis_orders import axis_order_names, axis_orders_for

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ParoPlan",
    "bucket_of",
    "default_num_buckets",
    "keep_from_mass",
    "load_plan",
    "pack_bits",
    "select_orders",
    "text_blocks",
    "unpack_bits",
]

FORMAT = "diffaccel-paro-plan"
FORMAT_VERSION = 1
HEADER_KEY = "diffaccel_paro"
RECALIBRATE = "recalibrate with `diffaccel calibrate --method paro --model MODEL --prompts PROMPTS --out PLAN` " \
              "for this model, size and step count"


# ----------------------------------------------------------------------------------------------- timestep buckets


def default_num_buckets(num_steps: int) -> int:
    """One bucket per step of the first half of the steps, one shared by the second half: ``num_steps // 2 + 1``."""
    return num_steps // 2 + 1


def check_num_buckets(num_buckets: int, num_steps: int) -> None:
    half = num_steps // 2
    if isinstance(num_buckets, bool) or not isinstance(num_buckets, int) or not 1 <= num_buckets <= half + 1:
        raise ConfigError(
            f"num_buckets must be an integer in [1, {half + 1}] for {num_steps} steps (at most one per step of the "
            f"first half plus one shared by the second half), got {num_buckets!r}"
        )


def bucket_of(step: int, num_steps: int, num_buckets: int) -> int:
    """The mask bucket of denoising step ``step``: steps of the first half (``step < num_steps // 2``) split evenly
    over the first ``num_buckets - 1`` buckets, the second half shares the last one."""
    half = num_steps // 2
    if num_buckets <= 1 or step >= half:
        return num_buckets - 1
    return max(0, step) * (num_buckets - 1) // half


# ----------------------------------------------------------------------------------------------- order selection


def select_orders(sparse_fraction: torch.Tensor, incoherence: torch.Tensor, alpha: float) -> torch.Tensor:
    """The order index per (layer, head): argmin of ``alpha * (1 - M_sparse)_n + (1 - alpha) * M_quant_n``.

    ``sparse_fraction`` and ``incoherence`` are ``(..., orders)``: the fraction of blocks that are sparse (at least
    sigma of their entries below epsilon) and the mean block incoherence max|P| / mean|P| under each order. Each
    term is normalised by its sum over the orders (the paper's normalisation). The paper prints ``+M_sparse`` with
    an argmin, which would prefer the order with the *fewest* sparse blocks; ``1 - M_sparse`` is the reading its
    own definition implies (``research/sparse_quant.md`` §1.3).
    """
    dense_part = 1.0 - sparse_fraction.double()
    quant = incoherence.double()

    def normalized(x: torch.Tensor) -> torch.Tensor:
        total = x.sum(-1, keepdim=True)
        return torch.where(total > 0, x / total.clamp_min(1e-300), torch.full_like(x, 1.0 / x.shape[-1]))

    score = alpha * normalized(dense_part) + (1.0 - alpha) * normalized(quant)
    return score.argmin(-1)


# ----------------------------------------------------------------------------------------------- masks


def text_blocks(num_tokens: int, num_text: int, text_first: bool, block: int) -> torch.Tensor:
    """Blocks (of the kernel order, text in place) holding at least one text token: ``(ceil(N / block),)`` bool."""
    nb = -(-num_tokens // block)
    flags = torch.zeros(nb, dtype=torch.bool)
    if num_text:
        start, stop = (0, num_text) if text_first else (num_tokens - num_text, num_tokens)
        flags[start // block: (stop - 1) // block + 1] = True
    return flags


def keep_from_mass(mass: torch.Tensor, density: float, dense_blocks: torch.Tensor) -> torch.Tensor:
    """PARO's block-sum thresholding at a target density: ``(heads, q_blocks, kv_blocks)`` bool.

    Per head the blocks with the most attention mass are kept until ``round(density * q_blocks * kv_blocks)``
    blocks are kept (one threshold per head, so rows keep more blocks where their mass is spread). Forced first:
    the rows and columns of blocks that hold text (``dense_blocks``, text attends and is attended densely) and the
    heaviest block of every row (no query row is left without keys). ``mass`` is measured in the kernel order, so
    the ragged last blocks are compared by the mass they really hold (no divisibility rule).
    """
    heads, nqb, nkb = mass.shape
    target = round(float(density) * nqb * nkb)
    forced = dense_blocks.view(1, -1, 1)[:, :nqb] | dense_blocks.view(1, 1, -1)[:, :, :nkb]
    forced = forced.expand(heads, nqb, nkb).clone()
    forced.scatter_(-1, mass.argmax(-1, keepdim=True), True)
    if target >= nqb * nkb:
        return torch.ones_like(forced)
    flat_mass = mass.reshape(heads, -1).double()
    flat_forced = forced.reshape(heads, -1)
    extra = (target - flat_forced.sum(-1)).clamp_min(0)
    ranked = torch.where(flat_forced, torch.full_like(flat_mass, -math.inf), flat_mass).argsort(-1, descending=True)
    rank = torch.empty_like(ranked).scatter_(-1, ranked, torch.arange(ranked.shape[-1]).expand_as(ranked))
    keep = flat_forced | (rank < extra.view(-1, 1))
    return keep.view(heads, nqb, nkb)


def pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """Bool ``(..., n)`` -> uint8 ``(..., ceil(n / 8))``, bit ``j % 8`` of byte ``j // 8``."""
    n = keep.shape[-1]
    pad = (-n) % 8
    bits = torch.nn.functional.pad(keep.to(torch.uint8), (0, pad)).view(*keep.shape[:-1], -1, 8)
    weights = (2 ** torch.arange(8, dtype=torch.int32)).to(keep.device)
    return (bits.to(torch.int32) * weights).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 ``(..., ceil(n / 8))`` -> bool ``(..., n)``."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.int32)
    bits = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], -1)[..., :n].bool()


# ----------------------------------------------------------------------------------------------- the plan

_HEADER_TYPES: dict[str, Any] = {
    "format": str, "format_version": int, "package_version": str, "model": str, "config_hash": str,
    "grid": list, "text_len": int, "text_first": bool, "heads": int, "layers": list, "density": float,
    "steps": int, "num_buckets": int, "block": int, "alpha": float, "orders": list, "prompts": int,
}


@dataclass(eq=False)
class ParoPlan:
    """A calibrated PARO plan (see the module docstring); build with the calibrator, :func:`load_plan` from disk."""

    model: str
    config_hash: str
    grid: tuple[int, ...]
    text_len: int
    text_first: bool
    heads: int
    layers: tuple[str, ...]
    density: float
    steps: int
    num_buckets: int
    block: int
    alpha: float
    orders: torch.Tensor
    masks: torch.Tensor
    recall: torch.Tensor
    kept_density: torch.Tensor
    prompts: int = 0
    package_version: str = ""
    _layer_index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.grid = tuple(int(s) for s in self.grid)
        self.layers = tuple(self.layers)
        self._layer_index = {name: i for i, name in enumerate(self.layers)}
        self._check_consistent()

    # ------------------------------------------------------------------ geometry
    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid) + self.text_len

    @property
    def num_blocks(self) -> int:
        return -(-self.num_tokens // self.block)

    @property
    def order_names(self) -> tuple[str, ...]:
        return axis_order_names(len(self.grid))

    def layer_index(self, layer: str) -> int:
        if layer not in self._layer_index:
            shown = ", ".join(self.layers[:4]) + (", ..." if len(self.layers) > 4 else "")
            raise ConfigError(
                f"paro: the plan has no entry for attention layer {layer!r} (its {len(self.layers)} layers: {shown}); "
                f"it was calibrated on another model; {RECALIBRATE}"
            )
        return self._layer_index[layer]

    def keep(self, bucket: int, layer: int) -> torch.Tensor:
        """Kept key blocks of one (bucket, layer): ``(heads, q_blocks, kv_blocks)`` bool on the masks' device."""
        return unpack_bits(self.masks[bucket, layer], self.num_blocks)

    # ------------------------------------------------------------------ checks
    def _check_consistent(self) -> None:
        nb = self.num_blocks
        expect = {
            "orders": (self.orders, (len(self.layers), self.heads), torch.int8),
            "masks": (self.masks, (self.num_buckets, len(self.layers), self.heads, nb, -(-nb // 8)), torch.uint8),
            "recall": (self.recall, (len(self.layers), self.heads), torch.float32),
            "density": (self.kept_density, (len(self.layers), self.heads), torch.float32),
        }
        for name, (t, shape, dtype) in expect.items():
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dtype:
                raise ConfigError(
                    f"paro plan: tensor {name!r} must be {dtype} of shape {shape} for the header's grid, layers, heads, "
                    f"buckets and block, got {getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}"
                )
        n_orders = len(axis_orders_for(len(self.grid)))
        if self.orders.numel() and not (0 <= int(self.orders.min()) and int(self.orders.max()) < n_orders):
            raise ConfigError(f"paro plan: orders must be axis-order indices in [0, {n_orders - 1}]")
        if not 0.0 < self.density <= 1.0:
            raise ConfigError(f"paro plan: density must be in (0, 1], got {self.density}")
        check_num_buckets(self.num_buckets, self.steps)

    def check_call(self, *, grid: tuple[int, ...], text_len: int, text_first: bool, heads: int,
                   num_steps: int | None) -> None:
        """Refuse a call the plan was not measured for, naming what differs and how to recalibrate."""
        diffs = []
        if tuple(grid) != self.grid:
            diffs.append(f"grid {'x'.join(map(str, grid))} (plan: {'x'.join(map(str, self.grid))})")
        if text_len != self.text_len or (text_len and text_first != self.text_first):
            where = lambda n, first: f"{n} text tokens" + (f" as a {'prefix' if first else 'suffix'}" if n else "")
            diffs.append(f"{where(text_len, text_first)} (plan: {where(self.text_len, self.text_first)})")
        if heads != self.heads:
            diffs.append(f"{heads} heads (plan: {self.heads})")
        if num_steps is not None and num_steps != self.steps:
            diffs.append(f"{num_steps} steps (plan: {self.steps})")
        if diffs:
            raise ConfigError(f"paro: the plan does not match this run: {'; '.join(diffs)}; {RECALIBRATE}")

    def check_model(self, model: str, config_hash: str) -> None:
        """Refuse a model whose denoiser config differs from the calibrated one (the id may differ: hub vs folder)."""
        if config_hash != self.config_hash:
            raise ConfigError(
                f"paro: the plan was calibrated on model {self.model!r} (config hash {self.config_hash}) but this is "
                f"{model!r} (config hash {config_hash}); {RECALIBRATE}"
            )

    def check_block(self, block: int) -> None:
        if block != self.block:
            raise ConfigError(
                f"paro: block_size={block} but the plan's masks use {self.block}-token blocks; {RECALIBRATE} "
                f"(--block {block}), or leave block_size unset"
            )

    # ------------------------------------------------------------------ disk
    def header(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "package_version": self.package_version,
            "model": self.model, "config_hash": self.config_hash, "grid": list(self.grid),
            "text_len": self.text_len, "text_first": self.text_first, "heads": self.heads,
            "layers": list(self.layers), "density": float(self.density), "steps": self.steps,
            "num_buckets": self.num_buckets, "block": self.block, "alpha": float(self.alpha),
            "orders": list(self.order_names), "prompts": self.prompts,
        }

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (safetensors: the four tensors, the JSON header as metadata)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"orders": self.orders, "masks": self.masks, "recall": self.recall, "density": self.kept_density}
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path),
                  metadata={HEADER_KEY: json.dumps(self.header())})
        return path

    def to(self, device: torch.device | str) -> ParoPlan:
        """The plan with its masks on ``device`` (orders and statistics stay on the CPU)."""
        if self.masks.device == torch.device(device):
            return self
        fields_ = {k: getattr(self, k) for k in ("model", "config_hash", "grid", "text_len", "text_first", "heads",
                                                  "layers", "density", "steps", "num_buckets", "block", "alpha",
                                                  "orders", "recall", "kept_density", "prompts", "package_version")}
        return ParoPlan(masks=self.masks.to(device), **fields_)


def _validated_header(raw: str | None, path: Path) -> dict[str, Any]:
    if raw is None:
        raise ConfigError(f"paro plan {path}: no {HEADER_KEY!r} header; it is not a diffaccel PARO plan")
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"paro plan {path}: the header is not valid JSON ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ConfigError(f"paro plan {path}: header format must be {FORMAT!r}")
    if header.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            f"paro plan {path}: format version {header.get('format_version')!r}, this diffaccel reads {FORMAT_VERSION}"
        )
    for key, kind in _HEADER_TYPES.items():
        value = header.get(key)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else (
            isinstance(value, kind) and not (kind is int and isinstance(value, bool)))
        if not ok:
            raise ConfigError(f"paro plan {path}: header field {key!r} must be {kind.__name__}, got {value!r}")
    if not all(isinstance(s, int) and s >= 1 for s in header["grid"]) or len(header["grid"]) not in (2, 3):
        raise ConfigError(f"paro plan {path}: header grid must be 2 or 3 positive sizes, got {header['grid']!r}")
    if not all(isinstance(n, str) for n in header["layers"]):
        raise ConfigError(f"paro plan {path}: header layers must be layer names")
    if header["orders"] != list(axis_order_names(len(header["grid"]))):
        raise ConfigError(f"paro plan {path}: header orders {header['orders']!r} are not this version's candidates")
    return header


def load_plan(path: str | Path, device: torch.device | str = "cpu") -> ParoPlan:
    """Read and validate a plan written by :meth:`ParoPlan.save` (a clear ConfigError for anything else)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"paro plan {str(path)!r} does not exist; {RECALIBRATE}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = _validated_header((f.metadata() or {}).get(HEADER_KEY), path)
            names = set(f.keys())
            missing = {"orders", "masks", "recall", "density"} - names
            if missing:
                raise ConfigError(f"paro plan {path}: missing tensors {sorted(missing)}")
            tensors = {n: f.get_tensor(n) for n in ("orders", "masks", "recall", "density")}
    except ConfigError:
        raise
    except Exception as exc:  # a truncated or foreign file
        raise ConfigError(f"paro plan {path} cannot be read as safetensors ({exc})") from None
    plan = ParoPlan(
        model=header["model"], config_hash=header["config_hash"], grid=tuple(header["grid"]),
        text_len=header["text_len"], text_first=header["text_first"], heads=header["heads"],
        layers=tuple(header["layers"]), density=float(header["density"]), steps=header["steps"],
        num_buckets=header["num_buckets"], block=header["block"], alpha=float(header["alpha"]),
        orders=tensors["orders"], masks=tensors["masks"], recall=tensors["recall"],
        kept_density=tensors["density"], prompts=header["prompts"], package_version=header["package_version"],
    )
    return plan.to(device)
