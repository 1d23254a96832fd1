"""`diffaccel generate` with sparse methods on the tiny pipelines of the recent families (the dense run on every
tiny pipeline is tests/test_cli.py's; every method on every family's transformer is tests/test_adapters_families.py's).

Each new family runs at least two sparse methods end to end through the CLI, and every method runs on at least one
family; a run passes only if the method's own attention ran (its call counts; SoftPAG: an output that differs from
dense), not merely without an error. Methods that do not apply to a family are refused with their one clear line
(exit 2). PARO runs here because it calibrates its plan on the pipeline's own prompt first.

Each tiny pipeline is built once per module (the loader is cached; generate removes diffaccel after every run), and
the kernel is not the point: ``backend=reference``, one step where the method's schedule allows it.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from diffaccel import run
from diffaccel.cli import main

REFERENCE = ["--set", "backend=reference"]
SOFTPAG_LTX2 = ["--set", 'layers=["transformer_blocks.0.attn1"]']

RUNS = [  # (model, method, options): the method must run, not fall back to dense
    ("tiny-ltx2", "tile", REFERENCE + ["--steps", "1"]),
    ("tiny-ltx2", "adaspa", REFERENCE + ["--steps", "1"]),
    ("tiny-qwen-image", "agent", ["--steps", "1"]),
    ("tiny-qwen-image", "clear", REFERENCE + ["--steps", "1"]),
    ("tiny-z-image", "vmoba", REFERENCE + ["--steps", "1"]),
    ("tiny-flux2", "msw", REFERENCE + ["--steps", "1"]),
    ("tiny-hunyuan-video15", "tile", REFERENCE),
    ("tiny-hunyuan-video15", "vmoba", REFERENCE),
]
COMPARED_RUNS = [  # also against dense: PSNR, the side-by-side picture
    ("tiny-z-image", "paro", REFERENCE),
    ("tiny-flux2", "gna", REFERENCE + ["--set", "kernel_size=[3,3]", "--steps", "1"]),
]
REFUSED = [  # (model, method, options, what the one error line says)
    ("tiny-qwen-image", "tile", REFERENCE, "video grid"),
    ("tiny-z-image", "softpag", ["--set", 'layers=["layers.0.attention"]'], "latent batch"),
]
"""tile needs a video grid; SoftPAG needs one latent batch that holds [uncond, cond] (Z-Image passes a list of
latents; Qwen-Image, FLUX.2 Klein and HunyuanVideo-1.5 call the denoiser separately for the negative prompt)."""

_PIPELINES: dict[str, Any] = {}


@pytest.fixture(autouse=True)
def cached_pipelines_and_methods(monkeypatch):
    """Build each tiny pipeline once for the module; record the method object every generate creates."""
    made: list[Any] = []
    load, get_method = run.load_pipeline, run.get_method

    def cached_load(model, **kwargs):
        if model not in _PIPELINES:
            _PIPELINES[model] = load(model, **kwargs)
        return _PIPELINES[model]

    def recording_get_method(*args, **kwargs):
        made.append(get_method(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(run, "load_pipeline", cached_load)
    monkeypatch.setattr(run, "get_method", recording_get_method)
    return made


def cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def _generate(capsys, tmp_path, model, method, options, *extra):
    return cli(capsys, "generate", "--method", method, "--model", model, "--out", str(tmp_path), "--warmup", "0",
               "--repeats", "1", *options, *extra)


@pytest.mark.parametrize("model,method,options", RUNS, ids=[f"{m}-{x}" for m, x, _ in RUNS])
def test_generate_runs_the_method(capsys, tmp_path, cached_pipelines_and_methods, model, method, options):
    code, out, err = _generate(capsys, tmp_path, model, method, options, "--no-compare")
    assert code == 0, err
    (made,) = cached_pipelines_and_methods
    counts = made.call_counts
    assert counts.method > 0, f"{method} on {model}: {counts}"  # its own attention ran on the visual tokens
    assert "fell back" not in out + err
    assert list(tmp_path.glob(f"{model}_{method}.*"))


@pytest.mark.parametrize("model,method,options", COMPARED_RUNS, ids=[f"{m}-{x}" for m, x, _ in COMPARED_RUNS])
def test_generate_runs_a_sparse_method_against_dense(capsys, tmp_path, cached_pipelines_and_methods, model, method,
                                                     options):
    code, out, err = _generate(capsys, tmp_path, model, method, options)
    assert code == 0, err
    assert "PSNR" in out and "speedup" in out and "fell back" not in out + err
    psnr = re.search(r"PSNR dB[^0-9inf]*([0-9.]+|inf)", out)
    assert psnr is not None and psnr.group(1) != "inf"  # the output is not dense's
    (made,) = cached_pipelines_and_methods
    assert made.call_counts.method > 0
    assert (tmp_path / f"{model}_{method}_vs_dense.png").exists()


def test_softpag_on_ltx2_against_dense_says_once_that_the_audio_is_not_compared(capsys, tmp_path):
    """SoftPAG through LTX2Pipeline's batched CFG (video and audio predictions combined); the run and its dense
    baseline are two pipeline calls, and the note that the audio is not compared comes once."""
    from diffaccel.warn import reset_warnings

    reset_warnings()
    code, out, err = _generate(capsys, tmp_path, "tiny-ltx2", "softpag", SOFTPAG_LTX2 + ["--steps", "1"])
    assert code == 0, err
    assert (out + err).count("also returns audio") == 1
    psnr = re.search(r"PSNR dB[^0-9inf]*([0-9.]+|inf)", out)
    assert psnr is not None and psnr.group(1) != "inf"  # the guidance changed the video
    assert (tmp_path / "tiny-ltx2_softpag_vs_dense.png").exists() and list(tmp_path.glob("tiny-ltx2_softpag.*"))


@pytest.mark.parametrize("model,method,options,error", REFUSED, ids=[f"{m}-{x}" for m, x, _, _ in REFUSED])
def test_methods_that_do_not_apply_are_refused(capsys, tmp_path, model, method, options, error):
    code, out, err = _generate(capsys, tmp_path, model, method, options, "--no-compare")
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and error in lines[0], err


def test_ltx2_gemma_tokenizer_starts_with_bos_and_pads_on_the_left():
    """As Gemma's: ``<bos>`` first (so the empty negative prompt keeps one valid token), left padding, byte fallback."""
    from diffaccel.pipelines.tiny_families import gemma_tokenizer

    tok = gemma_tokenizer()
    enc = tok(["a cat", ""], padding="max_length", max_length=8, truncation=True)
    assert enc.input_ids[0][-6:] == [tok.bos_token_id, *tok("a cat", add_special_tokens=False).input_ids]
    assert enc.attention_mask[0] == [0, 0, 1, 1, 1, 1, 1, 1] and enc.attention_mask[1] == [0] * 7 + [1]
    assert enc.input_ids[1][-1] == tok.bos_token_id == 2 and tok.pad_token_id == 0
    assert tok.decode(tok("é").input_ids, skip_special_tokens=True) == "é"


