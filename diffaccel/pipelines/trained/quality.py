"""Quality measures of the trained tiny pipelines: caption colour, shape (template matching), attention locality.

These are what the quality tests assert and the README reports. They read samples the way a person would check
a toy: which palette colour covers the background and which the shape (nearest-colour reading of every pixel),
which of the three shapes best fits the shape's pixels (IoU against a circle, a square and a triangle fitted to
its bounding box), and how much of each image query's attention falls in its spatial neighbourhood.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from diffaccel.pipelines.trained.data import COLOURS, MOTIONS, SHAPES, palette_tensor, shape_mask, video_caption

EVAL_CAPTIONS: tuple[tuple[str, str, str], ...] = tuple(
    (colour, shape, bg)
    for i, (colour, bg) in enumerate(
        [("red", "blue"), ("green", "white"), ("blue", "yellow"), ("yellow", "black"),
         ("white", "purple"), ("black", "orange"), ("purple", "green"), ("orange", "blue")]
    )
    for shape in (SHAPES[i % 3], SHAPES[(i + 1) % 3])
)
"""16 fixed (colour, shape, background) triples: every colour as shape and as background, every shape."""


def eval_caption(colour: str, shape: str, bg: str) -> str:
    return f"a {colour} {shape} on a {bg} background"


def colour_map(image: torch.Tensor) -> torch.Tensor:
    """``(H, W)`` index into :data:`COLOURS` of the nearest palette colour of each pixel; ``image`` ``(3, H, W)``
    in ``[0, 1]``."""
    pal = (palette_tensor() + 1) / 2  # (P, 3) in [0, 1]
    d = ((image.permute(1, 2, 0)[:, :, None, :] - pal[None, None]) ** 2).sum(-1)
    return d.argmin(-1)


@dataclass(frozen=True)
class Reading:
    """What a sample shows: background colour, shape colour, the shape's best template and its IoU."""

    background: str
    colour: str
    shape: str
    iou: float


def read_sample(image: torch.Tensor) -> Reading:
    """Read a one-shape sample ``(3, H, W)`` in ``[0, 1]``: the most common colour is the background, the next the
    shape; the shape is the template (fitted to the shape pixels' bounding box) with the highest IoU."""
    cmap = colour_map(image)
    counts = torch.bincount(cmap.flatten(), minlength=len(COLOURS))
    order = counts.argsort(descending=True).tolist()
    bg, fg = order[0], order[1]
    mask = (cmap == fg).float()
    shape, iou = classify_shape(mask)
    return Reading(COLOURS[bg], COLOURS[fg], shape, iou)


def classify_shape(mask: torch.Tensor) -> tuple[str, float]:
    """Best-matching shape of a binary ``(H, W)`` mask and its IoU (template matching on the bounding box)."""
    if mask.sum() < 2:
        return "none", 0.0
    ys, xs = torch.nonzero(mask, as_tuple=True)
    y0, y1, x0, x1 = float(ys.min()), float(ys.max()) + 1, float(xs.min()), float(xs.max()) + 1
    half = max(y1 - y0, x1 - x0) / 2
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    best, best_iou = "none", -1.0
    for shape in SHAPES:
        t = shape_mask(shape, cx, cy, half, mask.shape[-1]) > 0.5
        m = mask > 0.5
        iou = float((t & m).sum()) / max(float((t | m).sum()), 1.0)
        if iou > best_iou:
            best, best_iou = shape, iou
    return best, best_iou


@dataclass(frozen=True)
class SampleScores:
    """Fractions over the samples of: background colour right, shape colour right, both, shape right."""

    background: float
    colour: float
    both: float
    shape: float
    n: int


def score_images(images: torch.Tensor, triples: list[tuple[str, str, str]]) -> SampleScores:
    """``images`` ``(N, 3, H, W)`` in ``[0, 1]``, ``triples`` the (colour, shape, background) each was asked for."""
    rs = [read_sample(img) for img in images]
    bg = [r.background == t[2] for r, t in zip(rs, triples)]
    col = [r.colour == t[0] for r, t in zip(rs, triples)]
    shp = [r.shape == t[1] for r, t in zip(rs, triples)]
    n = len(rs)
    return SampleScores(sum(bg) / n, sum(col) / n, sum(b and c for b, c in zip(bg, col)) / n, sum(shp) / n, n)


