"""Kernel benchmark: CPU smoke run at tiny shapes (Triton interpreter), block masks, config checks, CLI, merging."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from diffaccel.bench import kernels as bench
from diffaccel.bench.kernels import KernelBenchConfig, random_block_mask, run_kernel_bench
from diffaccel.bench.shapes import SHAPES, TINY_SHAPES, get_shape
from diffaccel.errors import ConfigError

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU smoke test (a GPU runs the real benchmark)")

ROW_KEYS = {
    "shape", "method", "density_target", "density_blocks", "density_kept", "status", "reason", "detail", "ms",
    "tflops_dense_equiv", "tflops_kept", "rel_l2_vs_dense_fp32", "rel_l2_vs_masked_fp32", "speedup",
}  # fmt: skip


def test_shapes_table_matches_the_protocol():
    assert list(SHAPES) == ["flux-1024", "sd35-1024", "cogx-720", "wan13-480", "wan14-720", "hyv-720"]
    assert [SHAPES[n].tokens for n in SHAPES] == [4608, 4429, 17776, 32760, 75600, 119056]
    assert (SHAPES["hyv-720"].heads, SHAPES["hyv-720"].head_dim, SHAPES["sd35-1024"].heads) == (24, 128, 38)
    assert all(s.tiny for s in TINY_SHAPES.values())
    assert get_shape("wan13-480").dense_flops == 4 * 12 * 32760**2 * 128
    with pytest.raises(ValueError, match="shape must be one of"):
        get_shape("flux-2048")


def test_cpu_smoke_run_writes_json_markdown_and_plot(tmp_path):
    config = KernelBenchConfig(
        shapes=("tiny-image",),
        densities=(1.0, 0.5),
        methods=("sdpa", "flex", "xformers", "ours-bf16", "ours-int8"),
        quick=True,
        out_dir=tmp_path,
        progress=False,
    )
    result = run_kernel_bench(config)
    files = {k: tmp_path / v.split("/")[-1] for k, v in result["files"].items()}
    assert set(files) == {"json", "markdown", "plot"}
    assert files["json"].name.endswith("-cpu-kernels-tiny.json")

    doc = json.loads(files["json"].read_text())
    meta = doc["meta"]
    for key in ("date", "command", "torch", "triton", "cuda", "driver", "gpu", "timer", "kernel_path", "flex"):
        assert key in meta
    assert meta["kernel_path"] == "triton-interpreter"  # conftest sets TRITON_INTERPRET=1 without CUDA
    assert meta["timer"].startswith("time.perf_counter")
    assert doc["config"]["tiny"] and doc["config"]["block_size"] == 16
    info = doc["shapes"]["tiny-image"]
    assert info["tokens"] == 75 and info["sdpa_best"] in ("sdpa-flash", "sdpa-math")

    rows = {(r["method"], r["density_target"]): r for r in doc["rows"]}
    assert all(ROW_KEYS <= set(r) for r in doc["rows"])
    assert rows[("sdpa-cudnn", 1.0)]["status"] == "unavailable"
    assert rows[("xformers", 1.0)]["status"] in ("unavailable", "ok") and rows[("xformers", 1.0)]["reason"] != ""
    for method in ("flex", "ours-bf16", "ours-int8"):
        for density in (1.0, 0.5):
            row = rows[(method, density)]
            assert row["status"] == "ok", row
            assert row["ms"] > 0 and row["tflops_kept"] <= row["tflops_dense_equiv"] * (1 + 1e-9)
            # Same mask in FlexAttention and our kernel: both close to the float32 masked reference ...
            assert row["rel_l2_vs_masked_fp32"] < (3e-2 if method == "ours-int8" else 1e-2), row
            assert set(row["speedup"]) >= ({"sdpa", "flex"} if method.startswith("ours") else {"sdpa"})
    # ... and that mask really is sparse: far from dense attention, and the density kept is below 1.
    sparse = rows[("ours-bf16", 0.5)]
    assert sparse["rel_l2_vs_dense_fp32"] > 0.1 and 0.2 < sparse["density_kept"] < 0.7
    assert rows[("ours-bf16", 1.0)]["rel_l2_vs_dense_fp32"] < 1e-2
    assert "ours-bf16" in rows[("ours-int8", 0.5)]["speedup"]

    markdown = files["markdown"].read_text()
    assert "## tiny-image" in markdown and "| ours-int8 | 0.5 /" in markdown and "**unavailable**" in markdown
    with Image.open(files["plot"]) as image:
        assert image.format == "PNG" and image.size[0] > 100


def test_random_block_mask_keeps_diagonal_and_density():
    gen = torch.Generator().manual_seed(0)
    mask = random_block_mask(2, 3, 70, 70, 16, 0.4, generator=gen, device="cpu")
    blocks = mask.blocks  # (2, 3, 5, 5)
    assert blocks.shape == (2, 3, 5, 5)
    assert blocks.diagonal(dim1=-2, dim2=-1).all()
    assert (blocks.sum(-1) == 2).all() and mask.density_blocks == pytest.approx(0.4)
    # The torch BlockMask and our SparseBlockMask describe exactly these tiles (all full: no element mask).
    assert torch.equal(mask.flex.to_dense().bool(), blocks)
    full, partial = mask.kernel.block_keep()
    assert torch.equal(full, blocks) and not partial.any()
    # Kept (query, key) pairs count the ragged tail exactly: 70 = 4 * 16 + 6.
    from diffaccel.kernels import materialize_mask

    assert mask.kept_pairs == float(materialize_mask(mask.kernel).sum())
    # The mask_mod says the same element-wise (FlexAttention's eager path reads only the mask_mod).
    b, h, qi, ki = 1, 2, 33, 69
    assert bool(mask.flex.mask_mod(torch.tensor(b), torch.tensor(h), torch.tensor(qi), torch.tensor(ki))) == bool(
        blocks[b, h, qi // 16, ki // 16]
    )


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"shapes": ("flux-1024",)}, "needs a CUDA device"),
        ({"shapes": ("nope",)}, "shape must be one of"),
        ({"densities": (0.0,)}, r"density must be in \(0, 1\]"),
        ({"densities": (1.5,)}, r"density must be in \(0, 1\]"),
        ({"methods": ("sdpa", "flash3")}, "methods must be a non-empty subset"),
        ({"block_size": 24}, "block_size must be a power of two"),
        ({"error_rows": 0}, "error_rows must be >= 1"),
        ({"dtype": "float32"}, "dtype must be"),
    ],
)
def test_config_errors_name_the_value(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        KernelBenchConfig(**kwargs).resolved()


def test_failing_method_becomes_a_row_not_a_crash(tmp_path, monkeypatch):
    def broken(method, mask, scale):
        raise RuntimeError("kernel exploded\nsecond line")

    monkeypatch.setattr(bench, "ours_runner", broken)
    result = run_kernel_bench(
        KernelBenchConfig(
            shapes=("tiny-video",), densities=(0.5,), methods=("sdpa", "ours-bf16", "sage"), out_dir=tmp_path,
            quick=True, progress=False, plot=False,
        )
    )  # fmt: skip
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["ours-bf16"]["status"] == "error"
    assert rows["ours-bf16"]["reason"] == "RuntimeError: kernel exploded"
    assert rows["sdpa-math"]["status"] == "ok"
    assert rows["sage"]["status"] in ("unavailable", "ok")
    assert "plot" not in result["files"]


def test_cli_command_and_merge(tmp_path):
    from typer.testing import CliRunner

    from diffaccel.cli import app  # `diffaccel bench` is diffaccel.bench.cli.bench_app, mounted there

    runner = CliRunner()
    common = ["--tiny", "--density", "1", "--method", "sdpa", "--out", str(tmp_path), "--no-progress", "--no-plot"]
    first = runner.invoke(app, ["bench", "kernels", "--shape", "tiny-video", *common])
    assert first.exit_code == 0, first.output
    second = runner.invoke(app, ["bench", "kernels", "--shape", "tiny-image", "tiny-batch2", "--merge", *common])
    assert second.exit_code == 0, second.output
    (path,) = tmp_path.glob("*-kernels-tiny.json")
    doc = json.loads(path.read_text())
    assert list(doc["shapes"]) == ["tiny-video", "tiny-image", "tiny-batch2"]
    assert {r["shape"] for r in doc["rows"]} == {"tiny-video", "tiny-image", "tiny-batch2"}
    assert doc["shapes"]["tiny-video"]["run"]["command"].endswith("--no-plot")
    assert len(doc["meta"]["merged_commands"]) == 2
    assert "tiny-batch2" in (tmp_path / path.name.replace(".json", ".md")).read_text()

    bad = runner.invoke(app, ["bench", "kernels", "--shape", "flux-1024", "--out", str(tmp_path)])
    assert isinstance(bad.exception, ConfigError) and "needs a CUDA device" in str(bad.exception)
