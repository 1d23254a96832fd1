"""Prompt sets of ``diffaccel eval``: two small built-in lists written for this project, or a user's text file.

``coco`` holds COCO-style captions (one plain sentence describing an everyday scene, as the MS-COCO captions of
Lin et al. 2014 are written); ``vbench`` holds VBench-style video prompts (Huang et al., CVPR 2024: one subject,
one motion or camera move, per prompt). Neither list is copied from those datasets: they are written here so that
offline runs need no download. A file holds one prompt a line (blank lines and ``#`` comments are skipped).
"""

from __future__ import annotations

from pathlib import Path

from diffaccel.errors import ConfigError

COCO_STYLE: tuple[str, ...] = (
    "a red fox sitting in the snow at the edge of a pine forest",
    "two people riding bicycles down a wet city street at night",
    "a bowl of oranges and bananas on a wooden kitchen table",
    "a small sailboat on a calm lake with mountains behind it",
    "a black cat sleeping on a stack of old books",
    "a train crossing a stone bridge over a river in autumn",
    "a plate with a sandwich and a cup of coffee next to a laptop",
    "a group of sheep grazing on a green hillside under clouds",
    "a yellow taxi waiting at a traffic light in the rain",
    "a child flying a kite on a sandy beach",
    "a vase of sunflowers on a windowsill in the morning light",
    "an old man reading a newspaper on a park bench",
    "a brown dog catching a frisbee in a grassy field",
    "a lighthouse on a rocky shore at sunset",
    "a pizza with mushrooms and olives on a metal tray",
    "a man skiing down a snowy slope between trees",
)
"""COCO-style captions (written for diffaccel)."""

VBENCH_STYLE: tuple[str, ...] = (
    "a golden retriever running across a meadow, tracking shot",
    "waves rolling onto a sandy beach at sunrise, static camera",
    "a hot air balloon rising slowly over a valley, camera pans left",
    "a person walking through a busy market, handheld camera",
    "a hummingbird hovering in front of a red flower, slow motion",
    "city traffic at night with light trails, time-lapse",
    "a candle flame flickering in a dark room, close-up",
    "a train passing through a snowy forest, aerial view",
    "a cat jumping onto a windowsill, static camera",
    "clouds moving over a mountain peak, time-lapse",
    "a cyclist riding along a coastal road, camera follows from behind",
    "leaves falling from a maple tree in the wind",
    "a chef chopping vegetables on a cutting board, top-down view",
    "a koi fish swimming in a clear pond",
    "a paper boat drifting down a rain gutter, camera zooms in",
    "fireworks bursting over a harbour at night",
)
"""VBench-style video prompts: subject plus motion or camera move (written for diffaccel)."""

BUILTIN_PROMPTS: dict[str, tuple[str, ...]] = {"coco": COCO_STYLE, "vbench": VBENCH_STYLE}


def load_prompts(spec: str, num: int | None = None) -> list[str]:
    """The prompts named by ``spec`` (``coco``, ``vbench`` or a text file), the first ``num`` of them if given.

    Raises :class:`ConfigError` for an unknown name, a missing or empty file, or a ``num`` below 1.
    """
    if num is not None and (not isinstance(num, int) or isinstance(num, bool) or num < 1):
        raise ConfigError(f"num must be a positive integer, got {num!r}")
    if spec in BUILTIN_PROMPTS:
        prompts = list(BUILTIN_PROMPTS[spec])
    else:
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(
                f"prompts {spec!r} is neither a built-in set ({', '.join(BUILTIN_PROMPTS)}) nor a file"
            )
        lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
        prompts = [line for line in lines if line and not line.startswith("#")]
        if not prompts:
            raise ConfigError(f"prompts file {spec!r} has no prompt (one a line; '#' starts a comment)")
    return prompts[:num] if num is not None else prompts
