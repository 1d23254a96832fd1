"""The `diffaccel` command line: generate on every tiny model, methods/models listings, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from PIL import Image

from diffaccel.cli import main
from diffaccel.errors import UnsupportedModelError
from diffaccel.methods.base import list_methods
from diffaccel.pipelines.tiny import TINY_PIPELINES, build_tiny, tiny_spec


def cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def require_adapters(name: str) -> None:
    """Fail when the adapter of the tiny model's family is not registered (checks the registry)."""
    from diffaccel.pipelines.adapters.base import family_of, supported_processors
    from diffaccel.pipelines.hooks import attention_modules, denoisers_of

    pipe = build_tiny(name)
    for model in denoisers_of(pipe):
        try:
            family_of(model)
        except UnsupportedModelError as exc:
            pytest.fail(f"adapter not registered: {exc}")
        missing = {type(m.processor).__name__ for m in attention_modules(model).values()} - set(supported_processors())
        if missing:
            pytest.fail(f"adapter not registered for processors {sorted(missing)}")


@pytest.mark.parametrize("name", list(TINY_PIPELINES))
def test_generate_dense_on_each_tiny_model(capsys, tmp_path, name):
    require_adapters(name)
    spec = tiny_spec(name)
    code, out, err = cli(capsys, "generate", "--method", "dense", "--model", name, "--out", str(tmp_path), "--warmup", "0")
    assert code == 0, err
    assert "PSNR" in out and "SSIM" in out and "speedup" in out
    assert "inf" in out and "1.0000" in out  # dense through diffaccel equals the stock pipeline
    side = tmp_path / f"{name}_dense_vs_dense.png"
    assert side.exists() and str(side.name) in out.replace("\n", "")
    if spec.frames is None:
        image = tmp_path / f"{name}_dense.png"
        with Image.open(image) as img:
            assert img.size == (spec.width, spec.height)
        with Image.open(side) as img:
            assert img.width >= 2 * spec.width
    else:
        written = [p for p in tmp_path.iterdir() if p.stem == f"{name}_dense"]
        assert len(written) == 1 and written[0].suffix in (".mp4", ".gif")
        assert ("GIF" in out) == (written[0].suffix == ".gif")
        if written[0].suffix == ".gif":
            with Image.open(written[0]) as gif:
                assert gif.n_frames == spec.frames


def test_generate_without_compare(capsys, tmp_path):
    require_adapters("tiny-sd")
    code, out, err = cli(
        capsys, "generate", "-m", "dense", "--model", "tiny-sd", "--out", str(tmp_path), "--no-compare",
        "--warmup", "0", "--steps", "1", "--height", "48", "--width", "32", "--seed", "7",
    )
    assert code == 0, err
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["tiny-sd_dense.png"]
    with Image.open(tmp_path / files[0]) as img:
        assert img.size == (32, 48)
    assert "1 steps" in out and "inf" not in out


def test_methods_lists_registered_methods(capsys):
    code, out, err = cli(capsys, "methods")
    assert code == 0, err
    assert "dense" in out
    for name in list_methods():
        assert name in out


def test_models_lists_tiny_pipelines(capsys):
    code, out, _ = cli(capsys, "models")
    assert code == 0
    for name in TINY_PIPELINES:
        assert name in out


