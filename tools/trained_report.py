"""Measure the shipped trained tiny models and draw the README pictures (CPU, about a minute).

    python tools/trained_report.py --out docs

Writes ``docs/trained-samples.png`` (captions x seeds), ``docs/trained-methods.png`` (dense, GNA 5x5 and
CLEAR r=4 on the same seeds, PSNR against dense under each; the image model at its default steps), and prints
(and writes ``trained-report.json``)
the numbers the README quotes: caption colour and shape accuracy with guidance (true CFG 4), attention
locality per layer (trained, same-architecture random, uniform), PSNR of dense vs a 5x5 window (trained,
random), and the video model's colour and motion readings.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

import diffaccel  # noqa: E402
from diffaccel.eval.fidelity import psnr  # noqa: E402
from diffaccel.pipelines.tiny import build_tiny  # noqa: E402
from diffaccel.pipelines.trained import IMAGE_MODEL, IMAGE_STEPS, VIDEO_MODEL, training_record  # noqa: E402
from diffaccel.pipelines.trained import components as C  # noqa: E402
from diffaccel.pipelines.trained.quality import (  # noqa: E402
    EVAL_CAPTIONS, eval_caption, image_locality, sample_eval_set, sample_video_eval_set, score_clips, score_images,
    uniform_share, video_eval_caption,
)

SCALE = 4


def to_pil(img: torch.Tensor) -> Image.Image:
    arr = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr).resize((img.shape[-1] * SCALE, img.shape[-2] * SCALE), Image.NEAREST)


def grid(rows: list[tuple[str, list[torch.Tensor], list[str] | None]], header: list[str], path: Path) -> None:
    cell, label_w, pad = 32 * SCALE, 300, 18
    w = label_w + len(header) * (cell + 4)
    h = pad + sum(cell + 4 + (14 if r[2] else 0) for r in rows)
    canvas = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(canvas)
    for j, title in enumerate(header):
        d.text((label_w + j * (cell + 4) + 2, 2), title, fill="black")
    y = pad
    for label, imgs, notes in rows:
        d.text((4, y + cell // 2 - 6), label, fill="black")
        for j, img in enumerate(imgs):
            canvas.paste(to_pil(img), (label_w + j * (cell + 4), y))
            if notes:
                d.text((label_w + j * (cell + 4) + 2, y + cell + 1), notes[j], fill="black")
        y += cell + 4 + (14 if notes else 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def sample(pipe, prompt: str, seed: int, steps: int = IMAGE_STEPS) -> torch.Tensor:
    return pipe(prompt, height=32, width=32, num_inference_steps=steps, max_sequence_length=C.FLUX_TEXT_LEN,
                negative_prompt="", true_cfg_scale=4.0, generator=torch.Generator().manual_seed(seed),
                output_type="pt").images[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("docs"))
    args = ap.parse_args()
    pipe = build_tiny(IMAGE_MODEL)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    rand = C.flux_pipeline()
    rand.set_progress_bar_config(disable=True)
    report: dict = {"training": {IMAGE_MODEL: training_record(IMAGE_MODEL), VIDEO_MODEL: training_record(VIDEO_MODEL)}}

    seeds = (0, 1, 2, 3)
    for g in (4.0,):
        imgs, asked = sample_eval_set(pipe, seeds=seeds, guidance=g, steps=IMAGE_STEPS)
        s = score_images(imgs, asked)
        report[f"scores_guidance_{g}"] = s.__dict__
        print(f"guidance {g}: background {s.background:.1%} shape colour {s.colour:.1%} both {s.both:.1%} "
              f"shape {s.shape:.1%} (n={s.n})")
        if g == 4.0:
            rows = []
            for i, t in enumerate(EVAL_CAPTIONS[::2]):
                k = 2 * i
                rows.append((eval_caption(*t), [imgs[k + n * len(EVAL_CAPTIONS)] for n in range(len(seeds))], None))
            grid(rows, [f"seed {s_}" for s_ in seeds], args.out / "trained-samples.png")

    uniform = uniform_share((16, 16), (2, 2), C.FLUX_TEXT_LEN)
    loc = image_locality(pipe, "a red circle on a blue background", steps=4)
    loc_r = image_locality(rand, "a red circle on a blue background", steps=4)
    report["locality_5x5"] = {"uniform": uniform, "trained": loc, "random": loc_r}
    print(f"5x5 neighbourhood share: uniform {uniform:.3f}; trained {[round(x, 3) for x in loc]}; "
          f"random {[round(x, 3) for x in loc_r]}")

    methods = [("gna 5x5", "gna", dict(kernel_size=5, block_size=64, backend="reference")),
               ("clear r=4", "clear", dict(radius=4.0, block_size=64, backend="reference"))]
    prompts = [eval_caption(*t) for t in EVAL_CAPTIONS[1::4]]
    rows = []
    psnrs: dict[str, list[float]] = {}
    for prompt in prompts:
        dense = sample(pipe, prompt, 0)
        imgs, notes = [dense], ["dense"]
        for label, name, cfg in methods:
            diffaccel.apply(pipe, name, **cfg)
            try:
                out = sample(pipe, prompt, 0)
            finally:
                diffaccel.remove(pipe)
            p = psnr(out, dense)
            psnrs.setdefault(label, []).append(p)
            imgs.append(out)
            notes.append(f"{p:.1f} dB")
        rows.append((prompt, imgs, notes))
    grid(rows, ["dense", *[m[0] for m in methods]], args.out / "trained-methods.png")
    for label, name, cfg in methods[:1]:
        rp = []
        for prompt in prompts:
            dense = sample(rand, prompt, 0)
            diffaccel.apply(rand, name, **cfg)
            try:
                rp.append(psnr(sample(rand, prompt, 0), dense))
            finally:
                diffaccel.remove(rand)
        psnrs[f"{label} (random)"] = rp
    report["psnr_vs_dense"] = psnrs
    for k, v in psnrs.items():
        print(f"PSNR vs dense, {k}: mean {sum(v) / len(v):.1f} dB, min {min(v):.1f}, max {max(v):.1f}")

    vpipe = build_tiny(VIDEO_MODEL)
    vpipe.set_progress_bar_config(disable=True)
    frames, cases = sample_video_eval_set(vpipe, seeds=(0, 1))
    vs = score_clips(frames, cases)
    report["video"] = {"colour_and_background": vs.colour, "motion": vs.motion, "n": vs.n}
    print(f"video: colour+background {vs.colour:.0%}, motion {vs.motion:.0%} (n={vs.n}; chance 1/56 and 1/6)")
    prompts = [video_eval_caption(c) for c in cases]
    grid([(p, [frames[i][f] for f in (0, 4, 8)], None) for i, p in enumerate(prompts[:6])],
         ["frame 0", "frame 4", "frame 8"], args.out / "trained-video.png")
    (args.out / "trained-report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
