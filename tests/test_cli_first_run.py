"""Issue 16, the first ten minutes: what a newcomer runs first must work as written and say what it did.

``diffaccel --help`` without torch, help examples and README commands that run, compact ``methods`` listings with
escaped markup, ``--out`` checked before any work, no silent no-ops ("fell back to dense"), SoftPAG on FLUX by our
documented default, one-line warnings, side-by-sides worth looking at, Hub errors in CLI words. The CLI checks
that concern the process (imports, warnings, exit codes) run the real console entry point in a subprocess.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffaccel.cli import main

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", COLUMNS="80", PYTHONPATH=str(REPO))
ENV.pop("DIFFACCEL_VERBOSE", None)


def console_script(
    *args: str, cwd: Path = REPO, timeout: float = 300, code: str = "", env: dict[str, str | None] | None = None
) -> subprocess.CompletedProcess:
    """Run the ``diffaccel`` console script as pip's launcher does: import the ``[project.scripts]`` target of
    pyproject.toml and call it (on this checkout's package), in a fresh process."""
    target = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["diffaccel"]
    module, function = target.split(":")
    launcher = f"import sys; sys.argv[0] = 'diffaccel'; from {module} import {function} as entry\n{code}\nsys.exit(entry())"
    environ = dict(ENV)
    for key, value in (env or {}).items():
        if value is None:
            environ.pop(key, None)
        else:
            environ[key] = value
    return subprocess.run(
        [sys.executable, "-c", launcher, *args], capture_output=True, text=True, env=environ, cwd=cwd, timeout=timeout
    )


@pytest.fixture
def cpu_user(monkeypatch):
    """As a user's CPU runs: sparse kernels on their PyTorch reference, not Triton's (slow) interpreter."""
    from diffaccel.kernels import dispatch

    monkeypatch.setattr(dispatch, "_interpreting", lambda: False)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def flat(text: str) -> str:
    """Table text without box drawing, whitespace collapsed (cells wrap at 80 columns)."""
    return " ".join(re.sub(r"[│┃┏┓┗┛┡┩└┘━─┳┻╇╈┼┬┴├┤╭╮╰╯]", " ", text).split())


# ------------------------------------------------------------------------------------------ --help, imports


def test_help_does_not_import_torch_and_is_fast():
    probe = "import atexit; atexit.register(lambda: print('TORCH-IMPORTED' if 'torch' in sys.modules else 'NO-TORCH'))"
    for args in (["--help"], ["generate", "--help"], []):
        proc = console_script(*args, code=probe)
        assert proc.returncode == 0, proc.stderr
        assert "Usage: diffaccel" in proc.stdout and proc.stdout.rstrip().endswith("NO-TORCH"), (args, proc.stdout[-300:])
    assert "headhunt" in console_script("--help").stdout  # listed without importing its (torch) module
    assert "--objective" in console_script("headhunt", "--help").stdout  # and loaded when asked for
    walls = []
    for _ in range(2):
        start = time.perf_counter()
        assert console_script("--help").returncode == 0
        walls.append(time.perf_counter() - start)
    assert min(walls) < 1.0, walls  # 0.27 s measured on an idle CPU; torch alone takes ~3 s to import


def test_package_names_are_lazy_but_all_there():
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, diffaccel; a = 'torch' in sys.modules; from diffaccel import apply, "
         "GNAAttnProcessor, ConfigError; import diffaccel as d; print(a, callable(d.apply), d.remove.__name__, "
         "sorted(set(d.__all__) - set(dir(d))))"],
        capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True", "remove", "[]"]
    import diffaccel

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        diffaccel.nope  # noqa: B018


# ------------------------------------------------------------------------------------------ examples that run


@functools.lru_cache(maxsize=1)
def help_examples() -> tuple[str, ...]:
    """Every ``diffaccel ...`` line of every command's --help text."""
    from typer.main import get_command

    from diffaccel.cli import app

    group = get_command(app)
    lines = []
    texts = [group.help or ""]
    for name in group.list_commands(None):  # type: ignore[arg-type]
        if name == "headhunt":
            continue  # a lazy command (a stand-in here): its help text is read from its function below
        command = group.get_command(None, name)  # type: ignore[arg-type]
        texts += [command.help or "", command.epilog or ""]
    from diffaccel.pipelines.headhunt import headhunt_command

    texts.append(headhunt_command.__doc__ or "")
    for text in texts:
        lines += [line.strip() for line in text.splitlines() if line.strip().startswith("diffaccel ")]
    return tuple(lines)