BAD_INPUTS = [
    (["generate", "--method", "nope"], ["unknown method 'nope'", "dense"]),
    (["generate", "-m", "dense", "--model", "tiny-nope"], ["tiny-nope", "tiny-flux", "tiny-wan"]),
    (["generate", "-m", "dense", "--model", "./no/such/folder"], ["./no/such/folder", "does not exist"]),
    (["generate", "-m", "dense", "--model", "diffaccel-test/no-such-model"], ["no-such-model", "HF_HUB_OFFLINE"]),
    (["generate", "-m", "dense", "--model", "tiny-flux", "--height", "30"], ["height", "multiple of 4", "30"]),
    (["generate", "-m", "dense", "--model", "tiny-sd3", "--width", "70"], ["width", "multiple of 4", "70"]),
    (["generate", "-m", "dense", "--model", "tiny-sdxl", "--height", "60"], ["height", "multiple of 8", "60"]),
    (["generate", "-m", "dense", "--model", "tiny-wan", "--frames", "8"], ["frames", "4k+1", "8"]),
    (["generate", "-m", "dense", "--model", "tiny-wan", "--height", "40"], ["height", "multiple of 16", "40"]),
    (["generate", "-m", "dense", "--model", "tiny-ltx", "--frames", "10"], ["frames", "4k+1", "10"]),
    (["generate", "-m", "dense", "--model", "tiny-ltx", "--width", "48"], ["width", "multiple of 32", "48"]),
    (["generate", "-m", "dense", "--model", "tiny-sdxl", "--frames", "9"], ["--frames", "video pipelines"]),
    (["generate", "-m", "dense", "--set", "oops"], ["--set", "key=value", "oops"]),
    (["generate", "-m", "dense", "--set", "density=0.5"], ["unknown parameter", "density"]),
    (["generate", "-m", "dense", "--steps", "0"], ["--steps"]),
    (["generate", "-m", "dense", "--dtype", "float8"], ["dtype", "float8"]),
    (["generate", "-m", "dense", "--device", "tpu"], ["device", "tpu"]),
    (["generate"], ["--method"]),
    (["bogus"], ["bogus"]),
]


@pytest.mark.parametrize("args, expected", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_code_2(capsys, tmp_path, args, expected):
    if "--model" in args and "HF_HUB_OFFLINE" in expected:
        from huggingface_hub import constants

        if not constants.HF_HUB_OFFLINE:
            pytest.skip("HF_HUB_OFFLINE is not set in this process")
    code, out, err = cli(capsys, *args, *(["--out", str(tmp_path)] if args[0] == "generate" else []))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert not list(tmp_path.iterdir())  # nothing written


def test_console_entry_point_prints_one_line():
    """The real process: no traceback, no library warnings, exit code 2."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("DIFFACCEL_VERBOSE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "diffaccel.cli", "generate", "-m", "dense", "--model", "diffaccel-test/none"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: cannot load Hub id 'diffaccel-test/none'")


def test_parse_method_params():
    from diffaccel.errors import ConfigError
    from diffaccel.run import parse_method_params

    params = parse_method_params(["density=0.25", "dense-steps=3", "mode=pooled", "flag=True", "grid=[7, 7]", "x=none"])
    assert params == {"density": 0.25, "dense_steps": 3, "mode": "pooled", "flag": True, "grid": [7, 7], "x": None}
    for bad in ("novalue", "=3", "9a=1"):
        with pytest.raises(ConfigError, match="key=value"):
            parse_method_params([bad])


def test_generate_compares_a_method_that_changes_attention(tmp_path, monkeypatch):
    """A method other than dense gives a finite PSNR, SSIM < 1, and timings that add up."""
    import math

    from rich.console import Console

    from diffaccel.methods import base
    from diffaccel.methods.dense import DenseConfig
    from diffaccel.run import GenerateOptions, generate, results_table

    class UniformAttention(base.MethodBase):
        """Every visual query receives the mean of the values (attention with equal weights)."""

        name = "_test_uniform"
        config_class = DenseConfig

        def attend(self, q, k, v, layout, ctx, *, attn_mask=None, scale=None):
            return v.mean(dim=-2, keepdim=True).expand(*q.shape[:-1], v.shape[-1]).to(q.dtype)

    require_adapters("tiny-sdxl")
    base.list_methods()
    monkeypatch.setitem(base._REGISTRY, UniformAttention.name, UniformAttention)
    result = generate(GenerateOptions(method=UniformAttention.name, model="tiny-sdxl", out=tmp_path, warmup=0))
    dense, method = result.runs
    assert dense.baseline and dense.fidelity is None and not method.baseline
    assert math.isfinite(method.fidelity.psnr) and method.fidelity.psnr < 60
    assert 0 < method.fidelity.ssim < 1
    for run in result.runs:
        assert 0 < run.timing.denoise_s <= run.timing.total_s
    assert result.output_path.exists() and result.side_by_side_path.exists()
    console = Console(record=True, width=160)
    console.print(results_table(result))
    text = console.export_text()
    assert UniformAttention.name in text and f"{method.fidelity.psnr:.2f}" in text
