"""The locality methods (gna, tile, clear, msw) as diffaccel methods: configs, presets, layer selection, schedules,
end to end on tiny diffusers models through diffaccel.apply, CLEAR's distilled weights, the CLI.

End-to-end runs compare each method against a brute-force method that builds the mask of the same definition with
Python loops over grid coordinates (from the layout the adapter reports) and runs a float64 masked softmax; both run
inside the same tiny model, so the comparison covers adapters, text placement, token permutation and block masks.
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel
from adapter_fields import AdapterFields
from image_models import flux_inputs, max_abs_diff, run, sd3_inputs, tiny_flux, tiny_sd3, tiny_unet, unet_inputs

import diffaccel
from diffaccel.context import RunContext
from diffaccel.errors import ConfigError, DiffAccelError, ModelLoadError
from diffaccel.layout import TokenLayout
from diffaccel.methods.base import get_method, sdpa
from diffaccel.methods.gna import GNAConfig
from diffaccel.methods.msw import shift_index
from diffaccel.methods.tile import TileConfig
from diffaccel.pipelines.processor import DiffAccelAttnProcessor
from diffaccel.pipelines.named_processors import (
    ClearAttnProcessor,
    GNAAttnProcessor,
    MSWAttnProcessor,
    TileAttnProcessor,
)
from diffaccel.warn import DiffAccelWarning

FAST = dict(block_size=16, backend="reference")

# ----------------------------------------------------------------------------------------------- brute force


def coords(grid):
    return list(itertools.product(*[range(n) for n in grid]))


from natten_rules import natten_axis  # noqa: E402  (the one hand-written NATTEN definition of the tests)


@functools.lru_cache(maxsize=None)
def neighborhood(grid, ks, st, dl=None):
    dl = dl or (1,) * len(grid)
    allowed = [[natten_axis(n, k, s, d, False, x) for x in range(n)] for n, k, s, d in zip(grid, ks, st, dl)]
    pts = coords(grid)
    return torch.tensor([[all(r[a] in allowed[a][p[a]] for a in range(len(grid))) for r in pts] for p in pts])


@functools.lru_cache(maxsize=None)
def circle(grid, radius, per_frame=False):
    pts = coords(grid)
    if per_frame:
        return torch.tensor([[p[0] == r[0] and (p[1] - r[1]) ** 2 + (p[2] - r[2]) ** 2 < radius**2 for r in pts]
                             for p in pts])
    return torch.tensor([[sum((a - b) ** 2 for a, b in zip(p, r)) < radius**2 for r in pts] for p in pts])


@functools.lru_cache(maxsize=None)
def tiles(grid, frames):
    pts = coords(grid)
    return torch.tensor([[p[0] == r[0] or p[0] in frames or r[0] in frames for r in pts] for p in pts])


@functools.lru_cache(maxsize=None)
def windows(grid, window, shift):
    def win(p):
        return tuple(((x - s) % n) // w for x, n, w, s in zip(p, grid, window, shift))

    pts = coords(grid)
    return torch.tensor([[win(p) == win(r) for r in pts] for p in pts])


class BruteForce:
    """A method (instance protocol) that attends under ``visual(layout, ctx)`` with dense text rows and columns."""

    name = "brute-force"

    def __init__(self, visual):
        self.visual = visual
        self.config = SimpleNamespace()
        self.calls = 0
        self.masked_calls = 0

    def __call__(self, q, k, v, layout: TokenLayout, ctx: RunContext, *, attn_mask=None, scale=None):
        vis = None if layout.is_cross or not layout.has_grid else self.visual(layout, ctx)
        if vis is None:
            return sdpa(q, k, v, attn_mask=attn_mask, scale=scale)
        self.calls += 1
        nv, nt = layout.num_visual, layout.num_text
        keep = torch.ones(nv + nt, nv + nt, dtype=torch.bool)
        sl = layout.visual
        keep[sl, sl] = vis
        if attn_mask is not None:  # HunyuanVideo's prompt padding: a boolean key mask
            self.masked_calls += 1
            keep = keep & attn_mask.bool()
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        s = (q.double() @ k.double().transpose(-1, -2)) * scale
        s = s.masked_fill(~keep, float("-inf"))
        return (torch.softmax(s, -1) @ v.double()).to(q.dtype)


def compare(model, inputs, method, brute, *, tol=1e-4, **config):
    diffaccel.apply(model, method, **config)
    out = run(model, inputs)
    diffaccel.apply(model, brute)
    expected = run(model, inputs)
    diffaccel.apply(model, "dense")
    dense = run(model, inputs)
    diffaccel.remove(model)
    assert brute.calls > 0
    assert max_abs_diff(out, expected) <= tol
    assert max_abs_diff(out, dense) > 10 * tol  # the method changed something: the comparison can fail
    return out


# ----------------------------------------------------------------------------------------------- tiny video models


def _randomize(model):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def tiny_wan():
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32,
    )
    inputs = {
        "hidden_states": torch.randn(1, 4, 3, 8, 8),  # grid (3, 4, 4)
        "timestep": torch.tensor([700.0]),
        "encoder_hidden_states": torch.randn(1, 6, 16),
    }
    return _randomize(model), inputs


def tiny_hunyuan():
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 2, 4), guidance_embeds=True,
    )
    mask = torch.ones(2, 7)
    mask[1, 3:] = 0  # the second prompt is padded: its last 4 text keys are masked
    inputs = {
        "hidden_states": torch.randn(2, 4, 2, 8, 8),  # grid (2, 4, 4)
        "timestep": torch.tensor([700.0, 700.0]),
        "encoder_hidden_states": torch.randn(2, 7, 16),
        "encoder_attention_mask": mask,
        "pooled_projections": torch.randn(2, 8),
        "guidance": torch.tensor([4.0, 4.0]),
    }
    return _randomize(model), inputs


# ----------------------------------------------------------------------------------------------- end to end


def test_gna_on_flux_text_prefix():
    model, inputs = tiny_flux(), flux_inputs(8, 8)
    brute = BruteForce(lambda lay, ctx: neighborhood(lay.grid, (3, 5), (1, 2)))
    compare(model, inputs, "gna", brute, kernel_size=(3, 5), stride=(1, 2), **FAST)


def test_gna_on_flux_with_the_triton_kernel():
    model, inputs = tiny_flux(), flux_inputs(8, 8)
    brute = BruteForce(lambda lay, ctx: neighborhood(lay.grid, (4, 4), (4, 4)))
    compare(model, inputs, "gna", brute, kernel_size=4, stride=4, block_size=16, backend="triton")


def test_gna_blocked_tile_major_on_sd3_text_suffix_selected_layer():
    model, inputs = tiny_sd3(), sd3_inputs(16, 16)  # grid (8, 8), text after the image
    layer = "transformer_blocks.0.attn"
    brute = BruteForce(lambda lay, ctx: neighborhood(lay.grid, (4, 4), (4, 4)) if ctx.layer == layer else None)
    compare(model, inputs, "gna", brute, kernel_size=4, stride=4, layers=[layer], **FAST)


def test_gna_preset_and_layer_overrides_on_flux():
    model, inputs = tiny_flux(), flux_inputs(8, 8)
    # GNA's FLUX preset scaled to 8x8 (Cosmos rule): window 2x2, stride 1; the single-stream block overridden
    single = "single_transformer_blocks.0.attn"

    def visual(lay, ctx):
        return neighborhood(lay.grid, (4, 4), (4, 4)) if ctx.layer == single else neighborhood(lay.grid, (2, 2), (1, 1))

    compare(model, inputs, "gna", BruteForce(visual), layer_overrides={single: {"kernel_size": 4, "stride": 4}}, **FAST)


def test_clear_on_flux_warns_training_free_once():
    model, inputs = tiny_flux(), flux_inputs(8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compare(model, inputs, "clear", BruteForce(lambda lay, ctx: circle(lay.grid, 2.5)), radius=2.5, **FAST)
    messages = [str(w.message) for w in caught if issubclass(w.category, DiffAccelWarning)]
    assert len([m for m in messages if "training-free" in m]) == 1
    assert "Huage001/CLEAR#14" in messages[0]


def test_msw_on_flux_windows_every_layer_with_seeded_shifts():
    model, inputs = tiny_flux(), flux_inputs(8, 12)  # grid (8, 12): windows 4x6, shifts k * (1, 1)

    def visual(lay, ctx):
        assert lay.grid == (8, 12)
        k = shift_index("random", 3, ctx.layer, ctx.step)
        return windows(lay.grid, (4, 6), (k, k))

    compare(model, inputs, "msw", BruteForce(visual), seed=3, **FAST)


def test_msw_on_flux_explicit_window_with_shift():
    model, inputs = tiny_flux(), flux_inputs(8, 8)

    def visual(lay, ctx):
        return windows(lay.grid, (4, 4), ((ctx.step % 4) * 1, (ctx.step % 4) * 1))

    compare(model, inputs, "msw", BruteForce(visual), window=4, shift_policy="cyclic", **FAST)


def test_msw_on_unet_windows_only_the_highest_resolution_level():
    model, inputs = tiny_unet(), unet_inputs(16, 12)  # levels (16, 12) and (8, 6)
    seen = set()

    def visual(lay, ctx):
        seen.add(lay.grid)
        if lay.grid != ctx.grid:
            return None
        k = shift_index("random", 0, ctx.layer, ctx.step)
        return windows(lay.grid, (8, 6), (k * 2, k * 1))

    compare(model, inputs, AdapterFields(get_method("msw", **FAST), unet=True), BruteForce(visual))
    assert seen == {(16, 12), (8, 6)}


@pytest.mark.filterwarnings("ignore:clear. running training-free")
def test_video_methods_on_wan():
    model, inputs = tiny_wan()  # grid (3, 4, 4), no text in self-attention
    compare(model, inputs, "tile", BruteForce(lambda lay, ctx: tiles(lay.grid, (0,))), **FAST)
    compare(model, inputs, "tile", BruteForce(lambda lay, ctx: tiles(lay.grid, (2,))), global_frames=[2], **FAST)
    compare(model, inputs, "gna", BruteForce(lambda lay, ctx: neighborhood(lay.grid, (2, 3, 3), (1, 1, 1))),
            kernel_size=(2, 3, 3), **FAST)
    compare(model, inputs, "clear", BruteForce(lambda lay, ctx: circle(lay.grid, 2.0, per_frame=True)), radius=2, **FAST)
    compare(model, inputs, "clear", BruteForce(lambda lay, ctx: circle(lay.grid, 1.5)), radius=1.5, video="ball",
            **FAST)


def test_gna_on_hunyuan_with_padded_prompt():
    """HunyuanVideo's prompt-padding key mask: exact per padding group, not a dense fallback."""
    model, inputs = tiny_hunyuan()
    brute = BruteForce(lambda lay, ctx: neighborhood(lay.grid, (2, 3, 3), (1, 3, 3)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiffAccelWarning)  # a dense fallback would warn
        gna = AdapterFields(get_method("gna", kernel_size=(2, 3, 3), stride=(1, 3, 3), **FAST))
        compare(model, inputs, gna, brute)
        inputs["encoder_attention_mask"][0, 3:] = 0  # both prompts padded alike: one group
        compare(model, inputs, gna, brute)
    assert brute.masked_calls == brute.calls


def test_processors_are_the_methods():
    model, inputs = tiny_flux(), flux_inputs(8, 8)
    for cls, name, config in (
        (GNAAttnProcessor, "gna", dict(kernel_size=3)),
        (ClearAttnProcessor, "clear", dict(radius=2)),
        (MSWAttnProcessor, "msw", {}),
        (TileAttnProcessor, "tile", {}),
    ):
        processor = cls(**config, **FAST)
        assert isinstance(processor, DiffAccelAttnProcessor) and processor.method.name == name
    processor = diffaccel.apply(model, GNAAttnProcessor(kernel_size=3, **FAST))
    out = run(model, inputs)
    diffaccel.apply(model, "gna", kernel_size=3, **FAST)
    assert torch.equal(out, run(model, inputs))
    diffaccel.remove(model)
    with pytest.raises(ConfigError, match="unknown parameter"):
        GNAAttnProcessor(radius=3)


def test_tile_refuses_image_models():
    model, inputs = tiny_flux(), flux_inputs(8, 8)
    diffaccel.apply(model, "tile", **FAST)
    with pytest.raises(ConfigError, match="video grid"):
        run(model, inputs)
    diffaccel.remove(model)


def test_gna_window_larger_than_a_unet_level_names_the_layer():
    model, inputs = tiny_unet(), unet_inputs(16, 16)
    diffaccel.apply(model, "gna", kernel_size=10, **FAST)
    with pytest.raises(ConfigError, match=r"does not fit the grid \(8, 8\)"):
        run(model, inputs)
    diffaccel.remove(model)


# ----------------------------------------------------------------------------------------------- schedules


def _call(method, layer, step, grid=(8, 8), text=3):
    n = math.prod(grid) + text
    q, k, v = (torch.randn(1, 2, n, 16) for _ in range(3))
    layout = TokenLayout(num_tokens=n, grid=grid, text=slice(0, text))
    out = method(q, k, v, layout, RunContext(grid=grid, step=step, layer=layer))
    return out, sdpa(q, k, v)


def test_dense_steps_and_excluded_layers_run_dense():
    method = get_method("gna", kernel_size=3, dense_steps=2, exclude_layers=["blocks.1.*"], **FAST)
    out, dense = _call(method, "blocks.0.attn", step=1)
    assert torch.allclose(out, dense, atol=1e-6)
    out, dense = _call(method, "blocks.0.attn", step=2)
    assert not torch.allclose(out, dense, atol=1e-3)
    out, dense = _call(method, "blocks.1.attn", step=5)
    assert torch.allclose(out, dense, atol=1e-6)


def test_other_masks_fall_back_to_dense_with_a_warning():
    method = get_method("gna", kernel_size=3, **FAST)
    n = 64 + 3
    q, k, v = (torch.randn(1, 2, n, 16) for _ in range(3))
    bias = torch.randn(1, 1, n, n)
    layout = TokenLayout(num_tokens=n, grid=(8, 8), text=slice(64, n))
    with pytest.warns(DiffAccelWarning, match="gna: an attention call with a mask"):
        out = method(q, k, v, layout, RunContext(grid=(8, 8), layer="a"), attn_mask=bias)
    assert torch.allclose(out, sdpa(q, k, v, attn_mask=bias), atol=1e-6)


def test_layer_patterns_match_whole_names():
    cfg = GNAConfig(layers=("transformer_blocks.1.attn", "single_*.attn"))
    cfg.validate()
    assert cfg.applies_to("transformer_blocks.1.attn")
    assert not cfg.applies_to("transformer_blocks.10.attn")  # diffusers' PAG regex would match this
    assert cfg.applies_to("single_transformer_blocks.3.attn")
    assert not cfg.applies_to("transformer_blocks.1.attn2")
    cfg = GNAConfig(kernel_size=5, layer_overrides={"blocks.*": {"kernel_size": 3}, "blocks.2": {"stride": 3}})
    cfg.validate()
    assert cfg.for_layer("blocks.2").kernel_size == 3 and cfg.for_layer("blocks.2").stride == 3
    assert cfg.for_layer("other").kernel_size == 5


def test_shift_policies():
    assert [shift_index("cyclic", 0, "a", t) for t in range(6)] == [0, 1, 2, 3, 0, 1]
    rand = [shift_index("random", 7, "a", t) for t in range(40)]
    assert set(rand) == {0, 1, 2, 3} and rand == [shift_index("random", 7, "a", t) for t in range(40)]
    assert rand != [shift_index("random", 8, "a", t) for t in range(40)]  # the seed matters
    no_repeat = [shift_index("no_repeat", 7, "a", t) for t in range(40)]
    assert set(no_repeat) == {0, 1, 2, 3} and all(a != b for a, b in zip(no_repeat, no_repeat[1:]))


# ----------------------------------------------------------------------------------------------- configs


def test_gna_presets_scale_with_the_grid():
    cfg = GNAConfig()
    cfg.validate()
    assert cfg.parameters_for((256, 256))[:3] == ((80, 80), (16, 16), (1, 1))  # GNA paper, FLUX 4K
    assert cfg.parameters_for((30, 48, 80))[:3] == ((18, 24, 24), (16, 8, 8), (1, 1, 1))  # GNA paper, Hunyuan
    assert cfg.parameters_for((64, 64))[:3] == ((20, 20), (4, 4), (1, 1))  # Cosmos rule: 80 * 64/256
    assert cfg.parameters_for((2, 4, 4))[0][0] == 2  # window >= 2 (clamped to the grid)
    with pytest.raises(ConfigError, match="no default window for a 1-D grid"):
        cfg.parameters_for((64,))
    cfg = GNAConfig(kernel_size=[3, 5], is_causal=[True, False])
    cfg.validate()
    assert cfg.kernel_size == (3, 5) and cfg.is_causal == (True, False)  # CLI lists become tuples
    assert cfg.parameters_for((8, 8)) == ((3, 5), (1, 1), (1, 1), (True, False))


def test_tile_global_frames():
    cfg = TileConfig()
    cfg.validate()
    assert cfg.frames_for(8, 2) == (0, 1) and cfg.frames_for(24, 2) == tuple(range(6))  # 2:6 and 6:18
    cfg = TileConfig(global_frames=3, placement="uniform")
    cfg.validate()
    assert cfg.frames_for(9, 2) == (0, 4, 8)
    cfg = TileConfig(global_frames=[[0], [1, 2]])
    cfg.validate()
    assert cfg.frames_for(4, 2) == ((0,), (1, 2))
    with pytest.raises(ConfigError, match="2 per-head lists but the layer has 3 heads"):
        cfg.frames_for(4, 3)
    with pytest.raises(ConfigError, match="outside the clip"):
        cfg.frames_for(2, 2)


@pytest.mark.parametrize(
    "method,config,match",
    [
        ("gna", dict(kernel_size=1), "kernel_size must be > 1"),
        ("gna", dict(stride=[1, 0]), "stride must be >= 1"),
        ("gna", dict(preset="flux"), "preset must be one of"),
        ("gna", dict(is_causal="yes"), "is_causal must be a bool"),
        ("gna", dict(layers=5), "layers must be a list"),
        ("gna", dict(layer_overrides={"x": {"radius": 2}}), r"layer_overrides\['x'\] has unknown parameter"),
        ("gna", dict(layer_overrides={"x": {"kernel_size": 1}}), r"layer_overrides\['x'\]: kernel_size must be"),
        ("gna", dict(block_size=100), "block_size must be a power of two"),
        ("gna", dict(backend="cuda"), "backend must be one of"),
        ("gna", dict(dense_steps=-1), "dense_steps must be an integer >= 0"),
        ("tile", dict(global_frames=-1), "must be >= 0"),
        ("tile", dict(global_frames=[1, 1]), "lists a frame twice"),
        ("tile", dict(placement="last"), "placement must be one of"),
        ("clear", dict(radius=0), "radius must be a finite number > 0"),
        ("clear", dict(video="volume"), "video must be one of"),
        ("msw", dict(shift_policy="swin"), "shift_policy must be one of"),
        ("msw", dict(window=0), "window must be >= 1"),
        ("msw", dict(max_downsample=0), "max_downsample must be an integer >= 1"),
    ],
)
def test_bad_configs_are_rejected(method, config, match):
    with pytest.raises(ConfigError, match=match):
        get_method(method, **config)


# ----------------------------------------------------------------------------------------------- CLEAR weights


def _clear_file(model, path, *, extra=None, scale=0.01):
    from safetensors.torch import save_file

    state = {
        name: torch.randn(p.shape) * scale
        for name, p in model.named_parameters()
        if any(t in name for t in (".attn.to_q.", ".attn.to_k.", ".attn.to_v.", ".attn.to_out."))
    }
    state.update(extra or {})
    save_file(state, str(path))
    return state


def test_clear_weights_install_from_a_folder(tmp_path):
    from diffaccel.pipelines.clear_weights import installed_clear_weights, load_clear_weights

    model = tiny_flux()
    state = _clear_file(model, tmp_path / "clear_local_8.safetensors")
    untouched = model.transformer_blocks[0].attn.add_q_proj.weight.clone()
    info = load_clear_weights(SimpleNamespace(transformer=model), tmp_path, radius=8)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in state.items())
    assert torch.equal(model.transformer_blocks[0].attn.add_q_proj.weight, untouched)
    assert info.radius == 8 and info.num_tensors == len(state)
    assert set(info.modules) == {"transformer_blocks.0.attn", "single_transformer_blocks.0.attn"}
    assert installed_clear_weights(model.single_transformer_blocks[0].attn) is info
    with pytest.raises(ConfigError, match="distilled for radius 8, not radius 16"):
        load_clear_weights(model, tmp_path / "clear_local_8.safetensors", radius=16)


