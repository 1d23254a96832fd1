"""Pictures of the demo: the difference heat map, the kept-block mask, the synchronized side-by-side clip.

All of them are computed on the server from the two outputs (float in [0, 1], ``(C, H, W)`` images or
``(F, C, H, W)`` videos) and written losslessly (PNG; the clip as mp4 or GIF, :func:`diffaccel.eval.media.save_video`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from diffaccel.eval.fidelity import psnr
from diffaccel.eval.media import WrittenVideo, save_video, to_uint8

_HEAT_STOPS = np.array(
    [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64
)
"""Anchor colours of an inferno-like colormap (black, purple, red, orange, pale yellow), evenly spaced on [0, 1]."""


def colormap(values: np.ndarray) -> np.ndarray:
    """``values`` in [0, 1] (any shape) to uint8 RGB by linear interpolation between :data:`_HEAT_STOPS`."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0), 0.0, 1.0)
    pos = v * (len(_HEAT_STOPS) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_HEAT_STOPS) - 2)
    t = (pos - lo)[..., None]
    rgb = _HEAT_STOPS[lo] * (1 - t) + _HEAT_STOPS[lo + 1] * t
    return rgb.round().astype(np.uint8)


def difference_map(a: torch.Tensor, b: torch.Tensor) -> tuple[np.ndarray, float]:
    """Per-pixel absolute difference ``|a - b|`` averaged over channels (and over frames for videos), and its
    maximum; the heat map scales 0..max to the colormap (a uniformly black map means identical outputs)."""
    if a.shape != b.shape:
        raise ValueError(f"outputs differ in shape: {tuple(a.shape)} and {tuple(b.shape)}")
    diff = (a.float() - b.float()).abs().mean(dim=-3)
    if diff.ndim == 3:  # video: (F, H, W)
        diff = diff.mean(dim=0)
    peak = float(diff.max())
    return diff.cpu().numpy(), peak


def save_heat_map(a: torch.Tensor, b: torch.Tensor, path: Path) -> tuple[Path, float]:
    """Write the difference heat map of ``a`` and ``b`` as a PNG; return its path and the peak difference."""
    diff, peak = difference_map(a, b)
    scaled = diff / peak if peak > 0 else np.zeros_like(diff)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(colormap(scaled)).save(path)
    return path, peak


def frame_psnr(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """PSNR of every frame of two ``(F, C, H, W)`` videos (``inf`` where a frame is identical)."""
    if a.ndim != 4 or a.shape != b.shape:
        raise ValueError(f"expected two (F, C, H, W) videos of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return [psnr(b[i], a[i]) for i in range(a.shape[0])]


MASK_CELL_MAX = 512
"""The mask picture is scaled up by whole pixels per block to at most this many pixels on its longer side."""


def mask_image(keep: np.ndarray) -> Image.Image:
    """A ``(q_blocks, kv_blocks)`` bool matrix as a picture: kept key blocks white, skipped ones dark, rows =
    query blocks, columns = key blocks, each block a square of whole pixels with a 1-pixel grid when it fits."""
    keep = np.asarray(keep, dtype=bool)
    if keep.ndim != 2 or keep.size == 0:
        raise ValueError(f"expected a non-empty (q_blocks, kv_blocks) matrix, got shape {keep.shape}")
    rows, cols = keep.shape
    cell = max(1, MASK_CELL_MAX // max(rows, cols))
    img = np.where(keep, 245, 40).astype(np.uint8)
    img = np.repeat(np.repeat(img, cell, axis=0), cell, axis=1)
    if cell >= 6:  # grid lines between blocks
        img[::cell, :] = 120
        img[:, ::cell] = 120
    return Image.fromarray(np.stack([img, img, img], axis=-1))


def side_by_side_clip(a: torch.Tensor, b: torch.Tensor, labels: tuple[str, str], stem: Path, *, fps: int) -> WrittenVideo:
    """One clip with both videos next to each other in every frame (labelled), so playback stays in sync."""
    if a.ndim != 4 or a.shape != b.shape:
        raise ValueError(f"expected two (F, C, H, W) videos of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    fa, fb = to_uint8(a), to_uint8(b)  # (F, H, W, C)
    if fa.shape[-1] == 1:
        fa, fb = np.repeat(fa, 3, -1), np.repeat(fb, 3, -1)
    frames, h, w, _ = fa.shape
    label_h, gap = 14, 4
    canvas = np.full((frames, h + label_h, 2 * w + gap, 3), 255, dtype=np.uint8)
    canvas[:, label_h:, :w] = fa[..., :3]
    canvas[:, label_h:, w + gap:] = fb[..., :3]
    header = Image.new("RGB", (canvas.shape[2], label_h), "white")
    draw = ImageDraw.Draw(header)
    draw.text((2, 1), labels[0], fill="black")
    draw.text((w + gap + 2, 1), labels[1], fill="black")
    canvas[:, :label_h] = np.asarray(header)[None]
    video = torch.from_numpy(canvas).permute(0, 3, 1, 2).float() / 255.0
    return save_video(video, stem, fps=fps)


__all__ = ["colormap", "difference_map", "frame_psnr", "mask_image", "save_heat_map", "side_by_side_clip"]
