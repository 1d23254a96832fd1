"""Writing generated images and videos, and labelled side-by-side comparisons.

Tensors are float in [0, 1]: images ``(C, H, W)``, videos ``(F, C, H, W)``, as diffusers pipelines return
them with ``output_type="pt"`` (per batch item).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

LABEL_HEIGHT = 14
GAP = 4
MAX_STRIP_FRAMES = 8


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """``(..., C, H, W)`` float in [0, 1] to ``(..., H, W, C)`` uint8 (values outside [0, 1] are clipped)."""
    if not isinstance(x, torch.Tensor) or x.ndim < 3:
        raise ValueError(f"expected a (..., C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    arr = x.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()
    return np.moveaxis(arr, -3, -1)


def _pil(x: torch.Tensor) -> Image.Image:
    arr = to_uint8(x)
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)


def save_image(image: torch.Tensor, path: str | Path) -> Path:
    """Write a ``(C, H, W)`` image (PNG unless ``path`` says otherwise)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _pil(image).save(path)
    return path


@dataclass(frozen=True)
class WrittenVideo:
    """Where a video went and in which container (``mp4`` or ``gif``), with the reason for a GIF fallback."""

    path: Path
    format: str
    note: str = ""


def mp4_writer_available() -> bool:
    """True when imageio has a plugin that writes mp4 (PyAV or imageio-ffmpeg)."""
    return any(importlib.util.find_spec(name) is not None for name in ("av", "imageio_ffmpeg"))


def save_video(video: torch.Tensor, path_stem: str | Path, *, fps: int = 16) -> WrittenVideo:
    """Write a ``(F, C, H, W)`` video as ``<stem>.mp4`` when imageio can, else as an animated ``<stem>.gif``."""
    if video.ndim != 4:
        raise ValueError(f"video must be (F, C, H, W), got shape {tuple(video.shape)}")
    if not isinstance(fps, int) or fps < 1:
        raise ValueError(f"fps must be a positive integer, got {fps!r}")
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    frames = to_uint8(video)
    note = "no mp4 writer (pip install imageio-ffmpeg or av)"
    if mp4_writer_available():
        import imageio.v3 as iio

        path = stem.with_suffix(".mp4")
        try:
            # Even sizes keep yuv420p encoders happy; pad by edge replication rather than resize.
            pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
            if pad_h or pad_w:
                frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
            iio.imwrite(path, frames, extension=".mp4", fps=fps)
            return WrittenVideo(path, "mp4")
        except Exception as exc:  # noqa: BLE001 - any writer failure falls back to GIF, and says why
            path.unlink(missing_ok=True)
            note = f"mp4 writer failed ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})"
    path = stem.with_suffix(".gif")
    images = [Image.fromarray(f[..., 0] if f.shape[-1] == 1 else f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=max(1, round(1000 / fps)), loop=0)
    return WrittenVideo(path, "gif", note)


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=_font())
    return int(right - left)


def strip_indices(num_frames: int, max_frames: int = MAX_STRIP_FRAMES) -> list[int]:
    """Evenly spaced frame indices (first and last included) for a strip of at most ``max_frames``."""
    if num_frames <= max_frames:
        return list(range(num_frames))
    return sorted({round(i * (num_frames - 1) / (max_frames - 1)) for i in range(max_frames)})


def side_by_side(reference: torch.Tensor, output: torch.Tensor, labels: tuple[str, str]) -> Image.Image:
    """Two results next to each other, each under its label.

    Images ``(C, H, W)`` are placed left | right. Videos ``(F, C, H, W)`` become two labelled rows (reference
    above, output below) of up to :data:`MAX_STRIP_FRAMES` evenly spaced frames.
    """
    if reference.shape != output.shape:
        raise ValueError(f"shapes differ: {tuple(reference.shape)} and {tuple(output.shape)}")
    if reference.ndim == 3:
        panels = [[_pil(reference)], [_pil(output)]]
        return _grid(panels, labels, horizontal=True)
    if reference.ndim == 4:
        idx = strip_indices(reference.shape[0])
        rows = [[_pil(video[i]) for i in idx] for video in (reference, output)]
        frames = ", ".join(str(i) for i in idx)
        return _grid(rows, tuple(f"{label} (frames {frames})" for label in labels), horizontal=False)
    raise ValueError(f"expected an image (C, H, W) or a video (F, C, H, W), got shape {tuple(reference.shape)}")


def _grid(groups: list[list[Image.Image]], labels: tuple[str, ...], *, horizontal: bool) -> Image.Image:
    """Lay out groups of equal-sized tiles: side by side (one tile each) or stacked as rows of tiles."""
    w, h = groups[0][0].size
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(_text_width(probe, label) for label in labels) + 2 * GAP
    if horizontal:
        cell_w = max(w, text_w)
        width = len(groups) * cell_w + (len(groups) + 1) * GAP
        height = LABEL_HEIGHT + h + 2 * GAP
    else:
        row_w = len(groups[0]) * w + (len(groups[0]) - 1) * GAP
        width = max(row_w, text_w) + 2 * GAP
        height = len(groups) * (LABEL_HEIGHT + h) + (len(groups) + 1) * GAP
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for g, (tiles, label) in enumerate(zip(groups, labels)):
        if horizontal:
            x0 = GAP + g * (cell_w + GAP)
            draw.text((x0, GAP), label, fill="black", font=_font())
            canvas.paste(tiles[0].convert("RGB"), (x0 + (cell_w - w) // 2, GAP + LABEL_HEIGHT))
        else:
            y0 = GAP + g * (LABEL_HEIGHT + h + GAP)
            draw.text((GAP, y0), label, fill="black", font=_font())
            for t, tile in enumerate(tiles):
                canvas.paste(tile.convert("RGB"), (GAP + t * (w + GAP), y0 + LABEL_HEIGHT))
    return canvas


def save_side_by_side(reference: torch.Tensor, output: torch.Tensor, labels: tuple[str, str], path: str | Path) -> Path:
    """Write :func:`side_by_side` as a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    side_by_side(reference, output, labels).save(path)
    return path
