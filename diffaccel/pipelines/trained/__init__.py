"""Trained tiny pipelines: real diffusers pipelines whose denoisers were trained on procedural shapes.

``tiny-flux-trained`` (FluxPipeline, 32x32 RGB, 16x16 image tokens) and ``tiny-wan-trained`` (WanPipeline,
9 frames of 32x32, 5x8x8 video tokens) are registered in the tiny registry next to the random tiny pipelines
(:data:`~diffaccel.pipelines.tiny.TINY_PIPELINES`), and load from the fp16 safetensors shipped in
``weights/`` with no network. They are toys: coloured circles, squares and triangles (see
:mod:`~diffaccel.pipelines.trained.data`). What they are for: their attention is learned, hence local and
structured like a real model's, so fidelity numbers, side-by-sides and the demo say something about a method
(a random model's attention is nearly uniform and every method looks exact). Not for image quality claims.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffaccel.pipelines.trained.weights_io import WEIGHTS_DIR, load_pipeline_weights, read_header, weights_path

IMAGE_MODEL = "tiny-flux-trained"
VIDEO_MODEL = "tiny-wan-trained"
IMAGE_PROMPT = "a red circle on a blue background"
VIDEO_PROMPT = "a yellow square moving right on a blue background"
IMAGE_GUIDANCE = 4.0
"""True classifier-free guidance scale of the image model (FluxPipeline's ``true_cfg_scale``, null caption)."""
IMAGE_STEPS = 6
"""Default sampling steps of the image model (FLUX.1's schedule at 256 tokens, shift 1.65): few enough that the
README's first command stays short on a CPU, and the caption-colour test runs at this count (tests/test_trained.py)."""
VIDEO_GUIDANCE = 4.0


def load_trained(name: str, folder: Path | None = None) -> Any:
    """The pipeline ``name`` with its trained weights from ``folder`` (default: the package's ``weights/``)."""
    from diffaccel.pipelines.trained import components as C

    path = weights_path(name, folder)
    head = read_header(path)
    build = {IMAGE_MODEL: C.flux_pipeline, VIDEO_MODEL: C.wan_pipeline}[name]
    pipe = build(head["transformer_config"])
    load_pipeline_weights(pipe, path, name)
    for comp in ("transformer", "text_encoder", "text_encoder_2"):
        if getattr(pipe, comp, None) is not None:
            getattr(pipe, comp).eval()
    return pipe


def training_record(name: str, folder: Path | None = None) -> dict[str, Any]:
    """How the shipped (or ``folder``'s) weights of ``name`` were trained: device, steps, seconds, loss, command."""
    return read_header(weights_path(name, folder))["training"]


def register(registry: dict[str, Any], TinySpec: Any) -> None:
    """Add the trained pipelines to the tiny registry (called once by :mod:`diffaccel.pipelines.tiny`, which
    passes its ``TinySpec`` class: this package never imports the tiny module, so there is no import cycle)."""
    from diffaccel.pipelines.trained.components import FLUX_TEXT_LEN, WAN_TEXT_LEN

    for spec in (
        TinySpec(
            IMAGE_MODEL, "FluxPipeline", "flux", lambda: load_trained(IMAGE_MODEL), height=32, width=32,
            steps=IMAGE_STEPS,
            extra={"max_sequence_length": FLUX_TEXT_LEN, "true_cfg_scale": IMAGE_GUIDANCE, "negative_prompt": ""},
            description="trained on procedural shapes (32x32 pixels), FLUX.1 blocks, 16x16 image tokens",
            trained=True, prompt=IMAGE_PROMPT,
        ),
        TinySpec(
            VIDEO_MODEL, "WanPipeline", "wan", lambda: load_trained(VIDEO_MODEL), height=32, width=32, steps=12,
            frames=9, extra={"max_sequence_length": WAN_TEXT_LEN, "guidance_scale": VIDEO_GUIDANCE},
            description="trained on moving procedural shapes (9x32x32), Wan 2.1 blocks, 5x8x8 video tokens",
            trained=True, prompt=VIDEO_PROMPT,
        ),
    ):
        if weights_path(spec.name).is_file():
            registry[spec.name] = spec


__all__ = ["IMAGE_MODEL", "IMAGE_STEPS", "VIDEO_MODEL", "WEIGHTS_DIR", "load_trained", "register", "training_record"]
