"""The `diffaccel` command line: generate on every tiny model, its timings (alternating runs, warm-up excluded, spreads,
overheads labelled), methods/models listings, one-line errors."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

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
    code, out, err = cli(
        capsys, "generate", "--method", "dense", "--model", name, "--out", str(tmp_path), "--warmup", "0", "--repeats", "1"
    )
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
        "--warmup", "0", "--repeats", "1", "--steps", "1", "--height", "48", "--width", "32", "--seed", "7",
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
    result = generate(GenerateOptions(method=UniformAttention.name, model="tiny-sdxl", out=tmp_path, warmup=0, repeats=2))
    dense, method = result.runs
    assert len(dense.samples) == len(method.samples) == 2
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


# ------------------------------------------------------------------------------------------ generate timings

REPO = Path(__file__).resolve().parents[1]


class FakeClock:
    """A clock that moves only when a fake call says how long it took."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _fake_sides(clock: FakeClock, log: list[str], durations: dict[str, list[float]], warmup_s: float = 100.0):
    """Two sides whose calls take the next duration of their list (warm-up calls take ``warmup_s``), timed by
    reading ``clock`` around the call as run_pipeline does with its clock."""
    from diffaccel.eval.timing import Side

    def side(name: str) -> Side:
        left = list(durations[name])

        def call(label: str) -> float:
            log.append(f"call {label}")
            start = clock()
            clock.advance(warmup_s if "warm-up" in label else left.pop(0))
            return clock() - start

        return Side(name, lambda: log.append(f"activate {name}"), call)

    return [side("method"), side("dense")]


def test_interleaved_alternates_method_and_dense_and_drops_the_warmup():
    from diffaccel.eval.timing import interleaved

    clock, log = FakeClock(), []
    sides = _fake_sides(clock, log, {"method": [1.0, 1.5, 1.25], "dense": [2.0, 2.5, 2.25]})
    method, dense = interleaved(sides, warmup=1, repeats=3)
    assert log == [
        "activate method", "call method warm-up 1", "activate dense", "call dense warm-up 1",
        "activate method", "call method 1/3", "activate dense", "call dense 1/3",
        "activate method", "call method 2/3", "activate dense", "call dense 2/3",
        "activate method", "call method 3/3", "activate dense", "call dense 3/3",
    ]  # fmt: skip
    # The timed results are the timed calls' clock differences, in call order; no warm-up call (100 s) among them.
    assert method == [1.0, 1.5, 1.25] and dense == [2.0, 2.5, 2.25]
    assert clock.now == 2 * 100.0 + sum(method) + sum(dense)


def test_interleaved_one_side_warmups_and_bad_arguments():
    from diffaccel.eval.timing import interleaved

    clock, log = FakeClock(), []
    (method, _) = _fake_sides(clock, log, {"method": [3.0, 4.0], "dense": []})
    assert interleaved([method], warmup=2, repeats=2) == [[3.0, 4.0]]
    assert log == ["activate method", "call method warm-up 1", "call method warm-up 2", "call method 1/2", "call method 2/2"]
    for bad in ({"warmup": -1, "repeats": 1}, {"warmup": 0, "repeats": 0}, {"warmup": 1.5, "repeats": 1}):
        with pytest.raises(ValueError, match="warmup|repeats"):
            interleaved([method], **bad)
    with pytest.raises(ValueError, match="at least one side"):
        interleaved([], warmup=0, repeats=1)


def test_spread_and_paired_ratio():
    from diffaccel.eval.timing import paired_ratio, spread

    s = spread([0.3, 0.1, 0.2])
    assert (s.median, s.low, s.high, s.count) == (0.2, 0.1, 0.3, 3)
    assert s.format() == "0.200 (0.100-0.300)" and spread([0.25]).format() == "0.250"
    r = paired_ratio([2.0, 2.5, 2.25], [1.0, 1.5, 1.25])
    assert r.median == pytest.approx(2.25 / 1.25)
    assert (r.low, r.high) == (pytest.approx(2.5 / 1.5), pytest.approx(2.0))
    assert r.format(".2f", "x") == "1.80x (1.67-2.00x)"
    assert paired_ratio([1.0], [0.0]) is None
    with pytest.raises(ValueError, match="equally long"):
        paired_ratio([1.0, 2.0], [1.0])