SERVERS = ("diffaccel demo",)
"""Commands that serve until stopped: the browser and API tests of the demo run them (tests/test_demo_app.py)."""


def readme_blocks() -> list[tuple[str, ...]]:
    """README ``diffaccel ...`` commands that run offline, per ```bash block in order (a block is a sequence: a
    calibration then the generation that reads its plan): those naming a tiny model, the default-model quickstart
    (tiny-flux on a CPU) and the listings. Backslash continuations are joined, ``# comments`` dropped."""
    text = (REPO / "README.md").read_text()
    blocks = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        commands = []
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                part = shlex.join(shlex.split(part, comments=True))
                if not part.startswith("diffaccel ") or part.startswith(SERVERS):
                    continue
                if "--model" not in part or "tiny-" in part:
                    commands.append(part)
        if commands:
            blocks.append(tuple(commands))
    return blocks


def readme_commands() -> list[str]:
    return sorted({c for block in readme_blocks() for c in block})


def test_readme_and_help_commands_are_found():
    found = readme_commands()
    assert "diffaccel generate --method gna" in found  # the fresh-machine command, as written
    assert "diffaccel generate --method tile --model tiny-wan" in found
    assert not [c for c in found if "FLUX.1-dev" in c]
    assert not [c for c in found if c.startswith(SERVERS) or "#" in c or "\\" in c]
    assert "diffaccel generate --method gna --set kernel_size=5 --set dense_steps=1" in help_examples()


def _blocks_to_run() -> list[tuple[str, ...]]:
    blocks = set(readme_blocks()) | {(example,) for example in help_examples()}
    return sorted(blocks)


@pytest.mark.parametrize("block", _blocks_to_run(), ids=lambda b: " && ".join(b)[:120])
def test_every_help_example_and_readme_command_runs_as_written(block, capsys, tmp_path, monkeypatch):
    """Run as written, a README block's commands in order in one folder (outputs land in the current folder, here a
    temporary one), in process to save imports, and as a user's CPU runs them: without TRITON_INTERPRET (which the
    test session sets), so the sparse kernels run their PyTorch reference rather than Triton's slow interpreter."""
    from diffaccel.kernels import dispatch
    from diffaccel.warn import reset_warnings

    monkeypatch.setattr(dispatch, "_interpreting", lambda: False)
    monkeypatch.chdir(tmp_path)
    for command in block:
        reset_warnings()
        argv = shlex.split(command)[1:]
        if argv[0] == "generate":  # one timed call per side (the README says so): what runs is otherwise as written
            argv += ["--warmup", "0", "--repeats", "1"]
        code, out, err = cli(capsys, *argv)
        assert code == 0, (command, err)
        assert "Traceback" not in err and all(line.startswith("warning") for line in err.splitlines()), err
        if argv[0] == "generate":
            assert "PSNR" in out and "fell back to dense" not in flat(out)
            assert list((tmp_path / "outputs").glob("*_vs_dense.png"))


# ------------------------------------------------------------------------------------------ methods listings


def test_methods_table_is_compact_and_escapes_markup():
    from diffaccel.methods.base import list_methods

    proc = console_script("methods")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) <= 45 and max(len(line) for line in lines) <= 80, len(lines)
    text = flat(proc.stdout)
    for column in ("method", "kind", "applies to", "summary"):
        assert column in text
    for name in list_methods():
        assert re.search(rf"(^|\s){name}\s", text), name
    assert not re.search(r"kernel_size|dense_steps|block_size", text)  # no parameter rows (`methods NAME` has them)


def test_methods_name_lists_every_parameter_with_brackets_kept():
    from diffaccel.methods.base import method_parameters

    proc = console_script("methods", "gna")
    assert proc.returncode == 0, proc.stderr
    text = flat(proc.stdout).replace(" ", "")
    for field, _, default, help_text in method_parameters("gna"):
        assert field in text and repr(default).replace(" ", "") in text, field
        for bracketed in re.findall(r"\[[^\]]*\]", help_text):  # rich would swallow these as markup
            assert bracketed.replace(" ", "") in text, bracketed


# ------------------------------------------------------------------------------------------ before any work


def test_out_that_is_a_file_fails_before_any_work(tmp_path):
    existing = tmp_path / "result.png"
    existing.write_bytes(b"x")
    start = time.perf_counter()
    proc = console_script("generate", "-m", "gna", "--out", str(existing))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith(f"error: --out '{existing}' must be a folder") and "file" in proc.stderr
    assert existing.read_bytes() == b"x"
    assert time.perf_counter() - start < 60