def test_ltx2_sizes_must_be_multiples_of_32(capsys, tmp_path):
    code, _, err = _generate(capsys, tmp_path, "tiny-ltx2", "dense", ["--height", "48"])
    assert code == 2 and "multiple of 32" in err and "LTX2Pipeline" in err


def test_models_lists_the_new_tiny_pipelines(capsys):
    code, out, _ = cli(capsys, "models")
    assert code == 0
    for name, cls in (("tiny-flux2", "Flux2KleinPipeline"), ("tiny-qwen-image", "QwenImagePipeline"),
                      ("tiny-z-image", "ZImagePipeline"), ("tiny-hunyuan-video15", "HunyuanVideo15Pipeline"),
                      ("tiny-ltx2", "LTX2Pipeline")):
        assert name in out and cls in out


NEW_FAMILY_PIPELINES = ("tiny-flux2", "tiny-qwen-image", "tiny-z-image", "tiny-hunyuan-video15", "tiny-ltx2")
MATRIX_METHODS = ("gna", "tile", "clear", "msw", "agent", "paro", "adaspa", "vmoba")
"""Every registered sparse method but SoftPAG (a guidance method, its own tests above and in test_softpag.py)."""
MATRIX_EXPECTED: dict[tuple[str, str], tuple[str, str]] = {
    # (model, method) -> (outcome, what the one line says); every other pair must run the method
    **{(m, "tile"): ("refused", "need a video grid") for m in ("tiny-flux2", "tiny-qwen-image", "tiny-z-image")},
    ("tiny-qwen-image", "paro"): ("refused", "different text lengths"),
    ("tiny-z-image", "agent"): ("dense", "agent: attention calls with a mask run dense"),
    ("tiny-hunyuan-video15", "agent"): ("dense", "agent: attention calls with a mask run dense"),
}
"""Why the exceptions: tiles are a video method; Qwen-Image runs its negative prompt as its own call at its own text
length, which one PARO plan cannot serve; Z-Image and HunyuanVideo-1.5 pass a prompt key mask on every call, which
agent attention cannot take (it says so once and runs dense, and generate reports the fallback)."""


