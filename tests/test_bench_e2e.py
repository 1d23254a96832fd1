"""``diffaccel bench e2e``: real model configurations, tiny-scale runs of every config and method, the report.

Every registered method (``list_methods()``, so methods added later are included) runs on every model config at
``--scale tiny``; a method that does not apply to a family must be a ``refused`` row with a reason, never an
``error``. Full-size configurations are checked on the ``meta`` device (no memory) against the published parameter
counts and against the attention shapes of BENCHMARKS.md (``diffaccel.bench.shapes``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from diffaccel.bench import e2e as e2e_mod
from diffaccel.bench.e2e import BASELINE, E2EConfig, resolve_methods, run_e2e
from diffaccel.bench.e2e_report import check_document, render_markdown, write_outputs
from diffaccel.bench.model_configs import MODEL_CONFIGS, geometry, model_config
from diffaccel.bench.shapes import SHAPES
from diffaccel.errors import ConfigError
from diffaccel.methods import list_methods

ROOT = Path(__file__).resolve().parents[1]

# published sizes (billions of parameters of the denoiser), +-3%
PUBLISHED_PARAMS = {
    "flux-dev": 11.9, "sd3.5-large": 8.1, "wan21-1.3b": 1.42, "wan21-14b": 14.3, "hunyuan-video": 12.8,
    "cogvideox-5b": 5.57, "ltx-video": 1.92,
}  # fmt: skip

# model config, size -> the BENCHMARKS.md attention shape it must produce
SHAPE_OF = {
    "flux-dev": ("flux-1024", {}),
    "sd3.5-large": ("sd35-1024", {}),
    "cogvideox-5b": ("cogx-720", {}),
    "wan21-1.3b": ("wan13-480", {}),
    "wan21-14b": ("wan14-720", {}),
    "hunyuan-video": ("hyv-720", {}),
}


def _tiny(name: str, **kw) -> dict:
    settings = {"scale": "tiny", "backend": "reference", "rounds": 1, "warmup": 0, "progress": False, **kw}
    return run_e2e(E2EConfig(model_config=name, **settings))


@pytest.fixture(scope="module")
def tiny_docs() -> dict[str, dict]:
    """One tiny run of every model config with every registered method (shared by the tests below)."""
    from diffaccel.warn import reset_warnings

    docs = {}
    for name in MODEL_CONFIGS:
        reset_warnings()
        docs[name] = _tiny(name)
    return docs


@pytest.mark.parametrize("name", list(MODEL_CONFIGS))
def test_every_method_runs_or_refuses(tiny_docs, name):
    doc = tiny_docs[name]
    check_document(doc)
    rows = {r["method"]: r for r in doc["rows"]}
    assert list(rows) == [BASELINE, *list_methods()]
    # denoiser calls per step as the pipelines make them: Wan runs CFG as two calls, the others one (batched CFG or none)
    assert doc["model"]["calls_per_step"] == (2 if name.startswith("wan") else 1)
    assert doc["model"]["batch"] == (2 if name in ("sd3.5-large", "cogvideox-5b", "ltx-video") else 1)
    calls = doc["model"]["attention_modules"] * (2 if name.startswith("wan") else 1)
    for method, row in rows.items():
        assert row["status"] in ("ok", "refused"), (method, row["status"], row["reason"])
        if row["status"] == "refused":
            assert row["reason"] and row["step_ms"] is None
            continue
        assert len(row["step_ms_all"]) == 1 and row["step_ms"] > 0
        assert row["attention_calls"] == calls, method  # every attention module of every denoiser call was timed
        assert 0 < row["attention_ms"] <= row["breakdown_step_ms"]
        assert row["rest_ms"] == pytest.approx(row["breakdown_step_ms"] - row["attention_ms"])
        if method == BASELINE:
            assert row["method_ms"] is None and row["speedup"] == 1.0
        else:
            assert 0 < row["method_ms"] <= row["attention_ms"]
            assert row["speedup"] == pytest.approx(rows[BASELINE]["step_ms"] / row["step_ms"])
    assert rows["dense"]["status"] == "ok"  # the dense method applies to every family
    assert rows["softpag"]["status"] == "refused" and "guidance" in rows["softpag"]["reason"]


def test_image_models_refuse_video_only_methods(tiny_docs):
    for name in ("flux-dev", "sd3.5-large"):
        tile = next(r for r in tiny_docs[name]["rows"] if r["method"] == "tile")
        assert tile["status"] == "refused" and "video grid" in tile["reason"]
    for name in ("wan21-1.3b", "hunyuan-video", "cogvideox-5b", "ltx-video"):
        assert next(r for r in tiny_docs[name]["rows"] if r["method"] == "tile")["status"] == "ok"


def test_write_outputs_and_markdown(tiny_docs, tmp_path):
    doc = tiny_docs["wan21-1.3b"]
    paths = write_outputs(doc, tmp_path)
    assert {p.suffix for p in paths.values()} == {".json", ".md", ".png"}
    assert paths["json"].name.endswith("-e2e-wan21-1.3b-tiny.json")
    saved = json.loads(paths["json"].read_text())
    check_document(saved)
    assert saved["model"]["geometry"]["grid"] == [3, 8, 8]
    for key in ("date", "command", "torch", "triton", "diffusers", "device", "timer"):
        assert key in saved["meta"]
    assert "wall clock" in saved["meta"]["timer"]
    md = paths["markdown"].read_text()
    assert "CPU run" in md and "| stock |" in md and "**refused**" in md
    assert paths["plot"].stat().st_size > 1000


def test_check_document_rejects_broken_documents(tiny_docs):
    doc = json.loads(json.dumps(tiny_docs["flux-dev"]))
    check_document(doc)
    broken = json.loads(json.dumps(doc))
    del broken["rows"][1]["attention_ms"]
    with pytest.raises(ConfigError, match="attention_ms"):
        check_document(broken)
    broken = json.loads(json.dumps(doc))
    broken["rows"] = broken["rows"][1:]
    with pytest.raises(ConfigError, match="stock"):
        check_document(broken)
    broken = json.loads(json.dumps(doc))
    refused = next(r for r in broken["rows"] if r["status"] == "refused")
    refused["reason"] = ""
    with pytest.raises(ConfigError, match="without a reason"):
        check_document(broken)


@pytest.mark.parametrize("name", list(MODEL_CONFIGS))
def test_full_configs_match_published_sizes(name):
    import diffusers

    mc = MODEL_CONFIGS[name]
    with torch.device("meta"):
        model = getattr(diffusers, mc.model_class)(**mc.config)
    params = sum(p.numel() for p in model.parameters()) / 1e9
    assert params == pytest.approx(PUBLISHED_PARAMS[name], rel=0.03)


@pytest.mark.parametrize("name", list(SHAPE_OF))
def test_full_geometry_matches_benchmark_shapes(name):
    mc = model_config(name)
    shape = SHAPES[SHAPE_OF[name][0]]
    geo = geometry(mc)
    assert tuple(geo.grid) == tuple(shape.grid)
    # Wan's prompt goes to cross-attention only: its self-attention shape has no text tokens
    assert (0 if mc.family == "wan" else geo.text_len) == shape.text_tokens
    assert mc.config["num_attention_heads"] == shape.heads
    assert mc.config["attention_head_dim"] == shape.head_dim


def test_geometry_checks_sizes():
    wan = model_config("wan21-1.3b")
    assert geometry(wan, height=480, width=832, frames=81).latent == (21, 60, 104)
    with pytest.raises(ConfigError, match=r"--frames 80 .*4k\+1"):
        geometry(wan, frames=80)
    with pytest.raises(ConfigError, match="--height 500 .*multiple of 16"):
        geometry(wan, height=500)
    with pytest.raises(ConfigError, match="--frames 5 .*image model"):
        geometry(model_config("flux-dev"), frames=5)
    with pytest.raises(ConfigError, match="--width 100 .*multiple of 32"):
        geometry(model_config("ltx-video"), width=100)
    ltx = geometry(model_config("ltx-video"))
    assert ltx.latent == (21, 15, 22) and ltx.grid == (21, 15, 22)
    with pytest.raises(ConfigError, match="--model-config 'nope'.*flux-dev"):
        model_config("nope")
    with pytest.raises(ConfigError, match="--scale"):
        geometry(wan, scale="huge")


def test_resolve_methods_and_bad_options():
    assert resolve_methods(None) == [BASELINE, *list_methods()]
    assert resolve_methods(["gna", "stock", "gna"]) == [BASELINE, "gna"]
    with pytest.raises(ConfigError, match="--methods: unknown method.*'nope'"):
        resolve_methods(["nope"])
    with pytest.raises(ConfigError, match="--steps-timed must be >= 1"):
        run_e2e(E2EConfig(scale="tiny", rounds=0))
    with pytest.raises(ConfigError, match="--set names method"):
        run_e2e(E2EConfig(scale="tiny", methods=("dense",), method_params={"gna": {"stride": 2}}))
    with pytest.raises(ConfigError, match="--step must be in"):
        _tiny("flux-dev", methods=("dense",), step=99)


def test_method_parameters_step_and_bad_values_are_recorded():
    doc = _tiny(
        "wan21-1.3b", methods=("gna", "msw"), method_params={"gna": {"dense_steps": 3}, "msw": {"shift_policy": "x"}},
        step=2, num_steps=10,
    )  # fmt: skip
    rows = {r["method"]: r for r in doc["rows"]}
    assert rows["gna"]["params"] == {"dense_steps": 3, "backend": "reference"}
    assert rows["msw"]["status"] == "refused" and "shift_policy" in rows["msw"]["reason"]
    assert doc["config"]["step"] == 2 and doc["config"]["num_steps"] == 10


def test_methods_see_the_chosen_step(monkeypatch):
    seen = []
    from diffaccel.methods.dense import DenseMethod

    original = DenseMethod.__call__

    def spy(self, q, k, v, layout, ctx, **kw):
        seen.append((ctx.step, ctx.num_steps))
        return original(self, q, k, v, layout, ctx, **kw)

    monkeypatch.setattr(DenseMethod, "__call__", spy)
    _tiny("sd3.5-large", methods=("dense",), step=7, num_steps=20)
    assert seen and set(seen) == {(7, 20)}


def test_density_from_kept_blocks(monkeypatch):
    from diffaccel.methods.gna import GNAMethod

    masks = {}

    def kept_blocks(self, layer):
        if layer not in masks:
            mask = torch.zeros(1, 4, 4, dtype=torch.bool)
            mask[..., : 1 + len(masks) % 4] = True  # 1/4, 2/4, ... of the key blocks
            masks[layer] = mask
        return masks[layer]

    monkeypatch.setattr(GNAMethod, "kept_blocks", kept_blocks, raising=False)
    doc = _tiny("hunyuan-video", methods=("gna", "dense"))
    rows = {r["method"]: r for r in doc["rows"]}
    expected = sum(float(m.float().mean()) for m in masks.values()) / len(masks)
    assert rows["gna"]["density_layers"] == doc["model"]["attention_modules"] == len(masks)
    assert rows["gna"]["density_kept"] == pytest.approx(expected)
    assert rows["dense"]["density_kept"] is None  # reports no block mask
    assert "0.625" in render_markdown(doc) or f"{expected:.3f}" in render_markdown(doc)


def test_errors_and_warnings_become_row_fields(monkeypatch):
    from diffaccel.methods.dense import DenseMethod
    from diffaccel.warn import warn_once

    def broken(self, *a, **kw):
        warn_once("e2e-test", "diffaccel: a fallback for the test")
        raise RuntimeError("kernel exploded\nsecond line")

    monkeypatch.setattr(DenseMethod, "__call__", broken)
    doc = _tiny("flux-dev", methods=("dense", "gna"))
    rows = {r["method"]: r for r in doc["rows"]}
    assert rows["dense"]["status"] == "error" and rows["dense"]["reason"] == "RuntimeError: kernel exploded"
    assert rows["dense"]["warnings"] == ["diffaccel: a fallback for the test"]
    assert rows["gna"]["status"] == "ok" and rows[BASELINE]["status"] == "ok"  # the run went on


def test_alternation_rotates_the_order(monkeypatch):
    order = []
    original = e2e_mod._Bench.install

    def install(self, entry):
        order.append(entry.name)
        return original(self, entry)

    monkeypatch.setattr(e2e_mod._Bench, "install", install)
    doc = run_e2e(E2EConfig(model_config="sd3.5-large", scale="tiny", backend="reference", methods=("dense", "gna"),
                            rounds=3, warmup=1, progress=False))  # fmt: skip
    timed = order[3:12]  # after one warm-up each, three rounds of three
    assert timed == ["stock", "dense", "gna", "dense", "gna", "stock", "gna", "stock", "dense"]
    assert all(len(r["step_ms_all"]) == 3 for r in doc["rows"])
    base = doc["rows"][0]
    for row in doc["rows"][1:]:
        ratios = [b / t for b, t in zip(base["step_ms_all"], row["step_ms_all"], strict=True)]
        assert row["speedup_min"] == pytest.approx(min(ratios)) and row["speedup_max"] == pytest.approx(max(ratios))


def test_cli_errors_are_one_line(capsys):
    """The real CLI run in a subprocess is the campaign dry run's e2e stages (tests/test_gpu_campaign.py)."""
    from diffaccel.cli import main

    for argv, expected in (
        (["--model-config", "nope"], "error: --model-config 'nope' is not known"),
        (["--scale", "huge"], "error: --scale must be one of full, tiny"),
        (["--scale", "tiny", "--set", "gna"], "error: --set 'gna': use METHOD.KEY=VALUE"),
        (["--scale", "tiny", "--methods", "dense,nope"], "error: --methods: unknown method(s) 'nope'"),
    ):
        with pytest.raises(SystemExit) as done:
            main(["bench", "e2e", *argv])
        assert done.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith(expected), argv