def test_generate_alternates_runs_and_excludes_warmup(tmp_path, monkeypatch):
    """generate() itself: the method and dense calls alternate with the right attention installed, warm-up calls
    are not timed, and the table shows medians, ranges and the ratio of medians (fake clock, real tiny pipeline)."""
    import torch
    from rich.console import Console

    from diffaccel import run
    from diffaccel.eval.timing import Timing
    from diffaccel.methods import base
    from diffaccel.methods.dense import DenseConfig
    from diffaccel.pipelines.hooks import denoisers_of, installed_processor

    class NoOpAttention(base.MethodBase):
        """A method that is never called (the pipeline call is faked)."""

        name = "_test_noop"
        config_class = DenseConfig

    require_adapters("tiny-sd")
    base.list_methods()
    monkeypatch.setitem(base._REGISTRY, NoOpAttention.name, NoOpAttention)
    clock, calls, pipes = FakeClock(), [], []
    durations = {"_test_noop": [1.0, 1.2, 1.1, 1.3, 0.9], "dense": [2.0, 2.1, 2.2, 2.3, 1.9]}

    def fake_run_pipeline(pipe, prompt, kwargs, seed, label):
        processor = installed_processor(denoisers_of(pipe)[0])
        active = "dense" if processor is None else processor.method.name
        calls.append((active, label))
        pipes.append(pipe)
        assert label.startswith(active)  # the label names the side whose attention is installed
        start = clock()
        clock.advance(100.0 if "warm-up" in label else durations[active].pop(0))
        total = clock() - start
        image = torch.full((3, 16, 16), 0.5) + (0.1 if active != "dense" else 0.0) * torch.rand(3, 16, 16)
        return image, Timing(total, total / 2)

    monkeypatch.setattr(run, "run_pipeline", fake_run_pipeline)
    result = run.generate(run.GenerateOptions(method=NoOpAttention.name, model="tiny-sd", out=tmp_path, device="cpu"))
    assert (result.warmup, result.repeats) == (run.DEFAULT_WARMUP, run.DEFAULT_REPEATS) == (2, 5)
    assert [a for a, _ in calls] == ["_test_noop", "dense"] * 7
    assert [label for _, label in calls[:4]] == [
        "_test_noop warm-up 1", "dense warm-up 1", "_test_noop warm-up 2", "dense warm-up 2"]
    dense, method = result.runs
    assert [t.total_s for t in method.samples] == pytest.approx([1.0, 1.2, 1.1, 1.3, 0.9])
    assert [t.total_s for t in dense.samples] == pytest.approx([2.0, 2.1, 2.2, 2.3, 1.9])
    assert (method.timing.total_s, method.timing.denoise_s, dense.timing.total_s) == pytest.approx((1.1, 0.55, 2.1))
    assert math.isfinite(method.fidelity.psnr) and dense.fidelity is None
    assert len({id(p) for p in pipes}) == 1 and installed_processor(denoisers_of(pipes[0])[0]) is None  # removed

    console = Console(record=True, width=240)
    console.print(run.results_table(result))
    text = " ".join(console.export_text().split())
    assert "1.100 (0.900-1.300)" in text and "2.100 (1.900-2.300)" in text  # medians (min-max) per side
    assert "0.550 (0.450-0.650)" in text  # the denoiser seconds
    # Speedup: ratio of the medians 2.1 / 1.1, with the min-max of the per-round ratios 2.0, 1.75, 2.0, 1.77, 2.11.
    assert f"{2.1 / 1.1:.2f}x ({2.1 / 1.2:.2f}-{1.9 / 0.9:.2f}x)" in text
    assert "CPU, tiny model: these times measure overheads, not attention speed." in text
    assert "speedup (overheads)" in text and "median (min-max) of 5 pipeline calls per run" in text
    assert "alternating call by call" in text and "after 2 untimed warm-up call(s) of each" in text


def test_results_table_labels_overheads_only_on_cpu_or_tiny_models(tmp_path):
    from rich.console import Console

    from diffaccel.eval.timing import Timing
    from diffaccel.run import GenerateResult, RunRecord, median_timing, results_table

    dense_s = (Timing(2.0, 1.0), Timing(2.2, 1.2), Timing(2.4, 1.4))
    method_s = (Timing(1.0, 0.5), Timing(1.0, 0.4), Timing(1.2, 0.6))

    def table(model: str, device: str) -> str:
        result = GenerateResult(
            model=model, method="gna", pipeline="FluxPipeline", device=device, dtype="bfloat16", is_video=False,
            size=(3, 64, 64), steps=2, warmup=1, repeats=3, output_path=tmp_path / "x.png",
            runs=[RunRecord("dense", median_timing(dense_s), baseline=True, samples=dense_s),
                  RunRecord("gna", median_timing(method_s), samples=method_s)],
        )  # fmt: skip
        console = Console(record=True, width=240)
        console.print(results_table(result))
        return " ".join(console.export_text().split())

    gpu = table("black-forest-labs/FLUX.1-dev", "cuda:0")
    assert "overheads" not in gpu and "attention speed" not in gpu
    assert "2.20x (2.00-2.20x)" in gpu and "2.40x (2.00-3.00x)" in gpu  # total and denoiser speedups
    assert "tiny model: these times measure overheads, not attention speed." in table("tiny-flux", "cuda")
    assert "CPU: these times measure overheads" in table("black-forest-labs/FLUX.1-dev", "cpu")
    assert "CPU, tiny model: these times" in table("tiny-flux", "cpu")


def test_generate_console_defaults_time_both_sides_with_spreads(tmp_path):
    """The real console script on the default tiny run: warm-up 2, 5 alternating timed calls per side, medians
    with min-max, and the overheads label."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", COLUMNS="200")
    proc = subprocess.run(
        [sys.executable, "-m", "diffaccel.cli", "generate", "-m", "dense", "--model", "tiny-flux", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = " ".join(proc.stdout.split())
    assert "these times measure overheads, not attention speed." in out
    assert "median (min-max) of 5 pipeline calls per run, method and dense alternating call by call" in out
    assert "after 2 untimed warm-up call(s) of each" in out
    assert len(re.findall(r"\d+\.\d{3} \(\d+\.\d{3}-\d+\.\d{3}\)", out)) == 4  # 2 runs x (total, denoiser)
    assert len(re.findall(r"\d+\.\d{2}x \(\d+\.\d{2}-\d+\.\d{2}x\)", out)) == 4
    assert "inf" in out and "1.0000" in out and (tmp_path / "tiny-flux_dense.png").exists()
