"""`diffaccel generate` with sparse methods on the tiny pipelines of the recent families (the dense run on every
tiny pipeline is tests/test_cli.py's; every method on every family's transformer is tests/test_adapters_families.py's).
PARO runs here because it calibrates its plan on the pipeline's own prompt first."""

from __future__ import annotations

import re

import pytest

from diffaccel.cli import main


def cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


@pytest.mark.parametrize("model,method,options", [
    ("tiny-z-image", "paro", ["--set", "backend=reference"]),
    ("tiny-flux2", "gna", ["--set", "backend=reference", "--set", "kernel_size=[3,3]"]),
])
def test_generate_runs_a_sparse_method(capsys, tmp_path, model, method, options):
    code, out, err = cli(capsys, "generate", "--method", method, "--model", model, "--out", str(tmp_path),
                         "--warmup", "0", "--repeats", "1", *options)
    assert code == 0, err
    assert "PSNR" in out and "speedup" in out
    psnr = re.search(r"PSNR[^0-9inf]*([0-9.]+|inf)", out)
    assert psnr is not None
    assert (tmp_path / f"{model}_{method}_vs_dense.png").exists()


def test_models_lists_the_new_tiny_pipelines(capsys):
    code, out, _ = cli(capsys, "models")
    assert code == 0
    for name, cls in (("tiny-flux2", "Flux2KleinPipeline"), ("tiny-qwen-image", "QwenImagePipeline"),
                      ("tiny-z-image", "ZImagePipeline"), ("tiny-hunyuan-video15", "HunyuanVideo15Pipeline")):
        assert name in out and cls in out
