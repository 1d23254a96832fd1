"""load_pipeline: tiny names, folders written by save_pretrained (the Hub code path), and one-line errors."""

from __future__ import annotations

import pytest
import torch

from diffaccel.errors import ConfigError, ModelLoadError
from diffaccel.pipelines.loading import load_pipeline, resolve_device, resolve_dtype
from diffaccel.pipelines.tiny import TINY_PIPELINES, tiny_spec


def run(pipe, name: str) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt="a boat", generator=torch.Generator().manual_seed(5), output_type="pt", **tiny_spec(name).call_kwargs())
    return out.frames if hasattr(out, "frames") else out.images


def public(config) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text
    return text


@pytest.mark.parametrize("name", list(TINY_PIPELINES))
def test_save_pretrained_roundtrip(tmp_path, name):
    original = load_pipeline(name, device="cpu")
    original.save_pretrained(tmp_path)
    loaded = load_pipeline(str(tmp_path), device="cpu")
    assert type(loaded) is type(original)
    for comp, module in original.components.items():
        other = loaded.components[comp]
        if isinstance(module, torch.nn.Module):
            sa, sb = module.state_dict(), other.state_dict()
            assert sa.keys() == sb.keys(), comp
            assert all(torch.equal(sa[k], sb[k]) for k in sa), comp  # weights bit for bit
        elif hasattr(module, "config") and hasattr(module.config, "items"):  # schedulers
            assert public(other.config) == public(module.config), comp
    a, b = run(original, name), run(loaded, name)
    # Same weights and code; loaded weights sit at other memory alignments, which BLAS may round differently.
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_loads_in_the_requested_dtype():
    pipe = load_pipeline("tiny-sd", dtype="bfloat16", device="cpu")
    assert pipe.unet.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16


def test_missing_folder(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(ModelLoadError) as info:
        load_pipeline(str(missing))
    assert "does not exist" in one_line(info.value) and str(missing) in str(info.value)


def test_folder_without_model_index(tmp_path):
    with pytest.raises(ModelLoadError, match="model_index.json") as info:
        load_pipeline(str(tmp_path))
    one_line(info.value)


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "weights.safetensors"
    f.write_bytes(b"not a pipeline")
    with pytest.raises(ModelLoadError, match="is a file") as info:
        load_pipeline(str(f))
    one_line(info.value)


def test_unreachable_hub_id_offline():
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        pytest.skip("HF_HUB_OFFLINE is not set in this process (tests/conftest.py sets it)")
    with pytest.raises(ModelLoadError) as info:
        load_pipeline("diffaccel-test/no-such-model")
    text = one_line(info.value)
    assert "diffaccel-test/no-such-model" in text and "HF_HUB_OFFLINE" in text


def test_invalid_hub_id():
    with pytest.raises(ModelLoadError, match="not a model") as info:
        load_pipeline("not a model")
    one_line(info.value)


def test_unknown_tiny_name_lists_the_tiny_names():
    with pytest.raises(ModelLoadError) as info:
        load_pipeline("tiny-nope")
    assert all(name in one_line(info.value) for name in TINY_PIPELINES)


def test_dtype_and_device_choices():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    assert resolve_device("cpu") == cpu
    with pytest.raises(ConfigError, match="float8"):
        resolve_dtype("float8", cpu)
    with pytest.raises(ConfigError, match="tpu"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda")
        with pytest.raises(ConfigError, match="cpu_offload needs a CUDA device"):
            load_pipeline("tiny-sd", cpu_offload=True)