def sample_eval_set(pipe: Any, *, seeds: tuple[int, ...] = (0,), steps: int = 12, guidance: float = 4.0,
                    triples: tuple[tuple[str, str, str], ...] = EVAL_CAPTIONS) -> tuple[torch.Tensor, list]:
    """Images ``(N, 3, 32, 32)`` in ``[0, 1]`` of the image pipeline for ``triples`` x ``seeds`` (batched)."""
    from diffaccel.pipelines.trained.components import FLUX_TEXT_LEN

    prompts = [eval_caption(*t) for t in triples]
    out, asked = [], []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        imgs = pipe(prompts, negative_prompt=[""] * len(prompts), true_cfg_scale=guidance, height=32, width=32,
                    num_inference_steps=steps, max_sequence_length=FLUX_TEXT_LEN, generator=g,
                    output_type="pt").images
        out.append(imgs.float().cpu())
        asked += list(triples)
    return torch.cat(out), asked


# ----------------------------------------------------------------------------------------------- locality


def neighbourhood_share(probs: torch.Tensor, grid: tuple[int, ...], radius: tuple[int, ...]) -> torch.Tensor:
    """Mean over heads and image queries of the attention mass within ``radius`` (per grid axis) of the query.

    ``probs`` ``(B, H, Q, K)``: the last ``prod(grid)`` queries and keys are the grid's tokens in row-major
    order (other keys, e.g. text, count in the total but never as neighbours). Returns ``(B,)``.
    """
    n = 1
    for g in grid:
        n *= g
    coords = torch.stack(torch.meshgrid(*[torch.arange(g) for g in grid], indexing="ij"), -1).view(n, len(grid))
    near = torch.ones(n, n, dtype=torch.bool)
    for axis, r in enumerate(radius):
        near &= (coords[:, None, axis] - coords[None, :, axis]).abs() <= r
    img = probs[:, :, -n:, -n:]
    return (img * near.to(img.dtype)).sum(-1).mean(dim=(1, 2))


def uniform_share(grid: tuple[int, ...], radius: tuple[int, ...], extra_keys: int) -> float:
    """:func:`neighbourhood_share` of uniform attention over ``prod(grid) + extra_keys`` keys."""
    n = 1
    for g in grid:
        n *= g
    probs = torch.full((1, 1, n, n + extra_keys), 1.0 / (n + extra_keys))
    return float(neighbourhood_share(probs, grid, radius)[0])


@contextlib.contextmanager
def capture_attention(module_name: str) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Record ``(query, key)`` of every ``dispatch_attention_fn`` call in the diffusers module ``module_name``
    (e.g. ``diffusers.models.transformers.transformer_flux``), layout ``(B, S, H, D)``; the call runs as usual."""
    import importlib

    mod = importlib.import_module(module_name)
    original = mod.dispatch_attention_fn
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def spy(query: torch.Tensor, key: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append((query.detach(), key.detach()))
        return original(query, key, *args, **kwargs)

    mod.dispatch_attention_fn = spy
    try:
        yield seen
    finally:
        mod.dispatch_attention_fn = original


def attention_probs(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Softmax attention ``(B, H, Q, K)`` of ``(B, S, H, D)`` query and key (the processors' default scale)."""
    q, k = query.transpose(1, 2).float(), key.transpose(1, 2).float()
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)


def image_locality(pipe: Any, prompt: str, *, steps: int = 6, seed: int = 0, radius: int = 2) -> list[float]:
    """Per attention layer (in call order), the neighbourhood share (``(2*radius+1)^2`` tokens) of the image
    tokens of a FLUX pipeline, averaged over the steps of one sample at 32x32 (16x16 tokens)."""
    per_call: list[float] = []
    with capture_attention("diffusers.models.transformers.transformer_flux") as seen:
        pipe(prompt, height=32, width=32, num_inference_steps=steps, max_sequence_length=24,
             generator=torch.Generator().manual_seed(seed), output_type="pt")
    for q, k in seen:
        per_call.append(float(neighbourhood_share(attention_probs(q, k), (16, 16), (radius, radius)).mean()))
    layers = len(per_call) // steps
    return [sum(per_call[i::layers]) / steps for i in range(layers)]


