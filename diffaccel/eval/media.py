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
    """Evenly spaced frame indices for a strip of at most ``max_frames``, starting at frame 0.

    Every frame when they fit. Otherwise the spacing is exact (a constant step): the largest count of at least
    ``max_frames // 2`` whose step lands on the last frame, else every ``ceil((F - 1) / (max_frames - 1))``-th frame
    (the last frames may then be left out, which :func:`strip_label` says).
    """
    if not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
    if num_frames <= max_frames:
        return list(range(num_frames))
    for count in range(max_frames, max(2, max_frames // 2) - 1, -1):
        if (num_frames - 1) % (count - 1) == 0:
            step = (num_frames - 1) // (count - 1)
            return list(range(0, num_frames, step))
    step = -(-(num_frames - 1) // (max_frames - 1))
    return list(range(0, num_frames, step))


def strip_label(label: str, indices: list[int], num_frames: int) -> str:
    """``dense: frames 0, 2, 4, 6, 8 of 9 (every 2nd)``: which frames a strip shows, out of how many."""
    shown = ", ".join(str(i) for i in indices)
    if len(indices) == num_frames:
        return f"{label}: all {num_frames} frames"
    step = indices[1] - indices[0] if len(indices) > 1 else num_frames
    nth = {1: "st", 2: "nd", 3: "rd"}.get(step % 10 if step % 100 not in (11, 12, 13) else 0, "th")
    return f"{label}: frames {shown} of {num_frames} (every {step}{nth})"


MIN_WIDTH = 512
"""Side-by-sides are scaled up (nearest neighbour, whole pixels) to at least this many pixels wide."""


def difference_map(reference: torch.Tensor, output: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``|output - reference|`` averaged over channels as a heat map (black, red, yellow, white) scaled to its
    maximum; returns ``(map (..., 3, H, W) in [0, 1], maximum absolute difference)``."""
    diff = (output.detach().float().cpu() - reference.detach().float().cpu()).abs().mean(dim=-3)
    peak = float(diff.max()) if diff.numel() else 0.0
    t = diff / peak if peak > 0 else torch.zeros_like(diff)
    heat = torch.stack([(3 * t).clamp(0, 1), (3 * t - 1).clamp(0, 1), (3 * t - 2).clamp(0, 1)], dim=-3)
    return heat, peak


def _scale_for(content_width: int) -> int:
    return max(1, -(-MIN_WIDTH // max(1, content_width)))


def _scaled(image: Image.Image, factor: int) -> Image.Image:
    return image if factor == 1 else image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def side_by_side(
    reference: torch.Tensor, output: torch.Tensor, labels: tuple[str, str], caption: str | None = None
) -> Image.Image:
    """Two results and their absolute difference, each under its label, scaled up to :data:`MIN_WIDTH` pixels.

    Images ``(C, H, W)`` are placed reference | output | difference heat map. Videos ``(F, C, H, W)`` become three
    labelled rows (reference, output, difference) of the same evenly spaced frames (:func:`strip_indices`), each
    label saying which frames. ``caption`` (e.g. PSNR and SSIM) is written under the panels.
    """
    if reference.shape != output.shape:
        raise ValueError(f"shapes differ: {tuple(reference.shape)} and {tuple(output.shape)}")
    if reference.ndim not in (3, 4):
        raise ValueError(f"expected an image (C, H, W) or a video (F, C, H, W), got shape {tuple(reference.shape)}")
    heat, peak = difference_map(reference, output)
    diff_label = "|difference|: none (identical)" if peak == 0 else f"|difference| (white = {peak:.3g})"
    if reference.ndim == 3:
        factor = _scale_for(3 * reference.shape[-1])
        panels = [[_scaled(_pil(x), factor)] for x in (reference, output, heat)]
        return _grid(panels, (*labels, diff_label), horizontal=True, caption=caption)
    idx = strip_indices(reference.shape[0])
    factor = _scale_for(len(idx) * reference.shape[-1])
    rows = [[_scaled(_pil(video[i]), factor) for i in idx] for video in (reference, output, heat)]
    names = tuple(strip_label(label, idx, reference.shape[0]) for label in (*labels, diff_label))
    return _grid(rows, names, horizontal=False, caption=caption)


def _grid(
    groups: list[list[Image.Image]], labels: tuple[str, ...], *, horizontal: bool, caption: str | None = None
) -> Image.Image:
    """Lay out groups of equal-sized tiles: side by side (one tile each) or stacked as rows of tiles; an optional
    caption line below."""
    w, h = groups[0][0].size
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(_text_width(probe, label) for label in labels) + 2 * GAP
    caption_w = _text_width(probe, caption) + 2 * GAP if caption else 0
    if horizontal:
        cell_w = max(w, text_w)
        width = len(groups) * cell_w + (len(groups) + 1) * GAP
        height = LABEL_HEIGHT + h + 2 * GAP
    else:
        row_w = len(groups[0]) * w + (len(groups[0]) - 1) * GAP
        width = max(row_w, text_w) + 2 * GAP
        height = len(groups) * (LABEL_HEIGHT + h) + (len(groups) + 1) * GAP
    width = max(width, caption_w)
    if caption:
        height += LABEL_HEIGHT + GAP
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
    if caption:
        draw.text((GAP, height - LABEL_HEIGHT - GAP // 2), caption, fill="black", font=_font())
    return canvas


def save_side_by_side(
    reference: torch.Tensor, output: torch.Tensor, labels: tuple[str, str], path: str | Path, caption: str | None = None
) -> Path:
    """Write :func:`side_by_side` as a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    side_by_side(reference, output, labels, caption).save(path)
    return path