def test_matrix_names_only_pairs_it_runs():
    assert {m for m, _ in MATRIX_EXPECTED} <= set(NEW_FAMILY_PIPELINES)
    assert {x for _, x in MATRIX_EXPECTED} <= set(MATRIX_METHODS)
    from diffaccel.methods.base import list_methods

    assert set(MATRIX_METHODS) == set(list_methods()) - {"dense", "softpag"}  # a new method joins the matrix


@pytest.mark.parametrize("model", NEW_FAMILY_PIPELINES)
@pytest.mark.parametrize("method", MATRIX_METHODS)
def test_every_method_on_every_new_family_runs_or_says_why_not(capsys, tmp_path, cached_pipelines_and_methods,
                                                               model, method):
    """Every sparse method through ``diffaccel generate`` on every new family's tiny pipeline: it runs its own
    attention (call counts), or it is refused with one clear error line, or it runs dense and says so."""
    from diffaccel.methods.base import method_parameters
    from diffaccel.warn import reset_warnings

    reset_warnings()
    options = REFERENCE if "backend" in {f[0] for f in method_parameters(method)} else []
    if model != "tiny-hunyuan-video15" and method != "paro":  # PARO calibrates on the run's own steps
        options = options + ["--steps", "1"]
    code, out, err = _generate(capsys, tmp_path, model, method, options, "--no-compare")
    outcome, says = MATRIX_EXPECTED.get((model, method), ("runs", ""))
    if outcome == "refused":
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(lines) == 1 and says in lines[0], err
        return
    assert code == 0, err
    (made,) = cached_pipelines_and_methods
    counts = made.call_counts
    if outcome == "dense":
        assert counts.method == 0 and counts.dense > 0, counts
        assert (out + err).count(says) == 1 and "fell back" in out + err
        return
    assert counts.method > 0 and "fell back" not in out + err, f"{method} on {model}: {counts}"
    assert list(tmp_path.glob(f"{model}_{method}.*"))


def test_softpag_on_qwen_image_turns_its_true_cfg_off_and_says_so(capsys, tmp_path):
    """Qwen-Image runs true CFG (the negative prompt as a second denoiser call per step), which SoftPAG's wrapper
    cannot take: generate turns it off, says so once, and SoftPAG's own guidance runs against a dense baseline made
    with the same settings."""
    from diffaccel.warn import reset_warnings

    reset_warnings()
    code, out, err = _generate(capsys, tmp_path, "tiny-qwen-image", "softpag",
                               ["--set", 'layers=["transformer_blocks.0.attn"]', "--steps", "1"])
    assert code == 0, err
    assert (out + err).count("true CFG (true_cfg_scale=") == 1
    psnr = re.search(r"PSNR dB[^0-9inf]*([0-9.]+|inf)", out)
    assert psnr is not None and psnr.group(1) != "inf"  # the perturbed-branch guidance changed the image
