"""VBench-style video dimensions (Huang et al., "VBench", CVPR 2024), computed per video.

- temporal flickering (model-free): ``(255 - mean |frame_t - frame_{t-1}|) / 255`` over 8-bit frames, as VBench
  scores it (VBench applies it to static-scene prompts; here it is reported for every video);
- motion smoothness, a *proxy*: VBench predicts the odd frames from the even ones with a frame-interpolation
  network (AMT); here the prediction is the mean of the two neighbouring frames (no model), scored the same way,
  ``(255 - mean |predicted - actual|) / 255``;
- subject consistency (DINO features) and background consistency (CLIP image features): the mean over frames
  ``t >= 1`` of ``(cos(f_t, f_0) + cos(f_t, f_{t-1})) / 2``, VBench's formula, when the feature model is given
  (``--dino-model DIR``, ``--clip-model DIR``) or cached; otherwise skipped with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from diffaccel.eval.metrics import Skipped, _hub_source

DEFAULT_DINO_MODEL = "facebook/dino-vitb16"
"""VBench's subject-consistency backbone (DINO ViT-B/16)."""

FeatureFn = Callable[[torch.Tensor], torch.Tensor]
"""``(F, C, H, W)`` frames in [0, 1] -> ``(F, D)`` features."""


def _uint8(video: torch.Tensor) -> torch.Tensor:
    if video.ndim != 4:
        raise ValueError(f"video must be (F, C, H, W), got shape {tuple(video.shape)}")
    return (video.detach().float().clamp(0, 1) * 255).round()


def temporal_flickering(video: torch.Tensor) -> float | None:
    """VBench's temporal flickering score in [0, 1] (1: no change between frames); ``None`` for one frame."""
    x = _uint8(video)
    if x.shape[0] < 2:
        return None
    return float((255.0 - (x[1:] - x[:-1]).abs().mean()) / 255.0)


def motion_smoothness_proxy(video: torch.Tensor) -> float | None:
    """Motion smoothness with linear interpolation standing in for VBench's AMT: frame ``t`` (odd) predicted as
    the mean of frames ``t-1`` and ``t+1``; ``None`` below three frames."""
    x = _uint8(video)
    if x.shape[0] < 3:
        return None
    predicted = (x[0:-2:2] + x[2::2]) / 2  # frames 1, 3, 5, ... from their even neighbours
    actual = x[1:-1:2]
    return float((255.0 - (predicted - actual).abs().mean()) / 255.0)


def consistency(features: torch.Tensor) -> float | None:
    """VBench's consistency of per-frame features ``(F, D)``: mean over ``t >= 1`` of the average of the cosine
    to the first frame and to the previous frame; ``None`` for one frame."""
    if features.ndim != 2:
        raise ValueError(f"features must be (frames, dim), got shape {tuple(features.shape)}")
    if features.shape[0] < 2:
        return None
    f = F.normalize(features.double(), dim=-1)
    to_first = (f[1:] * f[:1]).sum(-1)
    to_prev = (f[1:] * f[:-1]).sum(-1)
    return float(((to_first + to_prev) / 2).mean())


def _hf_features(source: str, kind: str) -> FeatureFn:
    """Per-frame features from a transformers model: CLIP image embeddings, else the [CLS] token."""
    from transformers import AutoImageProcessor, AutoModel

    processor = AutoImageProcessor.from_pretrained(source)
    model = AutoModel.from_pretrained(source).eval()

    def features(video: torch.Tensor) -> torch.Tensor:
        frames = [f.permute(1, 2, 0).numpy().astype("uint8") for f in _uint8(video).cpu()]
        inputs = processor(images=frames, return_tensors="pt")
        with torch.no_grad():
            if kind == "clip":
                pooled = model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output
                return model.visual_projection(pooled)  # CLIP's image embedding
            return model(pixel_values=inputs["pixel_values"]).last_hidden_state[:, 0]

    return features


def build_features(kind: str, model: str | None) -> FeatureFn | Skipped:
    """The DINO (``kind="dino"``) or CLIP (``"clip"``) per-frame feature function, or why it cannot run."""
    from diffaccel.eval.metrics import DEFAULT_CLIP_MODEL

    metric, flag, default = {
        "dino": ("subject consistency", "--dino-model", DEFAULT_DINO_MODEL),
        "clip": ("background consistency", "--clip-model", DEFAULT_CLIP_MODEL),
    }[kind]
    source = _hub_source(model, default, flag, metric)
    if isinstance(source, Skipped):
        return source
    try:
        return _hf_features(source, kind)
    except Exception as exc:  # noqa: BLE001 - a model that cannot load is a skip with its reason
        first = str(exc).splitlines()[0][:100] if str(exc) else ""
        return Skipped(metric, f"cannot load {Path(source).name!r} ({type(exc).__name__}: {first})")
