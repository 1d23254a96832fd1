"""Kernel benchmark: smoke run at tiny shapes (Triton's interpreter on a CPU, compiled Triton on CUDA), block masks,
config checks, CLI, merging (committed results included), output folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffaccel.bench import kernels as bench
from diffaccel.bench.kernels import KernelBenchConfig, merge_results, random_block_mask, run_kernel_bench
from diffaccel.bench.shapes import SHAPES, TINY_SHAPES, get_shape
from diffaccel.errors import ConfigError

CUDA = torch.cuda.is_available()  # the smoke runs use the default device: the compiled kernel where there is one
REPO = Path(__file__).resolve().parents[1]
COMMITTED = sorted((REPO / "benchmarks" / "results").glob("*-kernels*.json"))

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
    if CUDA:
        assert meta["kernel_path"] == "triton" and meta["timer"].startswith("triton.testing.do_bench")
        assert meta["gpu"] and meta["device"].startswith("cuda")
    else:
        assert meta["kernel_path"] == "triton-interpreter"  # conftest sets TRITON_INTERPRET=1 without CUDA
        assert meta["timer"].startswith("time.perf_counter")
    assert doc["config"]["tiny"] and doc["config"]["block_size"] == 16
    info = doc["shapes"]["tiny-image"]
    sdpa_backends = {f"sdpa-{b}" for b in bench.SDPA_BACKENDS}
    assert info["tokens"] == 75 and info["sdpa_best"] in (sdpa_backends if CUDA else {"sdpa-flash", "sdpa-math"})

    rows = {(r["method"], r["density_target"]): r for r in doc["rows"]}
    assert all(ROW_KEYS <= set(r) for r in doc["rows"])
    if not CUDA:
        assert rows[("sdpa-cudnn", 1.0)]["status"] == "unavailable"
    assert all(rows[(m, 1.0)]["status"] in ("ok", "unavailable", "skipped") for m in sdpa_backends)
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
    assert "## tiny-image" in markdown and "| ours-int8 | 0.5 /" in markdown
    assert ("**unavailable**" in markdown) == any(r["status"] == "unavailable" for r in doc["rows"])
    assert CUDA or "**unavailable**" in markdown  # SDPA cudnn and efficient need CUDA
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
        ({"shapes": ("flux-1024",), "device": "cpu"}, "needs a CUDA device"),
        ({"device": "tpu"}, "device must be 'cuda' or 'cpu'"),
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

    bad = runner.invoke(app, ["bench", "kernels", "--shape", "flux-1024", "--device", "cpu", "--out", str(tmp_path)])
    assert isinstance(bad.exception, ConfigError) and "needs a CUDA device" in str(bad.exception)


@pytest.mark.parametrize("path", COMMITTED, ids=[p.name for p in COMMITTED])
def test_committed_results_still_load_render_and_merge(tmp_path, path):
    """The result files in benchmarks/results/ keep working with --merge, the markdown and the plot."""
    previous = json.loads(path.read_text())
    assert previous["kind"] == "kernels" and previous["rows"] and previous["shapes"]
    markdown = bench.render_markdown(previous)
    for name in previous["shapes"]:
        assert f"## {name}:" in markdown
    bench.render_plot(previous, tmp_path / "plot.png")
    with Image.open(tmp_path / "plot.png") as image:
        assert image.format == "PNG"

    # A later run of the same setup that re-measured only the first shape, merged through the file on disk.
    first, *others = list(previous["shapes"])
    current = json.loads(path.read_text())
    current.pop("files")
    current["shapes"] = {first: current["shapes"][first]}
    current["rows"] = [dict(r, ms=(r["ms"] or 1.0) * 2) for r in current["rows"] if r["shape"] == first]
    current["config"] = {**current["config"], "shapes": [first], "densities": [0.5]}
    current["meta"] = {**current["meta"], "command": "diffaccel bench kernels --shape " + first}
    shutil.copy(path, tmp_path / path.name)
    paths = bench.write_outputs(current, tmp_path, plot=False, merge=True)
    assert paths["json"].name == path.name  # same day, device and run kind: the same file, merged
    merged = json.loads(paths["json"].read_text())
    assert list(merged["shapes"]) == [*others, first]
    assert merged["rows"][: -len(current["rows"])] == [r for r in previous["rows"] if r["shape"] != first]
    assert [r["ms"] for r in merged["rows"] if r["shape"] == first] == [r["ms"] for r in current["rows"]]
    assert merged["config"]["densities"] == sorted({*previous["config"]["densities"], 0.5}, reverse=True)
    assert merged["meta"]["merged_commands"] == [previous["meta"]["command"], current["meta"]["command"]]
    # Another device or version refuses to merge, naming what differs.
    with pytest.raises(ConfigError, match="torch"):
        merge_results(previous, {**current, "meta": {**current["meta"], "torch": "0.0"}})


def test_bench_writes_under_out_default_outputs_bench(tmp_path):
    """The real console process: without --out results go to ./outputs/bench of the current folder (never the
    source tree or ./benchmarks/results); with --out, only there."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    if not CUDA:
        env.setdefault("TRITON_INTERPRET", "1")
    results = REPO / "benchmarks" / "results"
    before = sorted(p.name for p in results.iterdir())
    args = ["--tiny", "--shape", "tiny-image", "--density", "1", "--method", "sdpa", "--no-progress", "--no-plot"]
    done = subprocess.run(
        [sys.executable, "-m", "diffaccel.cli", "bench", "kernels", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"]
    written = sorted(p.name for p in (tmp_path / "outputs" / "bench").iterdir())
    assert len(written) == 2 and written[0].endswith("-kernels-tiny.json") and written[1].endswith("-kernels-tiny.md")
    assert f"json: {Path('outputs') / 'bench' / written[0]}" in done.stdout
    assert sorted(p.name for p in results.iterdir()) == before
    out = tmp_path / "elsewhere"
    done = subprocess.run(
        [sys.executable, "-m", "diffaccel.cli", "bench", "kernels", *args, "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(list(out.glob("*-kernels-tiny.json"))) == 1
    assert sorted(p.name for p in (tmp_path / "outputs" / "bench").iterdir()) == written  # nothing new there


def test_default_output_folders():
    from diffaccel.bench.locality import LocalityBenchConfig, build_arg_parser as locality_parser
    from diffaccel.bench.options import DEFAULT_OUT

    assert DEFAULT_OUT == Path("outputs/bench")
    assert KernelBenchConfig().out_dir == LocalityBenchConfig().out_dir == DEFAULT_OUT
    assert bench.build_arg_parser().parse_args([]).out == locality_parser().parse_args([]).out == DEFAULT_OUT


def test_shared_options_reach_both_configurations():
    """One parser builder: the common options parse the same way and land in each benchmark's configuration."""
    from diffaccel.bench import locality

    argv = ["--shape", "tiny-video", "--out", "x/y", "--tiny", "--quick", "--dtype", "float16", "--seed", "3",
            "--error-rows", "7", "--device", "cpu", "--no-flex-compile", "--no-progress"]  # fmt: skip
    k = bench.config_from_args(bench.build_arg_parser().parse_args([*argv, "--density", "0.5", "--merge"]))
    loc = locality.config_from_args(locality.build_arg_parser().parse_args([*argv, "--method", "msw"]))
    for config in (k, loc):
        assert (config.shapes, config.out_dir, config.tiny, config.quick) == (("tiny-video",), Path("x/y"), True, True)
        assert (config.dtype, config.seed, config.error_rows, config.device) == ("float16", 3, 7, "cpu")
        assert config.flex_compile is False and config.progress is False
    assert k.densities == (0.5,) and k.merge and k.methods == bench.METHODS and loc.methods == ("msw",)
    assert locality.config_from_args(locality.build_arg_parser().parse_args([])).methods == locality.LOCALITY_METHODS
    with pytest.raises(SystemExit):
        locality.build_arg_parser().parse_args(["--density", "0.5"])  # kernel-only option


def test_ours_rows_time_the_triton_kernel_not_the_sdpa_shortcut(monkeypatch):
    """At density 1 the public entry would hand the call to SDPA; the 'ours' rows must time our kernel."""
    import diffaccel.kernels as kernels
    from diffaccel.bench.runners import OURS_METHODS, ours_runner
    from diffaccel.kernels import SparseBlockMask

    seen = []
    monkeypatch.setattr(kernels, "block_sparse_attention", lambda *a, **kw: seen.append(kw))
    mask = type("M", (), {"kernel": SparseBlockMask.dense(64, 64, 32)})()
    q = torch.randn(1, 1, 64, 16)
    for method in OURS_METHODS:
        ours_runner(method, mask, 0.25).call(q, q, q)
    assert len(seen) == len(OURS_METHODS) and all(kw.get("dense_fast_path") is False for kw in seen)