def test_console_script_warnings_are_one_line_without_source(tmp_path):
    """A CPU user's run (no TRITON_INTERPRET): the reference-kernel fallback is announced as one warning line."""
    proc = console_script("generate", "-m", "gna", "--model", "tiny-sd", "--steps", "1", "--warmup", "0",
                          "--repeats", "1", "--out", str(tmp_path), env={"TRITON_INTERPRET": None})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines and all(line.startswith("warning: ") for line in lines), proc.stderr
    assert any("PyTorch reference" in line for line in lines)
    assert not re.search(r"\.py:\d+", proc.stderr) and "Traceback" not in proc.stderr


NO_OPS = [
    (["--set", 'layers=["nope.*"]'], ["layers pattern 'nope.*' matches no attention module", "transformer_blocks.0.attn"]),
    (["--set", 'exclude_layers=["nope"]'], ["exclude_layers pattern 'nope'"]),
    (["--set", 'layers=["transformer_blocks.0.attn", "nope"]'], ["layers pattern 'nope' matches no"]),
    (["--set", 'layer_overrides={"nope.*": {"kernel_size": 3}}'], ["layer_overrides pattern 'nope.*'"]),
    (["--set", "dense_steps=5"], ["dense_steps=5 with 2 denoising steps", "never run", "N < 2"]),
    (["--set", "dense_steps=2"], ["dense_steps=2 with 2 denoising steps"]),
    (["--steps", "1", "--set", "dense_steps=1"], ["dense_steps=1 with 1 denoising steps"]),
]


@pytest.mark.parametrize("args, expected", NO_OPS, ids=[" ".join(a) for a, _ in NO_OPS])
def test_settings_that_never_run_the_method_are_errors(capsys, tmp_path, args, expected):
    code, out, err = cli(capsys, "generate", "-m", "gna", "--model", "tiny-flux", "--out", str(tmp_path), *args)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    for text in expected:
        assert text in err, (text, err)
    assert not list(tmp_path.iterdir())


def test_dense_steps_below_steps_and_matching_patterns_run(capsys, tmp_path, cpu_user):
    code, out, err = cli(
        capsys, "generate", "-m", "gna", "--model", "tiny-flux", "--out", str(tmp_path), "--warmup", "0",
        "--repeats", "1", "--set", "dense_steps=1", "--set", 'layers=["transformer_blocks.*"]',
    )  # fmt: skip
    assert code == 0, err
    assert "fell back" not in flat(out) and "inf" not in flat(out).split("PSNR dB")[1].split("SSIM")[0]


# ------------------------------------------------------------------------------------------ fell back to dense


def test_a_method_that_always_falls_back_is_marked_and_warned_once(capsys, tmp_path):
    """agent on HunyuanVideo: every joint call has a text mask agent attention cannot take (runs dense). In
    process (the entry point installs the one-line warning format as in the console script; that the console
    script prints one-line warnings is checked with a real process in test_console_script_warnings_are_one_line_without_source)."""
    from diffaccel.warn import reset_warnings

    reset_warnings()
    code, out, err = cli(capsys, "generate", "-m", "agent", "--model", "tiny-hunyuan-video", "--out", str(tmp_path),
                         "--warmup", "0", "--repeats", "1")  # fmt: skip
    assert code == 0, err
    text = flat(out)
    assert "attention stock fell back to dense (0 of" in text and "calls ran agent)" in text
    warnings = err.strip().splitlines()
    assert all(line.startswith("warning: ") for line in warnings), err  # one line each, no source code
    assert len([w for w in warnings if "fell back to dense" in w]) == 1
    assert not re.search(r"\.py:\d+", err) and "warn_once(" not in err


def test_call_counts_and_fallback_note():
    from diffaccel.context import RunContext
    from diffaccel.layout import TokenLayout
    from diffaccel.methods.base import get_method
    from diffaccel.run import fallback_note

    q = torch.randn(1, 2, 64, 16)
    layout = TokenLayout(num_tokens=64, grid=(8, 8))
    method = get_method("gna", kernel_size=3, dense_steps=1, backend="reference")
    for step in (0, 0, 1):
        method(q, q, q, layout, RunContext(grid=(8, 8), step=step, layer="a"))
    method(q, q, q, TokenLayout(num_tokens=64, grid=None), RunContext(step=1, layer="a"))  # no grid: not counted
    assert (method.call_counts.method, method.call_counts.dense) == (1, 2)
    out = torch.rand(3, 8, 8)
    assert fallback_note(method, out, out.clone()) == "fell back to dense (output identical to dense)"
    assert fallback_note(method, out, out + 0.1) is None
    method.call_counts.reset()
    method(q, q, q, layout, RunContext(grid=(8, 8), step=0, layer="a"))
    assert fallback_note(method, out, out + 0.1) == "fell back to dense (0 of 1 attention calls ran gna)"
    dense = get_method("dense")
    assert fallback_note(dense, out, out.clone()) is None  # dense equal to dense is the expected result
    msw = get_method("msw", backend="reference")  # a UNet level below the finest one has no plan: dense, counted
    coarse = TokenLayout(num_tokens=64, grid=(8, 8), downsample=2, hierarchical=True, finest_downsample=1)
    msw(q, q, q, coarse, RunContext(grid=(16, 16), step=0, layer="down.1"))
    assert (msw.call_counts.method, msw.call_counts.dense) == (0, 1)


