"""Locality benchmark: smoke run at tiny shapes (Triton's interpreter on a CPU, compiled Triton on CUDA), Flex masks,
failures as rows, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from diffaccel.bench import locality as bench
from diffaccel.bench.locality import LocalityBenchConfig, run_locality_bench
from diffaccel.bench.shapes import get_shape
from diffaccel.errors import ConfigError
from diffaccel.kernels.masks import TextSpec, TileMask
from diffaccel.sparse.per_frame import per_frame_circle_mask_mod

CUDA = torch.cuda.is_available()  # the smoke runs use the default device: the compiled kernel where there is one
SDPA = {"sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math"}

ROW_KEYS = {
    "shape", "method", "for_method", "params", "plan", "density_kept", "density_blocks", "status", "reason",
    "detail", "ms", "tflops_dense_equiv", "tflops_kept", "rel_l2_vs_dense_fp32", "rel_l2_vs_masked_fp32",
    "speedup", "notes",
}  # fmt: skip


def _dense(mask_mod, n: int) -> torch.Tensor:
    idx = torch.arange(n)
    zero = torch.zeros((), dtype=torch.long)
    return mask_mod(zero, zero, idx[:, None], idx[None, :])


def test_cpu_smoke_run_on_a_video_grid(tmp_path):
    # GNA runs in test_cli_command on the image grid (row-major GNA on this grid is slow under the interpreter).
    config = LocalityBenchConfig(shapes=("tiny-video",), methods=("tile", "clear", "msw"), quick=True, out_dir=tmp_path,
                                 progress=False)  # fmt: skip
    result = run_locality_bench(config)
    files = {k: tmp_path / v.split("/")[-1] for k, v in result["files"].items()}
    assert set(files) == {"json", "markdown"} and files["json"].name.endswith("-cpu-locality-tiny.json")
    doc = json.loads(files["json"].read_text())
    assert doc["kind"] == "locality"
    for key in ("date", "command", "torch", "triton", "cuda", "driver", "gpu", "timer", "kernel_path", "flex",
                "flex_same_mask"):  # fmt: skip
        assert key in doc["meta"]
    assert doc["meta"]["kernel_path"] == ("triton" if CUDA else "triton-interpreter")
    assert doc["config"]["tiny"] and doc["config"]["methods"] == ["tile", "clear", "msw"]
    info = doc["shapes"]["tiny-video"]
    assert info["tokens"] == 105 and info["sdpa_best"] in (SDPA if CUDA else {"sdpa-flash", "sdpa-math"})

    assert all(ROW_KEYS <= set(r) for r in doc["rows"])
    rows = {(r["method"], r["for_method"]): r for r in doc["rows"]}
    if not CUDA:
        assert rows[("sdpa-cudnn", None)]["status"] == "unavailable"
    assert all(rows[(m, None)]["status"] in ("ok", "unavailable", "skipped") for m in SDPA)
    for name in ("tile", "clear", "msw"):
        own, flex = rows[(name, name)], rows[("flex", name)]
        for row in (own, flex):
            assert row["status"] == "ok", row
            assert row["ms"] > 0 and 0.0 < row["density_kept"] < 1.0 and 0.0 < row["density_blocks"] <= 1.0
            # Same element mask as the float32 reference (permutations undone), and far from dense attention.
            assert row["rel_l2_vs_masked_fp32"] < 1e-2, row
            assert row["rel_l2_vs_dense_fp32"] > 0.1, row
            assert row["tflops_kept"] < row["tflops_dense_equiv"]
        assert own["density_kept"] == flex["density_kept"] and own["plan"] == flex["plan"]
        assert set(own["speedup"]) == {"sdpa", "flex"} and set(flex["speedup"]) == {"sdpa"}
        assert own["speedup"]["flex"] == pytest.approx(flex["ms"] / own["ms"])
        assert flex["flex_mode"] and "order" in flex["flex_mode"]
    assert rows[("tile", "tile")]["params"]["global_frames"] == [0]  # round(3 / 4) = 1 global frame
    assert rows[("clear", "clear")]["plan"].endswith("(per frame)")
    assert "per-frame circle mask_mod" in rows[("flex", "clear")]["flex_mode"]
    assert rows[("clear", "clear")]["notes"] == ["training-free (no distilled CLEAR weights): speed and mask error only"]

    markdown = files["markdown"].read_text()
    assert "## tiny-video" in markdown and "| flex (msw) |" in markdown and "| tile |" in markdown


def test_image_grid_skips_tile_and_a_failing_method_is_a_row(tmp_path, monkeypatch):
    def broken(name, setup, scale, warned):
        raise RuntimeError("kernel exploded\nsecond line")

    monkeypatch.setattr(bench, "_method_runner", broken)
    result = run_locality_bench(
        LocalityBenchConfig(shapes=("tiny-image",), methods=("tile", "msw"), quick=True, out_dir=tmp_path,
                            progress=False, write=False)
    )  # fmt: skip
    assert "files" not in result
    rows = {(r["method"], r["for_method"]): r for r in result["rows"]}
    assert rows[("tile", "tile")]["status"] == "skipped" and "video grid" in rows[("tile", "tile")]["reason"]
    assert rows[("flex", "tile")]["status"] == "skipped"
    assert rows[("msw", "msw")]["status"] == "error"
    assert rows[("msw", "msw")]["reason"] == "RuntimeError: kernel exploded"
    # Flex still ran MSW's window-major order (the permutation and its block mask) and matches the masked reference.
    flex = rows[("flex", "msw")]
    assert flex["status"] == "ok" and flex["plan"] == "window-major" and flex["rel_l2_vs_masked_fp32"] < 1e-2
    assert "kernel order" in flex["flex_mode"] and result["shapes"]["tiny-image"]["text_position"] == "prefix"


def test_flex_mask_mods_match_the_definitions():
    # CLEAR per frame with a text suffix: same frame, squared distance in (row, col) below radius**2, text dense.
    grid, radius, nt = (3, 4, 5), 2.0, 6
    mod = per_frame_circle_mask_mod(grid, radius, TextSpec(nt, "suffix"))  # the sparse layer's, which the bench uses
    f, r, c = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
    f, r, c = f.flatten(), r.flatten(), c.flatten()
    vis = (f[:, None] == f[None, :]) & ((r[:, None] - r[None, :]) ** 2 + (c[:, None] - c[None, :]) ** 2 < radius**2)
    expected = torch.ones(60 + nt, 60 + nt, dtype=torch.bool)
    expected[:60, :60] = vis
    assert torch.equal(_dense(mod, 60 + nt), expected)
    # The benchmark takes the element mask from the method's plan: the tile plan's mask_mod is the spec's (which
    # traces under torch.compile, tests/test_kernels_masks.py), no re-implementation.
    setup = bench.method_setup("tile", get_shape("tiny-video"), "cpu")
    assert setup.mask_mod is setup.plan.spec.mask_mod and isinstance(setup.plan.spec, TileMask)


def test_count_mask_counts_pairs_and_blocks():
    spec = TileMask((4, 2, 3), (1,), text=TextSpec(5, "prefix"))
    dense = _dense(spec.mask_mod, 29)
    kept, counts = bench.count_mask(spec.mask_mod, 29, 16, "cpu")
    assert kept == int(dense.sum())
    padded = torch.zeros(32, 32, dtype=torch.long)
    padded[:29, :29] = dense
    assert torch.equal(counts, padded.view(2, 16, 2, 16).sum(dim=(1, 3)))


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"methods": ("gna", "natten")}, "methods must be a non-empty subset"),
        ({"methods": ()}, "methods must be a non-empty subset"),
        ({"shapes": ("wan13-480",), "device": "cpu"}, "needs a CUDA device"),
        ({"shapes": ("nope",)}, "shape must be one of"),
        ({"error_rows": 0}, "error_rows must be >= 1"),
    ],
)
def test_config_errors_name_the_value(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        LocalityBenchConfig(**kwargs).resolved()


def test_cli_command(tmp_path):
    from typer.testing import CliRunner

    from diffaccel.cli import app

    runner = CliRunner()
    args = ["bench", "locality", "--tiny", "--shape", "tiny-image", "--method", "gna", "msw", "--out", str(tmp_path),
            "--no-progress"]  # fmt: skip
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    assert "tiny-image (best SDPA" in done.output and "gna ok" in done.output and "msw ok" in done.output
    (path,) = tmp_path.glob("*-locality-tiny.json")
    doc = json.loads(path.read_text())
    assert doc["meta"]["command"].startswith("diffaccel bench locality --tiny")
    rows = {(r["method"], r["for_method"]): r for r in doc["rows"]}
    gna, flex = rows[("gna", "gna")], rows[("flex", "gna")]
    assert gna["params"]["preset"] == "image" and gna["params"]["kernel_size"] == [2, 2]
    assert gna["status"] == flex["status"] == "ok" and gna["rel_l2_vs_masked_fp32"] < 1e-2
    assert flex["rel_l2_vs_masked_fp32"] < 1e-2 and set(gna["speedup"]) == {"sdpa", "flex"}
    assert doc["shapes"]["tiny-image"]["text_position"] == "prefix" and get_shape("tiny-image").text_tokens == 11
    bad = runner.invoke(app, ["bench", "locality", "--shape", "flux-1024", "--device", "cpu", "--out", str(tmp_path)])
    assert isinstance(bad.exception, ConfigError) and "needs a CUDA device" in str(bad.exception)
