"""PARO on the tiny offline pipelines: calibration runs, density 1 equals dense on every DiT family, the plan
hits its density, UNets are refused, and the CLI commands (calibrate, generate without a plan) work end to end."""

from __future__ import annotations

import functools
import math

import pytest
import torch

import diffaccel
from diffaccel.calibrate.driver import calibrate_pipeline, ensure_plan, plan_path_for, read_prompts
from diffaccel.errors import ConfigError, UnsupportedModelError
from diffaccel.methods.paro import ParoConfig, ParoMethod
from diffaccel.methods.paro_plan import load_plan, text_blocks
from diffaccel.pipelines.loading import load_pipeline
from diffaccel.pipelines.tiny import tiny_spec

FAMILIES = ("tiny-flux", "tiny-sd3", "tiny-wan", "tiny-hunyuan-video", "tiny-cogvideox", "tiny-ltx")


@functools.lru_cache(maxsize=None)
def _pipe(name: str):
    pipe = load_pipeline(name, dtype=torch.float32, device=torch.device("cpu"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _kwargs(name: str, steps: int | None = None) -> dict:
    kwargs = tiny_spec(name).call_kwargs()
    if steps is not None:
        kwargs["num_inference_steps"] = steps
    return kwargs


def _generate(pipe, kwargs, seed=0) -> torch.Tensor:
    out = pipe("a red fox", generator=torch.Generator("cpu").manual_seed(seed), output_type="pt", **kwargs)
    return (out.frames if hasattr(out, "frames") else out.images)[0].float()


def _calibrate(name: str, steps: int | None = None, **config):
    return _calibrate_cached(name, steps, tuple(sorted(config.items())))


@functools.lru_cache(maxsize=None)
def _calibrate_cached(name: str, steps: int | None, items: tuple):
    config = dict(items)
    pipe, kwargs = _pipe(name), _kwargs(name, steps)
    cfg = ParoConfig(backend="reference", **config)
    return calibrate_pipeline(pipe, model=name, prompts=["a red fox"], kwargs=kwargs,
                              steps=kwargs["num_inference_steps"], config=cfg, compare_dense=False, progress=False)


@pytest.mark.parametrize("name", FAMILIES)
def test_density_one_equals_dense_on_every_family(name):
    result = _calibrate(name, steps=1, density=1.0, block_size=16)
    plan = result.plan
    assert plan.layers and bool(plan.kept_density.eq(1.0).all())
    pipe, kwargs = _pipe(name), _kwargs(name, 1)
    diffaccel.remove(pipe)
    dense = _generate(pipe, kwargs)
    # the reference applies the token order (no SDPA shortcut at density 1)
    processor = diffaccel.ParoAttnProcessor(plan=plan, backend="reference")
    method = processor.method
    diffaccel.apply(pipe, processor)
    try:
        out = _generate(pipe, kwargs)
    finally:
        diffaccel.remove(pipe)
    assert torch.isfinite(out).all()
    assert (out - dense).abs().max().item() <= 1e-5
    assert all(method.kept_blocks(layer) is not None for layer in plan.layers)


@pytest.mark.parametrize("name", ["tiny-wan", "tiny-flux"])
def test_calibration_hits_the_density_within_one_block_per_row(name):
    density = 0.4
    plan = _calibrate(name, density=density, block_size=16).plan
    nb = plan.num_blocks
    flags = text_blocks(plan.num_tokens, plan.text_len, plan.text_first, plan.block)
    forced = int(flags.sum())
    for b in range(plan.num_buckets):
        for li in range(len(plan.layers)):
            keep = plan.keep(b, li)
            for h in range(plan.heads):
                kept = int(keep[h].sum())
                target = density * nb * nb
                if forced * (2 * nb - forced) + nb <= target:  # the forced text rows/cols fit in the budget
                    assert abs(kept - target) <= nb, (kept, target, nb)  # within one block per row
                assert bool(keep[h][flags].all()) and bool(keep[h][:, flags].all())  # text rows/cols dense
                assert bool(keep[h].any(-1).all())  # no query row without keys
    assert torch.all((plan.recall > 0) & (plan.recall <= 1 + 1e-6))
    # the orders are read from the same tensors the method uses; the method runs the plan on the pipeline
    pipe, kwargs = _pipe(name), _kwargs(name)
    diffaccel.apply(pipe, ParoMethod(plan=plan, backend="reference"))
    try:
        out = _generate(pipe, kwargs)
    finally:
        diffaccel.remove(pipe)
    assert torch.isfinite(out).all()


def test_unet_is_refused():
    pipe = _pipe("tiny-sd")
    with pytest.raises(UnsupportedModelError, match="UNet"):
        calibrate_pipeline(pipe, model="tiny-sd", prompts=["x"], kwargs=_kwargs("tiny-sd"), steps=2,
                           config=ParoConfig(backend="reference"), compare_dense=False, progress=False)
    with pytest.raises(UnsupportedModelError, match="UNet"):
        ensure_plan(ParoMethod(), pipe, model="tiny-sd", model_slug="tiny-sd", prompt="x", kwargs=_kwargs("tiny-sd"),
                    steps=2, seed=0, out=None)  # type: ignore[arg-type]


def test_plan_of_another_model_is_refused(tmp_path):
    plan = _calibrate("tiny-wan", steps=1, density=1.0, block_size=16).plan  # the density-1 test's plan (cached)
    path = plan.save(tmp_path / "wan.safetensors")
    with pytest.raises(ConfigError, match="config hash"):
        diffaccel.apply(_pipe("tiny-cogvideox"), "paro", plan=str(path))
    diffaccel.remove(_pipe("tiny-cogvideox"))


def test_generate_calibrates_on_the_fly_once_then_reuses_the_plan(tmp_path):
    from diffaccel.run import GenerateOptions, generate

    opts = GenerateOptions(method="paro", params={"backend": "reference", "block_size": 16}, model="tiny-flux",
                           out=tmp_path, compare=False, warmup=0, repeats=1)
    with pytest.warns(UserWarning, match="calibrating on this prompt") as record:
        generate(opts)
    assert sum("calibrating" in str(w.message) for w in record) == 1
    kwargs = _kwargs("tiny-flux")
    path = plan_path_for(tmp_path, "tiny-flux", kwargs, kwargs["num_inference_steps"], ParoConfig(block_size=16))
    assert path.is_file()
    stamp = path.stat().st_mtime_ns
    from diffaccel.warn import reset_warnings

    reset_warnings()
    import warnings

    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        generate(opts)
    assert not any("calibrating" in str(w.message) for w in again)
    assert path.stat().st_mtime_ns == stamp  # reused, not rewritten
    assert load_plan(path).model == "tiny-flux"


def test_calibrate_cli_writes_plan_summary_and_heatmap(tmp_path, capsys):
    from diffaccel.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# calibration prompts\na red fox\n\na blue bird\na third one\n")
    assert read_prompts(str(prompts), 2) == ["a red fox", "a blue bird"]
    assert read_prompts("a red fox", 2) == ["a red fox"]
    with pytest.raises(ConfigError, match="num_prompts"):
        read_prompts("x", 0)
    out = tmp_path / "plan.safetensors"
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "--method", "paro", "--model", "tiny-wan", "--prompts", "a red fox", "--num-prompts", "2",
              "--density", "0.5", "--block", "16", "--steps", "1", "--backend", "reference", "--out", str(out)])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "calibration" in text and "dense generation" in text and "ratio" in text
    plan = load_plan(out)
    assert plan.prompts == 1 and plan.block == 16 and math.isclose(plan.density, 0.5)
    assert (tmp_path / "plan.summary.md").read_text().count("| blocks.") == len(plan.layers) * plan.heads
    assert (tmp_path / "plan.png").stat().st_size > 1000
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "--method", "gna", "--prompts", "x"])
    assert exc.value.code == 2
    assert "--method must be one of paro" in capsys.readouterr().err
