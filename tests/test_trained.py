"""Quality of the shipped trained tiny pipelines (issue 18), on the CPU in seconds, deterministic (fixed seeds).

Bounds are set below what the shipped weights measure (numbers in the README), with margin; each is compared
with the random model of the same architecture where the issue asks for it. The issue's caption-colour target
(>= 90 % with guidance) is asserted as the issue states it, beside a test with margin. The shipped weights are
the output of ``tools/train_trained.sh`` (checked against their recorded commands).
"""

from __future__ import annotations

import pytest
import torch

from diffaccel.pipelines.tiny import TINY_PIPELINES, build_tiny, tiny_spec
from diffaccel.pipelines.trained import IMAGE_MODEL, IMAGE_STEPS, VIDEO_MODEL, WEIGHTS_DIR, training_record
from diffaccel.pipelines.trained import components as C
from diffaccel.pipelines.trained.quality import (
    EVAL_CAPTIONS, image_locality, read_clip, sample_eval_set, sample_video_eval_set, score_clips, score_images,
    uniform_share,
)

STEPS = IMAGE_STEPS  # the default of `diffaccel generate`: the targets hold where people look


@pytest.fixture(scope="module")
def trained():
    pipe = build_tiny(IMAGE_MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def untrained():
    """The image model's architecture with the random initial weights of its training run (seed 0)."""
    torch.manual_seed(0)
    pipe = C.flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def samples(trained):
    return sample_eval_set(trained, seeds=(0, 1), steps=STEPS)


def test_shipped_weights_are_small_fp16_and_say_how_they_were_trained():
    from safetensors import safe_open

    total = 0
    for name in (IMAGE_MODEL, VIDEO_MODEL):
        assert name in TINY_PIPELINES and tiny_spec(name).trained
        path = WEIGHTS_DIR / f"{name}.safetensors"
        total += path.stat().st_size
        with safe_open(str(path), framework="pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
        rec = training_record(name)
        assert rec["complete"] and rec["steps"] > 100 and rec["seconds"] > 60
        assert rec["device"] and rec["command"].startswith("diffaccel train-tiny --model " + name)
        first = rec  # a fine-tune records the run it started from (a chain: walk back to its first run)
        while first.get("resumed_from"):
            first = first["resumed_from"]
        assert rec["eval_loss_final"] < 0.5 * first["eval_loss_initial"]
    assert total < 8 * 2**20


def _without_paths(args: list[str]) -> list[str]:
    """A train-tiny argument list without ``--out DIR`` and ``--resume FILE`` (machine-specific paths)."""
    args = list(args)
    for flag in ("--out", "--resume"):
        if flag in args:
            i = args.index(flag)
            del args[i:i + 2]
    return args


def _script_commands() -> dict[str, list[list[str]]]:
    """``tools/train_trained.sh``'s train-tiny commands, by model in run order, as argument lists without paths."""
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "tools" / "train_trained.sh").read_text()
    out: dict[str, list[list[str]]] = {}
    for line in text.replace("\\\n", " ").splitlines():
        if "train-tiny" in line and not line.lstrip().startswith("#"):
            args = shlex.split(line.split("train-tiny", 1)[1].split("&")[0])
            out.setdefault(args[args.index("--model") + 1], []).append(_without_paths(args))
    return out


def test_shipped_weights_are_the_output_of_the_rebuild_script():
    """Each shipped model is the run chain of ``tools/train_trained.sh`` from a seed: the recorded commands
    (newest first in the header, ``resumed_from``) are the script's (but for paths), the first run starts from
    scratch, and every run completed its ``--steps``: running the script rebuilds them (equal in quality, not in
    bits: float order differs between machines)."""
    import shlex

    script = _script_commands()
    assert set(script) == {IMAGE_MODEL, VIDEO_MODEL} and len(script[IMAGE_MODEL]) == 2
    for name in (IMAGE_MODEL, VIDEO_MODEL):
        chain, rec = [], training_record(name)
        while rec is not None:
            chain.append(rec)
            rec = rec["resumed_from"]
        chain.reverse()
        assert [_without_paths(shlex.split(r["command"])[2:]) for r in chain] == script[name], name
        assert chain[0]["config"]["resume"] is None
        for r in chain:
            assert r["complete"] and r["steps"] == r["config"]["max_steps"] > 0, f"{name}: stopped before --steps"


def test_caption_colours_with_guidance_are_far_above_chance(samples):
    """Measured at the default steps, true CFG 4, 32 samples: background and shape colour both right 100 %
    (chance: 1/8 and 1/64; the first shipped weights: 6 %). Bounds with margin below the measurement."""
    images, asked = samples
    s = score_images(images, asked)
    print(f"\nbackground {s.background:.0%} shape colour {s.colour:.0%} both {s.both:.0%} shape {s.shape:.0%} (n={s.n})")
    assert s.n == 2 * len(EVAL_CAPTIONS)
    assert s.background >= 0.85 and s.both >= 0.8


def test_caption_colours_with_guidance_reach_the_issue_target(samples):
    """Issue 18's target, >= 90 % of samples with both colours right: 100 % measured on this set (32 of 32; 98 %
    on tools/trained_report.py's 64). The sampling is seeded and deterministic on the CPU."""
    s = score_images(*samples)
    assert s.both >= 0.9


def test_shapes_are_recognisable(samples, untrained):
    """The caption's shape (template matching; chance 1/3): 91 % measured on this set (29 of 32), 33 % for the
    weights before the centred data. The random model of the same architecture draws no shape."""
    s = score_images(*samples)
    assert s.shape >= 0.75
    images, asked = sample_eval_set(untrained, seeds=(0,), steps=4)
    assert score_images(images, asked).shape < 0.5


def test_trained_image_model_is_the_cpu_default(monkeypatch):
    from diffaccel import run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run.default_model() == IMAGE_MODEL
    assert run.default_prompt(None) == tiny_spec(IMAGE_MODEL).prompt


def test_untrained_model_does_not_pass_the_colour_test(untrained):
    images, asked = sample_eval_set(untrained, seeds=(0,), steps=4)
    assert score_images(images, asked).both < 0.3


def test_attention_is_local_unlike_the_random_model(trained, untrained):
    uniform = uniform_share((16, 16), (2, 2), C.FLUX_TEXT_LEN)
    ours = image_locality(trained, "a red circle on a blue background", steps=4)
    rand = image_locality(untrained, "a red circle on a blue background", steps=4)
    print(f"\nuniform {uniform:.3f} trained {[round(x, 3) for x in ours]} random {[round(x, 3) for x in rand]}")
    assert len(ours) == 5  # 2 double + 3 single blocks
    assert max(rand) < 1.5 * uniform
    assert max(ours) > 3 * uniform
    assert sum(ours) / len(ours) > 1.5 * uniform


def _psnr_dense_vs_window(pipe) -> float:
    import diffaccel
    from diffaccel.eval.fidelity import psnr

    prompt = "a yellow triangle on a purple background"
    kw = dict(height=32, width=32, num_inference_steps=STEPS, max_sequence_length=C.FLUX_TEXT_LEN,
              negative_prompt="", true_cfg_scale=4.0, output_type="pt")
    dense = pipe(prompt, generator=torch.Generator().manual_seed(0), **kw).images
    diffaccel.apply(pipe, "gna", kernel_size=5, block_size=64, backend="reference")
    try:
        local = pipe(prompt, generator=torch.Generator().manual_seed(0), **kw).images
    finally:
        diffaccel.remove(pipe)
    return psnr(local, dense)


def test_a_local_window_moves_the_trained_model_far_more_than_the_random_one(trained, untrained):
    ours, rand = _psnr_dense_vs_window(trained), _psnr_dense_vs_window(untrained)
    print(f"\nPSNR dense vs 5x5 window: trained {ours:.1f} dB, random {rand:.1f} dB")
    assert ours < rand - 10


def test_video_model_loads_and_runs_as_a_wan_pipeline():
    pipe = build_tiny(VIDEO_MODEL)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "WanPipeline"
    out = pipe("a red square moving right on a blue background", **tiny_spec(VIDEO_MODEL).call_kwargs(
        num_inference_steps=2), generator=torch.Generator().manual_seed(0), output_type="pt").frames
    assert out.shape == (1, 9, 3, 32, 32) and torch.isfinite(out).all()
    print("\n" + str(read_clip(out[0])))


def test_video_colours_follow_the_caption_far_above_chance():
    """Both colours of a clip right (chance 1/56): 50 % measured on the 12 clips of seed 0 (38 % on the report's
    24). Motion is not learned (at chance, README), so it is not asserted."""
    pipe = build_tiny(VIDEO_MODEL)
    pipe.set_progress_bar_config(disable=True)
    frames, cases = sample_video_eval_set(pipe, seeds=(0,))
    s = score_clips(frames, cases)
    print(f"\nvideo: colours {s.colour:.0%} motion {s.motion:.0%} (n={s.n})")
    assert s.n == 12 and s.colour >= 0.25


def test_rebuild_script_chains_its_stages(tmp_path):
    """Run ``tools/train_trained.sh`` with a stand-in for ``diffaccel`` that records its arguments and writes the
    output file: every stage 2 resumes from the file its stage 1 wrote, and the last stages write to OUT."""
    import os
    import shlex
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "tools" / "train_trained.sh"
    log = tmp_path / "calls.txt"
    fake = tmp_path / "fake-diffaccel"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        f"echo \"$*\" >> {shlex.quote(str(log))}\n"
        "args=(\"$@\"); for i in \"${!args[@]}\"; do\n"
        "  [[ ${args[$i]} == --model ]] && model=${args[$((i+1))]}\n"
        "  [[ ${args[$i]} == --out ]] && out=${args[$((i+1))]}\n"
        "  [[ ${args[$i]} == --resume ]] && { test -f \"${args[$((i+1))]}\" || exit 3; }\n"
        "done\n"
        "mkdir -p \"$out\" && touch \"$out/$model.safetensors\"\n"
    )
    fake.chmod(0o755)
    out, stage = tmp_path / "out", tmp_path / "stage"
    env = dict(os.environ, DIFFACCEL=str(fake), STAGE_DIR=str(stage))
    subprocess.run(["bash", str(script), str(out)], check=True, env=env, timeout=60)
    calls = [shlex.split(line) for line in log.read_text().splitlines()]
    by_model: dict[str, list[list[str]]] = {}
    for c in calls:
        assert c[0] == "train-tiny"
        by_model.setdefault(c[c.index("--model") + 1], []).append(c)
    assert [_without_paths(c[1:]) for c in by_model[IMAGE_MODEL]] == _script_commands()[IMAGE_MODEL]
    for name, runs in by_model.items():
        first, last = runs[0], runs[-1]
        assert "--resume" not in first
        assert last[last.index("--resume") + 1] == os.path.join(first[first.index("--out") + 1], f"{name}.safetensors")
        assert last[last.index("--out") + 1] == str(out) and (out / f"{name}.safetensors").is_file()