def test_clear_weights_are_checked_before_anything_changes(tmp_path):
    from diffaccel.pipelines.clear_weights import load_clear_weights

    model = tiny_flux()
    before = {k: p.clone() for k, p in model.named_parameters()}
    bad = tmp_path / "foreign.safetensors"
    _clear_file(model, bad, extra={"x_embedder.weight": torch.zeros(3)})
    with pytest.raises(ConfigError, match="not attention projections: x_embedder.weight"):
        load_clear_weights(model, bad)
    shape = tmp_path / "shape.safetensors"
    _clear_file(model, shape, extra={"transformer_blocks.0.attn.to_q.weight": torch.zeros(3, 3)})
    with pytest.raises(ConfigError, match="shape mismatches"):
        load_clear_weights(model, shape)
    pooled = tmp_path / "pooled.safetensors"
    _clear_file(model, pooled, extra={"transformer_blocks.0.attn.processor.spatial_weight": torch.ones(16)})
    with pytest.raises(ConfigError, match="down-sampled key/value variant"):
        load_clear_weights(model, pooled)
    with pytest.raises(ModelLoadError, match="cannot choose"):
        load_clear_weights(model, tmp_path)
    down = tmp_path / "clear_local_8_down_4.safetensors"
    _clear_file(model, down)
    with pytest.raises(ConfigError, match="down_factor 4"):
        load_clear_weights(model, tmp_path)  # the only CLEAR file of the folder
    assert all(torch.equal(p, before[k]) for k, p in model.named_parameters())
    with pytest.raises(ModelLoadError, match="not a file, a folder or a Hub repo id"):
        load_clear_weights(model, str(tmp_path / "missing" / "x"))