# ------------------------------------------------------------------------------------------ SoftPAG on FLUX


def test_softpag_runs_on_the_default_model_and_announces_its_layer(capsys, tmp_path):
    from diffaccel.warn import reset_warnings

    reset_warnings()
    code, out, err = cli(capsys, "generate", "-m", "softpag", "--out", str(tmp_path), "--warmup", "0", "--repeats", "1")
    assert code == 0, err
    announced = [line for line in err.splitlines() if "softpag on flux" in line]
    assert len(announced) == 1 and "transformer_blocks.1" in announced[0] and "own default" in announced[0]
    psnr = flat(out).split("PSNR dB")[1].split("SSIM")[0].split()
    assert psnr[0] == "-" and psnr[1] != "inf"  # guidance changed the image
    code, out, err = cli(
        capsys, "generate", "-m", "softpag", "--model", "tiny-hunyuan-video", "--out", str(tmp_path / "v"),
        "--warmup", "0", "--repeats", "1",
    )  # fmt: skip
    assert code == 2 and "diffaccel generate --method softpag --set 'layers=[" in err


# ------------------------------------------------------------------------------------------ outputs


def test_side_by_side_has_a_difference_panel_scaled_up_and_a_caption():
    from diffaccel.eval.media import MIN_WIDTH, difference_map, side_by_side

    ref = torch.rand(3, 16, 24)
    out = ref.clone()
    out[:, 4, 5] += 0.5  # one changed pixel
    heat, peak = difference_map(ref, out)
    assert peak == pytest.approx(float((out - ref).abs().mean(0).max()))
    assert heat.shape == (3, 16, 24) and heat[:, 4, 5].tolist() == [1.0, 1.0, 1.0]
    assert float(heat.sum()) == pytest.approx(3.0)  # every other pixel black
    darker = ref.clone()
    darker[:, 2, 3] -= 0.4  # a negative difference is as visible as a positive one
    heat, peak = difference_map(ref, darker)
    assert peak == pytest.approx(float((ref[:, 2, 3] - darker[:, 2, 3]).mean()), rel=1e-5)
    assert heat[:, 2, 3].tolist() == [1.0, 1.0, 1.0] and float(heat.sum()) == pytest.approx(3.0)
    plain = side_by_side(ref, out, ("dense", "gna"))
    captioned = side_by_side(ref, out, ("dense", "gna"), caption="PSNR 30.00 dB, SSIM 0.9000")
    assert plain.width >= MIN_WIDTH and captioned.height > plain.height
    factor = -(-MIN_WIDTH // (3 * 24))
    arr = np.asarray(plain)
    white = np.where((arr == 255).all(axis=2))  # the changed pixel, scaled up to a factor x factor white square
    diff_panel = arr[:, 2 * arr.shape[1] // 3:]
    red = (diff_panel[..., 0] == 255) & (diff_panel[..., 1] == 255) & (diff_panel[..., 2] == 255)
    assert red.sum() >= factor * factor and len(white[0]) > 0
    same = side_by_side(ref, ref.clone(), ("dense", "dense"))
    assert same.size[0] >= MIN_WIDTH


def test_video_strips_are_evenly_spaced_and_say_which_frames():
    from diffaccel.eval.media import MIN_WIDTH, side_by_side, strip_indices, strip_label

    for frames in (9, 17, 33, 81, 12, 50):
        idx = strip_indices(frames)
        steps = {b - a for a, b in zip(idx, idx[1:])}
        assert idx[0] == 0 and len(steps) == 1 and len(idx) <= 8 and idx[-1] <= frames - 1, (frames, idx)
        assert frames - 1 - idx[-1] < next(iter(steps)), (frames, idx)  # no more than one step left out at the end
    assert strip_indices(9) == [0, 2, 4, 6, 8] and strip_indices(5) == [0, 1, 2, 3, 4]
    assert strip_label("dense", [0, 2, 4, 6, 8], 9) == "dense: frames 0, 2, 4, 6, 8 of 9 (every 2nd)"
    assert strip_label("gna", [0, 1, 2], 3) == "gna: all 3 frames"
    assert strip_label("x", [0, 11, 22], 30) == "x: frames 0, 11, 22 of 30 (every 11th)"
    img = side_by_side(torch.zeros(9, 3, 8, 8), torch.ones(9, 3, 8, 8), ("dense", "tile"))
    assert img.width >= MIN_WIDTH
    factor = -(-MIN_WIDTH // (5 * 8))
    assert img.height >= 3 * 8 * factor  # dense, method and difference strips


def test_generate_writes_the_big_side_by_side_with_psnr(capsys, tmp_path, cpu_user):
    code, out, err = cli(capsys, "generate", "-m", "gna", "--model", "tiny-sd", "--out", str(tmp_path),
                         "--warmup", "0", "--repeats", "1", "--steps", "1")  # fmt: skip
    assert code == 0, err
    with Image.open(tmp_path / "tiny-sd_gna_vs_dense.png") as img:
        assert img.width >= 512
    assert "difference" in out


# ------------------------------------------------------------------------------------------ errors, bench


def test_hub_errors_read_as_cli_advice():
    from diffaccel.pipelines.loading import _hub_reason

    class LocalEntryNotFoundError(Exception):
        pass

    inner = LocalEntryNotFoundError("outgoing traffic has been disabled. pass 'local_files_only=False' " + "x " * 300)
    outer = OSError("Cannot load model: the model is not fully cached locally")
    outer.__cause__ = inner
    reason = _hub_reason(outer)
    assert "local_files_only" not in reason and "could not be reached" in reason and not reason.endswith("...")
    long = ValueError("word " * 200)
    assert _hub_reason(long) == ("word " * 200).strip()  # never cut mid-word
    gated = _hub_reason(OSError("Access to model x is restricted: it is a gated repo"))
    assert "accept its license" in gated and "huggingface-cli login" in gated


def test_bench_writes_under_outputs_by_default():
    from diffaccel.bench.options import DEFAULT_OUT

    assert Path(DEFAULT_OUT) == Path("outputs/bench") and not Path(DEFAULT_OUT).is_absolute()
    for name in ("kernels", "locality"):
        proc = console_script("bench", name, "--help")
        assert proc.returncode == 0 and "outputs/bench" in proc.stdout, proc.stderr


def test_one_line_warning_format():
    import warnings

    from diffaccel.warn import DiffAccelWarning, format_warning_line, install_cli_warnings

    assert format_warning_line(DiffAccelWarning("a\n  b"), DiffAccelWarning) == "warning: a b"
    assert format_warning_line("x", UserWarning) == "warning (UserWarning): x"
    previous = install_cli_warnings()
    try:
        import io

        stream = io.StringIO()
        warnings.showwarning(DiffAccelWarning("fallback"), DiffAccelWarning, "f.py", 3, stream, "source line")
        assert stream.getvalue() == "warning: fallback\n"
    finally:
        warnings.showwarning = previous


# ------------------------------------------------------------------------------------------ the CPU install path


def test_readme_cpu_install_takes_a_cpu_build_of_torch():
    """The README's CPU-only fresh-machine command installs a pinned ``+cpu`` torch before the project, and pip
    resolves that request to a CPU build (no CUDA libraries); resolved for real (``--dry-run``) where CI runs."""
    text = (REPO / "README.md").read_text()
    fresh = text[text.index("## Fresh machine"):]
    first = re.findall(r"```bash\n(.*?)```", fresh, re.S)[0]
    steps = [part.strip() for part in first.split("&&")]
    torch_step = next(s for s in steps if s.startswith("pip install") and "torch" in s)
    assert steps.index(torch_step) < steps.index("pip install -e ."), steps
    args = shlex.split(torch_step)[2:]
    spec = next(a for a in args if a.startswith("torch"))
    assert re.fullmatch(r"torch==\d+\.\d+\.\d+\+cpu", spec), spec
    if not os.environ.get("CI"):
        pytest.skip("resolving the command needs CI's wheelhouse or PyTorch's index (set CI=true to run it)")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed", *args],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"Would install torch-\d+\.\d+\.\d+\+cpu", proc.stdout), proc.stdout[-2000:]