def test_sigterm_reports_the_rounds_measured_so_far(monkeypatch):
    """The campaign's stage timeout sends SIGTERM: the finished rounds are still reported, the rest is marked."""
    import signal

    calls = []
    original = e2e_mod._Bench.step

    def step(self):
        calls.append(1)
        if len(calls) == 5:  # rounds of 2 rows, no warm-up: the first row of the third round
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self)

    monkeypatch.setattr(e2e_mod._Bench, "step", step)
    doc = _tiny("sd3.5-large", methods=("dense",), rounds=4)
    check_document(doc)
    assert "SIGTERM" in doc["meta"]["interrupted"]
    rows = {r["method"]: r for r in doc["rows"]}
    assert [len(r["step_ms_all"]) for r in doc["rows"]] == [2, 2]  # the interrupted step is not counted
    assert rows["dense"]["speedup"] is not None and rows["dense"]["attention_ms"] is None  # no breakdown step ran
    assert signal.getsignal(signal.SIGTERM) is not None and len(calls) == 5


def test_sigterm_before_any_round_marks_rows_interrupted(monkeypatch):
    import signal

    def step(self):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(e2e_mod._Bench, "step", step)
    doc = _tiny("flux-dev", methods=("dense", "tile"))
    check_document(doc)
    statuses = {r["method"]: r["status"] for r in doc["rows"]}
    # tile would refuse flux at its first call, which never came
    assert statuses == {"stock": "interrupted", "dense": "interrupted", "tile": "interrupted"}
    assert all("SIGTERM" in r["reason"] for r in doc["rows"])