def test_clear_weights_from_the_hub_use_the_radius_file_name(tmp_path, monkeypatch):
    import huggingface_hub

    from diffaccel.pipelines.clear_weights import load_clear_weights

    model = tiny_flux()
    path = tmp_path / "clear_local_16.safetensors"
    _clear_file(model, path)
    asked = {}

    def fake_download(repo_id, filename, revision=None):
        asked.update(repo_id=repo_id, filename=filename)
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    info = load_clear_weights(model, "Huage001/CLEAR", radius=16)
    assert asked == {"repo_id": "Huage001/CLEAR", "filename": "clear_local_16.safetensors"} and info.radius == 16
    with pytest.raises(ConfigError, match="pass radius="):
        load_clear_weights(model, "Huage001/CLEAR")


def test_clear_with_installed_weights_does_not_warn(tmp_path):
    from diffaccel.pipelines.clear_weights import load_clear_weights

    model, inputs = tiny_flux(), flux_inputs(8, 8)
    _clear_file(model, tmp_path / "clear_local_2.safetensors", scale=0.3)
    # via the method's hook (what the pipeline-side setup of diffaccel.apply calls after installing) ...
    method = get_method("clear", radius=2, weights=str(tmp_path), **FAST)
    method.note_distilled(load_clear_weights(model, tmp_path, radius=2).radius)
    # ... and via a bare processor on modules the loader marked
    load_clear_weights(model, tmp_path, radius=2)
    processor = ClearAttnProcessor(radius=2, **FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiffAccelWarning)
        warnings.filterwarnings("ignore", "diffaccel: attention module .* has no recorded name", DiffAccelWarning)
        model.set_attn_processor(processor)
        out = run(model, inputs)
    # the distilled model under CLEAR equals the brute-force circle on the same weights, and differs from dense
    brute = BruteForce(lambda lay, ctx: circle(lay.grid, 2))
    model.set_attn_processor(DiffAccelAttnProcessor(brute))
    expected = run(model, inputs)
    model.set_attn_processor(DiffAccelAttnProcessor("dense"))
    dense = run(model, inputs)
    assert brute.calls > 0 and max_abs_diff(out, expected) <= 1e-4 and max_abs_diff(out, dense) > 1e-3
    with pytest.raises(ConfigError, match="distilled for radius 2 but the method uses radius 3"):
        get_method("clear", radius=3, **FAST).note_distilled(2.0)
    unset = get_method("clear", radius=2, weights=str(tmp_path), **FAST)
    q, k, v = (torch.randn(1, 2, 69, 8) for _ in range(3))
    with pytest.raises(ConfigError, match="weights= was given but never installed"):
        unset(q, k, v, TokenLayout(69, (8, 8), slice(0, 5)), RunContext(layer="x"))