# ----------------------------------------------------------------------------------------------- video


@dataclass(frozen=True)
class ClipReading:
    """What a one-shape clip shows: background and shape colour (all frames), and its motion from the shape
    pixels' centroid and area between the first and the last frame."""

    background: str
    colour: str
    motion: str


def read_clip(video: torch.Tensor) -> ClipReading:
    """Read a clip ``(F, 3, H, W)`` in ``[0, 1]`` (the pipeline's ``output_type="pt"`` frames)."""
    cmaps = torch.stack([colour_map(f) for f in video])
    counts = torch.bincount(cmaps.flatten(), minlength=len(COLOURS))
    order = counts.argsort(descending=True).tolist()
    bg, fg = order[0], order[1]
    stats = []
    for f in (0, video.shape[0] - 1):
        m = (cmaps[f] == fg).float()
        area = float(m.sum())
        ys, xs = torch.meshgrid(torch.arange(m.shape[0]).float(), torch.arange(m.shape[1]).float(), indexing="ij")
        cx = float((m * xs).sum()) / max(area, 1.0)
        cy = float((m * ys).sum()) / max(area, 1.0)
        stats.append((cx, cy, area))
    (x0, y0, a0), (x1, y1, a1) = stats
    dx, dy = x1 - x0, y1 - y0
    growth = (a1 + 1.0) / (a0 + 1.0)
    if max(abs(dx), abs(dy)) >= 3.0:
        motion = ("right" if dx > 0 else "left") if abs(dx) >= abs(dy) else ("down" if dy > 0 else "up")
    elif growth > 1.5 or growth < 1 / 1.5:
        motion = "growing" if growth > 1 else "shrinking"
    else:
        motion = "still"
    return ClipReading(COLOURS[bg], COLOURS[fg], motion)


VIDEO_EVAL_CASES: tuple[tuple[str, str, str, str], ...] = tuple(
    (COLOURS[i % 8], SHAPES[i % 3], MOTIONS[i % 6], COLOURS[(i + 3) % 8]) for i in range(12)
)
"""12 fixed (colour, shape, motion, background) clips: every colour as shape and as background, every motion
twice."""


@dataclass(frozen=True)
class ClipScores:
    """Fractions over the clips of: both colours right, motion right (chance 1/6)."""

    colour: float
    motion: float
    n: int


def video_eval_caption(case: tuple[str, str, str, str]) -> str:
    """The caption of a (colour, shape, motion, background) case."""
    colour, shape, motion, bg = case
    return video_caption(shape, colour, motion, bg)


def sample_video_eval_set(pipe: Any, *, seeds: tuple[int, ...] = (0,), steps: int = 12, guidance: float = 4.0,
                          cases: tuple[tuple[str, str, str, str], ...] = VIDEO_EVAL_CASES) -> tuple[torch.Tensor, list]:
    """Frames ``(N, F, 3, 32, 32)`` in ``[0, 1]`` of the video pipeline for ``cases`` x ``seeds`` (batched)."""
    from diffaccel.pipelines.trained.components import WAN_TEXT_LEN

    prompts = [video_eval_caption(c) for c in cases]
    out, asked = [], []
    for seed in seeds:
        frames = pipe(prompts, height=32, width=32, num_frames=9, num_inference_steps=steps,
                      max_sequence_length=WAN_TEXT_LEN, guidance_scale=guidance,
                      generator=torch.Generator().manual_seed(seed), output_type="pt").frames
        out.append(torch.as_tensor(frames).float().cpu())
        asked += list(cases)
    return torch.cat(out), asked


def score_clips(frames: torch.Tensor, cases: list[tuple[str, str, str, str]]) -> ClipScores:
    """``frames`` ``(N, F, 3, H, W)`` in ``[0, 1]``; ``cases`` the (colour, shape, motion, background) asked for."""
    rs = [read_clip(v) for v in frames]
    col = [r.colour == c and r.background == b for r, (c, _, _, b) in zip(rs, cases)]
    mot = [r.motion == m for r, (_, _, m, _) in zip(rs, cases)]
    n = len(rs)
    return ClipScores(sum(col) / n, sum(mot) / n, n)
