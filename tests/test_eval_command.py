"""Issue 14: ``diffaccel eval`` end to end on the tiny pipelines: the JSON, the markdown table and the plots;
skipped metrics with their reasons; identical dense outputs across runs; FID/KID through clean-fid with an
injected extractor; a valid partial report after Ctrl-C; the two-process report (accelerate) equals the
one-process report; recipe errors are one line and exit code 2; ``eval --help`` imports no torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffaccel.cli import main
from diffaccel.eval.metrics import importable
from diffaccel.eval.report import comparable

REPO = Path(__file__).resolve().parents[1]
FLUX_ARGS = ["--model", "tiny-flux", "--methods", "dense,gna,agent", "--num", "2", "--warmup", "0"]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def as_user(mp: pytest.MonkeyPatch) -> None:
    """As a user's CPU runs: kernels on their PyTorch reference (not Triton's slow interpreter), downloads off."""
    from diffaccel.kernels import dispatch
    from diffaccel.warn import reset_warnings

    mp.setattr(dispatch, "_interpreting", lambda: False)
    mp.setenv("HF_HUB_OFFLINE", "1")
    reset_warnings()


@pytest.fixture(scope="module")
def flux_run(tmp_path_factory):
    """``diffaccel eval --model tiny-flux --methods dense,gna,agent`` on one thread (as each accelerate process)."""
    out = tmp_path_factory.mktemp("flux")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        as_user(mp)
        torch.set_num_threads(1)
        try:
            main(["eval", *FLUX_ARGS, "--out", str(out)])
        except SystemExit as exc:
            assert exc.code in (0, None), exc.code
        finally:
            torch.set_num_threads(threads)
    return out, json.loads((out / "results.json").read_text())


def test_flux_writes_json_markdown_plots_and_grids(flux_run):
    out, result = flux_run
    assert [a for a in result["aggregates"]] == ["dense", "gna", "agent"]
    assert len(result["samples"]) == 6 and result["completed_samples"] == 2 and result["partial"] is False
    for label in ("gna", "agent"):
        entry = result["aggregates"][label]
        assert entry["n"] == 2
        for key in ("psnr", "ssim", "latent_cosine", "rel_l1"):
            m = entry["metrics"][key]
            assert m["n"] + m["n_inf"] == 2
        assert entry["metrics"]["latent_cosine"]["mean"] > 0.9
        assert entry["speedup_total"]["n"] == 2 and entry["speedup_total"]["mean"] > 0
        assert (out / "grids" / f"{label}_0000_seed0.png").is_file()
    for record in result["samples"]:
        assert (out / record["file"]).is_file() and record["total_s"] > 0 and record["denoise_s"] > 0
        assert record["attention_s"] > 0 and record["denoise_s"] <= record["total_s"]
    assert result["aggregates"]["dense"]["density"]["mean"] == 1.0
    assert result["environment"]["device"].startswith("CPU") and result["environment"]["torch"] == torch.__version__
    md = (out / "report.md").read_text()
    assert "| gna |" in md and "| agent |" in md and "speedup" in md and "PSNR dB" in md
    assert "times measure overheads" in md and "![pareto](plots/pareto.png)" in md
    assert (out / "plots" / "pareto.png").stat().st_size > 5000
    skipped = {s["metric"]: s["reason"] for s in result["skipped"]}
    assert "downloads off" in skipped["CLIP score"]  # a skipped metric appears with its reason
    assert "FID/KID" in skipped and "Skipped:" in md and "CLIP score: no --clip-model" in md
    assert "clip_score" not in result["aggregates"]["gna"]["metrics"]  # never a silent zero


def test_fid_kid_and_identical_dense_outputs_across_runs(flux_run, tmp_path, monkeypatch):
    """A second run (another method set) through ``evaluate`` with an injected feature extractor: the dense
    outputs equal the first run's bit for bit, and FID/KID to dense run through clean-fid."""
    from diffaccel.eval.driver import evaluate
    from diffaccel.eval.runner import EvalOptions, MethodSpec

    _, first = flux_run
    as_user(monkeypatch)
    opts = EvalOptions(model="tiny-flux", methods=[MethodSpec("dense", "dense"), MethodSpec("agent", "agent")],
                       num=2, warmup=0, out=tmp_path, grids=0)
    extractor = lambda batch: batch.float().mean(dim=(2, 3)) / 255.0  # noqa: E731 - clean-fid's contract
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the first run: CPU reductions may round differently on another thread count
    try:
        outcome = evaluate(opts, feature_extractor=extractor)
    finally:
        torch.set_num_threads(threads)
    dense = lambda r: {s["sample"]: s["output_sha256"] for s in r["samples"] if s["label"] == "dense"}  # noqa: E731
    assert dense(outcome.result) == dense(first)
    agent = {s["sample"]: s["output_sha256"] for s in outcome.result["samples"] if s["label"] == "agent"}
    assert agent == {s["sample"]: s["output_sha256"] for s in first["samples"] if s["label"] == "agent"}
    if not importable("cleanfid.fid"):
        assert any(s.metric == "FID/KID" and "clean-fid" in s.reason for s in outcome.skipped)
        return
    d = outcome.result["distribution"]["agent"]["dense"]
    assert d["n1"] == d["n2"] == 2 and d["fid"] >= 0 and d["fid_reliable"] is False
    assert "| agent | dense |" in outcome.paths["markdown"].read_text()