# ----------------------------------------------------------------------------------------------- CLI


def test_cli_generate_with_gna(tmp_path):
    from typer.testing import CliRunner

    from diffaccel.cli import app

    args = ["generate", "--method", "gna", "--model", "tiny-flux", "--steps", "1", "--no-compare", "--warmup", "0",
            "--out", str(tmp_path), "--set", "kernel_size=[3,5]", "--set", "backend=reference", "--set", "block_size=32"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert any(tmp_path.rglob("*.png"))
    result = CliRunner().invoke(app, args[:-6] + ["--set", "kernel_size=1"])
    assert isinstance(result.exception, DiffAccelError) and "kernel_size must be > 1" in str(result.exception)


def test_other_methods_warn_when_clear_weights_linger(tmp_path):
    """load_clear_weights changes the model in place: a later non-CLEAR method runs on those weights and says so."""
    import warnings

    from diffaccel.pipelines.clear_weights import load_clear_weights
    from diffaccel.warn import DiffAccelWarning

    model = tiny_flux()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiffAccelWarning)
        diffaccel.apply(model, "dense")  # no CLEAR weights: no warning
    diffaccel.remove(model)
    _clear_file(model, tmp_path / "clear_local_8.safetensors")
    load_clear_weights(model, tmp_path, radius=8)
    with pytest.warns(DiffAccelWarning, match="CLEAR's distilled attention projections"):
        diffaccel.apply(model, "dense")
    diffaccel.remove(model)
