"""Image/video writing and side-by-side comparisons."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffaccel.eval.media import (
    LABEL_HEIGHT,
    save_image,
    save_side_by_side,
    save_video,
    side_by_side,
    strip_indices,
    to_uint8,
)


def test_to_uint8_rounds_and_clips():
    x = torch.tensor([[[0.0, 0.5, 1.0, 1.5, -0.2]]])  # (C=1, H=1, W=5)
    assert to_uint8(x)[..., 0].tolist() == [[0, 128, 255, 255, 0]]


def test_save_image_roundtrip(tmp_path):
    x = torch.rand(3, 20, 30)
    path = save_image(x, tmp_path / "a" / "img.png")
    back = np.asarray(Image.open(path))
    assert back.shape == (20, 30, 3)
    assert np.array_equal(back, to_uint8(x))


def test_save_video_gif_or_mp4(tmp_path, monkeypatch):
    import diffaccel.eval.media as media

    video = torch.rand(5, 3, 16, 24)
    monkeypatch.setattr(media, "mp4_writer_available", lambda: False)
    written = save_video(video, tmp_path / "clip", fps=8)
    assert written.format == "gif" and written.path.suffix == ".gif" and "imageio-ffmpeg" in written.note
    with Image.open(written.path) as gif:
        assert gif.n_frames == 5 and gif.size == (24, 16)
    monkeypatch.undo()
    written = save_video(video, tmp_path / "clip2", fps=8)
    assert written.path.exists() and written.format in ("mp4", "gif")
    assert (written.format == "mp4") == media.mp4_writer_available() or written.note.startswith("mp4 writer failed")


def test_side_by_side_image_layout():
    from diffaccel.eval.media import MIN_WIDTH

    a, b = torch.zeros(3, 16, 16), torch.ones(3, 16, 16)
    factor = -(-MIN_WIDTH // (3 * 16))  # three 16-pixel panels scaled up (nearest) to >= MIN_WIDTH pixels
    img = np.asarray(side_by_side(a, b, ("dense", "tile")))
    assert img.shape[1] >= MIN_WIDTH and img.shape[0] > 16 * factor + LABEL_HEIGHT
    # Left panel black, middle panel white, each under its label; the difference panel (|1 - 0| = its max) white.
    row = img[LABEL_HEIGHT + 8 * factor]
    assert (row == 0).all(axis=1).any() and (row == 255).all(axis=1).any()
    black_cols = np.where((row == 0).all(axis=1))[0]
    white_after = np.where((row[black_cols.max():] == 255).all(axis=1))[0]
    assert len(black_cols) == 16 * factor and len(white_after) > 16 * factor


def test_side_by_side_video_is_a_strip():
    a, b = torch.zeros(20, 3, 8, 8), torch.ones(20, 3, 8, 8)
    img = side_by_side(a, b, ("dense", "method"))
    assert img.width >= 8 * 8  # 8 frames per row
    assert img.height >= 2 * (8 + LABEL_HEIGHT)


def test_strip_indices():
    assert strip_indices(5) == [0, 1, 2, 3, 4]
    idx = strip_indices(81)  # evenly spaced (a constant step) from the first frame to the last
    assert idx[0] == 0 and idx[-1] == 80 and 4 <= len(idx) <= 8 and idx == sorted(set(idx))
    assert len({b - a for a, b in zip(idx, idx[1:])}) == 1


def test_side_by_side_errors(tmp_path):
    with pytest.raises(ValueError, match="shapes differ"):
        side_by_side(torch.zeros(3, 8, 8), torch.zeros(3, 8, 9), ("a", "b"))
    with pytest.raises(ValueError, match="video must be"):
        save_video(torch.zeros(3, 8, 8), tmp_path / "v")
    path = save_side_by_side(torch.zeros(3, 8, 8), torch.ones(3, 8, 8), ("a", "b"), tmp_path / "s.png")
    assert path.exists()