def test_wan_video_dimensions(tmp_path, capsys, monkeypatch):
    as_user(monkeypatch)
    code, out, err = run_cli(capsys, "eval", "--model", "tiny-wan", "--methods", "dense,tile,gna", "--num", "1",
                             "--warmup", "0", "--prompts", "vbench", "--out", str(tmp_path))
    assert code == 0, err
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["run"]["video"] is True and list(result["aggregates"]) == ["dense", "tile", "gna"]
    for label in ("dense", "tile", "gna"):
        m = result["aggregates"][label]["metrics"]
        assert 0 < m["temporal_flickering"]["mean"] <= 1 and 0 < m["motion_smoothness"]["mean"] <= 1
    assert "psnr" in result["aggregates"]["tile"]["metrics"]
    skipped = {s["metric"]: s["reason"] for s in result["skipped"]}
    assert "--dino-model" in skipped["subject consistency"] and "video" in skipped["FID/KID"]
    assert (tmp_path / "report.md").is_file() and (tmp_path / "plots" / "pareto.png").is_file()
    assert "skipped subject consistency" in out


def test_ctrl_c_leaves_a_valid_partial_report(tmp_path, monkeypatch):
    """A pipeline that raises KeyboardInterrupt on its 4th call (sample 2's method): the report covers sample 1."""
    from diffaccel.eval.driver import evaluate
    from diffaccel.eval.runner import EvalOptions, MethodSpec
    from diffaccel.pipelines.loading import load_pipeline

    as_user(monkeypatch)
    pipe = load_pipeline("tiny-flux", dtype=torch.float32, device=torch.device("cpu"))
    calls = []
    base = type(pipe)

    def interrupting(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return base.__call__(self, *args, **kwargs)

    pipe.__class__ = type("Interrupting", (base,), {"__call__": interrupting})
    opts = EvalOptions(model="tiny-flux", methods=[MethodSpec("dense", "dense"), MethodSpec("agent", "agent")],
                       num=3, warmup=0, out=tmp_path)
    outcome = evaluate(opts, pipe=pipe)
    assert outcome.interrupted and len(calls) == 4
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["partial"] is True and result["completed_samples"] == 1 and result["run"]["num_samples"] == 3
    assert [s["label"] for s in result["samples"]] == ["dense", "agent", "dense"]
    assert result["aggregates"]["agent"]["n"] == 1
    assert "Partial report" in (tmp_path / "report.md").read_text()


def test_two_processes_equal_one_process(flux_run, tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` on the CPU (gloo): same report, timings aside."""
    _, one = flux_run
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DIFFACCEL_VERBOSE")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
               CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29617",
           "-m", "diffaccel.cli", "eval", *FLUX_ARGS, "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "results.json").read_text())
    assert two["run"]["num_processes"] == 2 and one["run"]["num_processes"] == 1
    a, b = comparable(one), comparable(two)
    assert a["samples"] == b["samples"]
    assert a == b


# ----------------------------------------------------------------------------------------------- CLI and recipes


def test_eval_help_imports_no_torch():
    code = ("import sys\nfrom diffaccel.cli import main\ntry:\n    main(['eval', '--help'])\nexcept SystemExit:\n"
            "    pass\nprint('TORCH-LOADED', 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="120"))
    assert proc.returncode == 0, proc.stderr
    assert "--reference-dir" in proc.stdout and "--lpips-weights" in proc.stdout
    assert "TORCH-LOADED False" in proc.stdout


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("model: tiny-flux\nmethods: [dense, gna]\nresolution: 512\n", "unknown key 'resolution'"),
        ("model: tiny-flux\nmethods: [dense, nosuch]\n", "unknown method 'nosuch'"),
        ("methods:\n  - gna: {kernel_sise: 5}\n", "kernel_sise"),
        ("methods:\n  - {label: g, method: gna, parms: {}}\n", "unknown key 'parms'"),
        ("- just a list\n", "must be a mapping"),
    ],
)
def test_recipe_errors_are_one_line_and_exit_2(tmp_path, capsys, text, match):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    code, out, err = run_cli(capsys, "eval", "--config", str(recipe), "--out", str(tmp_path / "o"))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0] and str(recipe) in lines[0], err
    assert not (tmp_path / "o").exists()  # nothing ran


def test_cli_errors(tmp_path, capsys):
    for args, match in ((["--set", "gna.kernel_size"], "method.key=value"),
                        (["--set", "tile.kernel_size=3"], "no method labelled 'tile'"),
                        (["--seeds", "0,x"], "--seeds"), (["--prompts", "nosuch"], "neither a built-in"),
                        (["--methods", "dense"], "at least one method besides dense")):
        code, _, err = run_cli(capsys, "eval", "--methods", "dense,gna", *args, "--out", str(tmp_path))
        assert code == 2 and match in err, (args, err)


def test_shipped_recipes_load_and_flags_override(tmp_path):
    from diffaccel.eval.command import build_options
    from diffaccel.eval.recipes import load_recipe

    recipes = sorted((REPO / "configs" / "eval").glob("*.yaml"))
    names = {p.stem for p in recipes}
    assert {"flux-1024", "wan-480p", "sd3", "hunyuan-video", "cogvideox", "tiny-flux", "tiny-wan"} <= names
    for path in recipes:
        recipe = load_recipe(path)
        assert {"model", "methods", "steps", "prompts"} <= set(recipe), path
        assert "#" in path.read_text()  # each cites where its settings come from
    cli = dict(config=REPO / "configs" / "eval" / "tiny-flux.yaml", steps=3, methods=None, set_=["gna.kernel_size=5"],
               seeds="1,2", model=None)
    opts = build_options(cli, ["diffaccel", "eval"])
    assert opts.model == "tiny-flux" and opts.steps == 3 and opts.seeds == [1, 2]
    gna = next(m for m in opts.methods if m.label == "gna")
    assert gna.params["kernel_size"] == 5 and opts.methods[0].label == "dense"
