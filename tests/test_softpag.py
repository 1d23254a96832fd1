"""SoftPAG: u = 0 is no guidance, u = 1 is diffusers' own PAG pipelines, the batch order and guidance formula
of diffusers' PAGMixin, QK-norm in the perturbed branch, exact layer names, composition with other methods."""

from __future__ import annotations

import inspect
import json
import re

import pytest
import torch

import diffaccel
from diffaccel.context import RunContext
from diffaccel.errors import ConfigError, UnsupportedModelError
from diffaccel.layout import TokenLayout
from diffaccel.methods.base import sdpa
from diffaccel.methods.softpag import SoftPAGMethod, layer_or_parent_matches, load_heads
from diffaccel.pipelines.guidance import (
    combine_predictions,
    disable_softpag,
    enable_softpag,
    guidance_weight,
    resolve_selection,
)
from diffaccel.pipelines.processor import DiffAccelAttnProcessor
from diffaccel.pipelines.tiny import build_tiny, tiny_spec

PROMPT = "a red cube on a table"


def run(pipe, name, seed=0, **overrides):
    kwargs = tiny_spec(name).call_kwargs(output_type="latent", **overrides)
    return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), **kwargs).images


def reference_pipeline(cls, pipe, **kwargs):
    params = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in pipe.components.items() if k in params}, **kwargs)


@pytest.fixture(scope="module")
def sd3():
    pipe = build_tiny("tiny-sd3")
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------- the method


def test_method_blends_selected_heads_of_perturbed_rows_only():
    layout = TokenLayout(20 + 4, (4, 5), text=slice(20, 24))
    q, k, v = (torch.randn(3, 4, 24, 8) for _ in range(3))
    method = SoftPAGMethod(heads={"blocks.2.attn": [1, 3]}, strength=0.3)
    ctx = RunContext(layer="blocks.2.attn")
    dense = sdpa(q, k, v)
    torch.testing.assert_close(method(q, k, v, layout, ctx), dense)  # no perturbed rows: inner method only
    method.perturbed_rows = slice(2, 3)  # what the guidance hooks set for the perturbed branch
    out = method(q, k, v, layout, ctx)
    expected = dense.clone()
    for h in (1, 3):
        expected[2, h] = 0.7 * dense[2, h] + 0.3 * v[2, h]
    torch.testing.assert_close(out, expected)
    ctx.layer = "blocks.20.attn"  # never matched by the name 'blocks.2.attn'
    torch.testing.assert_close(method(q, k, v, layout, ctx), dense)


@pytest.mark.parametrize("text_first", [False, True])
def test_image_identity_equals_masked_attention(text_first):
    """identity='image' at u=1 equals SDPA with diffusers' mask: -inf on image x image except the diagonal."""
    n_img, n_txt = 12, 5
    text = slice(0, n_txt) if text_first else slice(n_img, n_img + n_txt)
    layout = TokenLayout(n_img + n_txt, (3, 4), text=text)
    q, k, v = (torch.randn(2, 2, n_img + n_txt, 8) for _ in range(3))
    ctx = RunContext(layer="x")
    method = SoftPAGMethod(layers=["x"], identity="image", strength=1.0)
    method.perturbed_rows = slice(1, 2)
    out = method(q, k, v, layout, ctx)
    mask = torch.zeros(n_img + n_txt, n_img + n_txt)
    img = torch.arange(n_img) + (n_txt if text_first else 0)
    mask[img[:, None], img[None, :]] = float("-inf")
    mask[img, img] = 0
    torch.testing.assert_close(out[1:], sdpa(q[1:], k[1:], v[1:], attn_mask=mask), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:1], sdpa(q[:1], k[:1], v[:1]))


def test_layer_names_match_whole_components():
    assert layer_or_parent_matches("transformer_blocks.1", "transformer_blocks.1.attn")
    assert layer_or_parent_matches("transformer_blocks.1.attn", "transformer_blocks.1.attn")
    assert not layer_or_parent_matches("transformer_blocks.1", "transformer_blocks.10.attn")
    assert not layer_or_parent_matches("transformer_blocks.1.at", "transformer_blocks.1.attn")
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=12, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=8,
    )
    ours = resolve_selection([model], {"transformer_blocks.1": None})
    assert list(ours) == ["transformer_blocks.1.attn"] and ours["transformer_blocks.1.attn"] == (0, 1)
    # diffusers' PAGMixin regex on the same name selects blocks 1 and 10-11 (huggingface/diffusers#13594)
    regex = [n for n, _ in model.named_modules() if n.endswith(".attn") and re.search("transformer_blocks.1", n)]
    assert len(regex) == 3


def test_bad_selection_is_reported(sd3):
    with pytest.raises(ConfigError, match="matches no self-attention module"):
        enable_softpag(sd3, layers=["transformer_blocks.7"])
    with pytest.raises(ConfigError, match="2 heads"):
        enable_softpag(sd3, heads={"transformer_blocks.0.attn": [2]})
    with pytest.raises(ConfigError, match="strength"):
        enable_softpag(sd3, layers=["transformer_blocks.0"], strength=1.5)
    with pytest.raises(ConfigError, match="does not exist"):
        enable_softpag(sd3, heads="/nonexistent/heads.json")
    assert diffaccel.pipelines.hooks.installed_processor(sd3.transformer) is None  # nothing half-installed


def test_default_layers_follow_diffusers_exactly(sd3):
    proc = enable_softpag(sd3)  # diffusers' SD3 default "blocks.1", without blocks 10-19
    diffaccel.remove(sd3)
    assert proc.method.selection == {"transformer_blocks.1.attn": (0, 1)}
    unet = build_tiny("tiny-sd")
    proc = enable_softpag(unet)  # diffusers' SD/SDXL default "mid": the mid block's self-attention
    diffaccel.remove(unet)
    assert list(proc.method.selection) == ["mid_block.attentions.0.transformer_blocks.0.attn1"]
    flux = build_tiny("tiny-flux")
    with pytest.raises(ConfigError, match="no published default"):
        enable_softpag(flux)


def test_cross_attention_cannot_be_selected():
    pipe = build_tiny("tiny-sd")
    name = next(n for n, m in pipe.unet.named_modules() if n.endswith("attn2"))
    with pytest.raises(ConfigError, match="cross-attention"):
        enable_softpag(pipe, layers=[name])
    diffaccel.remove(pipe)


# ---------------------------------------------------------------------------------------------- guidance math


class _PAGMath:
    """diffusers' PAGMixin formula, the reference for the combination."""

    def __init__(self, scale, adaptive):
        from diffusers.pipelines.pag.pag_utils import PAGMixin

        self._pag_scale, self._pag_adaptive_scale, self.pag_applied_layers = scale, adaptive, ["x"]
        self.mixin = PAGMixin

    def __call__(self, pred, cfg, guidance_scale, t):
        m = self.mixin
        self.pag_scale, self.pag_adaptive_scale = self._pag_scale, self._pag_adaptive_scale
        self.do_pag_adaptive_scaling = m.do_pag_adaptive_scaling.fget(self)
        self._get_pag_scale = lambda t: m._get_pag_scale(self, t)
        return m._apply_perturbed_attention_guidance(self, pred, cfg, guidance_scale, t)


@pytest.mark.parametrize("cfg", [None, 4.5])
@pytest.mark.parametrize("scale,adaptive,t", [(3.0, 0.0, 500.0), (3.0, 0.004, 700.0), (5.0, 0.01, 100.0)])
def test_combination_equals_diffusers_pag_formula(cfg, scale, adaptive, t):
    pred = torch.randn(3 if cfg else 2, 4, 6, 6, dtype=torch.float64)
    ours = combine_predictions(pred, cfg_scale=cfg, weight=guidance_weight(scale, adaptive, t))
    if cfg:  # the pipeline then applies its own CFG to our [uncond, cond']
        uncond, cond = ours.chunk(2)
        ours = uncond + cfg * (cond - uncond)
    expected = _PAGMath(scale, adaptive)(pred, cfg is not None, cfg, torch.tensor(t, dtype=torch.float64))
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


def test_batch_order_and_perturbed_rows(sd3):
    """With CFG the denoiser sees [uncond, cond, cond]; the method sees rows 2B:3B as perturbed."""
    seen = []
    softpag = []

    class Spy(diffaccel.methods.dense.DenseMethod):
        def __call__(self, q, k, v, layout, ctx, **kw):
            seen.append((q.shape[0], softpag[0].perturbed_rows))
            return super().__call__(q, k, v, layout, ctx, **kw)

    diffaccel.apply(sd3, Spy())
    softpag.append(enable_softpag(sd3, layers=["transformer_blocks.0"]).method)  # wraps the method already applied
    inputs = []
    handle = sd3.transformer.register_forward_pre_hook(lambda m, a, kw: inputs.append(kw), with_kwargs=True)
    try:
        run(sd3, "tiny-sd3", guidance_scale=4.0, num_images_per_prompt=2, height=32, width=32)
        run(sd3, "tiny-sd3", guidance_scale=0.0, height=32, width=32)
    finally:
        handle.remove()
        diffaccel.remove(sd3)
    cfg_call, plain_call = inputs[0], inputs[-1]
    for name in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"):
        x = cfg_call[name]
        assert x.shape[0] == 6
        torch.testing.assert_close(x[4:], x[2:4])  # perturbed = cond
        assert name == "hidden_states" or name == "timestep" or (x[:2] - x[2:4]).abs().max() > 0  # uncond != cond
        y = plain_call[name]
        assert y.shape[0] == 2
        torch.testing.assert_close(y[1:], y[:1])
    assert seen[0] == (6, slice(4, 6, None))
    assert seen[-1] == (2, slice(1, 2, None))
    assert not sd3.transformer._forward_hooks and "_diffaccel_softpag" not in sd3.transformer.__dict__  # removed


# ---------------------------------------------------------------------------------------------- pipelines


@pytest.mark.parametrize("guidance_scale", [4.0, 0.0])
def test_zero_strength_equals_no_guidance(sd3, guidance_scale):
    plain = run(sd3, "tiny-sd3", guidance_scale=guidance_scale)
    enable_softpag(sd3, layers=["transformer_blocks.0", "transformer_blocks.1"], strength=0.0, scale=5.0)
    try:
        soft = run(sd3, "tiny-sd3", guidance_scale=guidance_scale)
    finally:
        diffaccel.remove(sd3)
    torch.testing.assert_close(soft, plain, rtol=1e-5, atol=1e-5)
    strong = None
    enable_softpag(sd3, layers=["transformer_blocks.0"], strength=0.5, scale=5.0)
    try:
        strong = run(sd3, "tiny-sd3", guidance_scale=guidance_scale)
    finally:
        diffaccel.remove(sd3)
    assert (strong - plain).abs().max() > 1e-3  # the test can tell guidance from none


@pytest.mark.parametrize("guidance_scale,adaptive", [(4.0, 0.0), (0.0, 0.002)])
def test_full_strength_equals_diffusers_sd3_pag_pipeline(sd3, guidance_scale, adaptive):
    from diffusers import StableDiffusion3PAGPipeline

    ref_pipe = reference_pipeline(StableDiffusion3PAGPipeline, sd3, pag_applied_layers=["transformer_blocks.1"])
    ref_pipe.set_progress_bar_config(disable=True)
    expected = run(ref_pipe, "tiny-sd3", guidance_scale=guidance_scale, pag_scale=3.0, pag_adaptive_scale=adaptive)
    enable_softpag(sd3, layers=["transformer_blocks.1"], strength=1.0, scale=3.0, adaptive_scale=adaptive,
                   identity="image")
    try:
        ours = run(sd3, "tiny-sd3", guidance_scale=guidance_scale)
        enable_softpag(sd3, layers=["transformer_blocks.1"], strength=1.0, scale=3.0, adaptive_scale=adaptive)
        full = run(sd3, "tiny-sd3", guidance_scale=guidance_scale)
    finally:
        diffaccel.remove(sd3)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    assert (full - expected).abs().max() > 1e-3  # the paper's full identity is a different target


def test_full_strength_equals_diffusers_unet_pag_pipeline():
    from diffusers import StableDiffusionPAGPipeline

    pipe = build_tiny("tiny-sd")
    pipe.set_progress_bar_config(disable=True)
    size = dict(height=32, width=32, guidance_scale=5.0)
    ref_pipe = reference_pipeline(StableDiffusionPAGPipeline, pipe, pag_applied_layers=["mid"])
    ref_pipe.set_progress_bar_config(disable=True)
    expected = run(ref_pipe, "tiny-sd", pag_scale=3.0, **size)
    enable_softpag(pipe, layers=["mid_block"], strength=1.0, scale=3.0)  # self-attention of the mid block only
    try:
        ours = run(pipe, "tiny-sd", **size)
    finally:
        diffaccel.remove(pipe)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_flux_without_cfg_uses_cond_and_perturbed():
    pipe = build_tiny("tiny-flux")
    pipe.set_progress_bar_config(disable=True)
    plain = run(pipe, "tiny-flux", height=32, width=32)
    enable_softpag(pipe, heads={"transformer_blocks.0.attn": [1], "single_transformer_blocks.1.attn": "all"},
                   strength=0.0)
    try:
        zero = run(pipe, "tiny-flux", height=32, width=32)
        enable_softpag(pipe, heads={"transformer_blocks.0.attn": [1]}, strength=1.0)
        guided = run(pipe, "tiny-flux", height=32, width=32)
    finally:
        diffaccel.remove(pipe)
    torch.testing.assert_close(zero, plain, rtol=1e-5, atol=1e-5)
    assert (guided - plain).abs().max() > 1e-3


def test_qk_norm_is_applied_in_the_perturbed_branch():
    """On SD3.5 (RMS QK-norm): O'(u) = (1-u)·stock + u·O'(1), which fails if the branch skipped the norm."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    pipe = build_tiny("tiny-sd35")
    attn = pipe.transformer.transformer_blocks[1].attn
    assert attn.norm_q is not None
    hidden, text = torch.randn(2, 16, attn.query_dim), torch.randn(2, 7, attn.query_dim)
    stock = JointAttnProcessor2_0()(attn, hidden, text)

    def perturbed(u):
        method = SoftPAGMethod(layers=["blk"], strength=u)
        method.perturbed_rows = slice(1, 2)
        proc = DiffAccelAttnProcessor(method, context=RunContext())
        attn.__dict__["_diffaccel_name"] = "blk"
        attn.__dict__["_diffaccel_stock_processor"] = JointAttnProcessor2_0()
        attn.__dict__.pop("_diffaccel_adapter", None)
        return proc(attn, hidden, text)

    half, full = perturbed(0.5), perturbed(1.0)
    for i in range(2):
        torch.testing.assert_close(half[i][:1], stock[i][:1], rtol=1e-5, atol=1e-5)  # unperturbed row untouched
        torch.testing.assert_close(half[i][1:], 0.5 * stock[i][1:] + 0.5 * full[i][1:], rtol=1e-4, atol=1e-5)
        assert (full[i][1:] - stock[i][1:]).abs().max() > 1e-3


def test_composes_with_another_method(sd3):
    diffaccel.apply(sd3, "agent", mode="pooled", agent_grid=(3, 3))
    agent_only = run(sd3, "tiny-sd3", guidance_scale=4.0)
    processor = enable_softpag(sd3, layers=["transformer_blocks.1"], strength=0.0)
    try:
        assert type(processor.method.inner).__name__ == "AgentMethod"
        zero = run(sd3, "tiny-sd3", guidance_scale=4.0)
        disable_softpag(sd3)
        assert type(processor.method).__name__ == "AgentMethod"  # the inner method stays installed
        again = run(sd3, "tiny-sd3", guidance_scale=4.0)
    finally:
        diffaccel.remove(sd3)
    torch.testing.assert_close(zero, agent_only, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, agent_only)
    proc = enable_softpag(sd3, layers=["transformer_blocks.1"], method="agent",
                          method_config={"mode": "pooled", "agent_grid": [3, 3]})
    diffaccel.remove(sd3)
    assert type(proc.method.inner).__name__ == "AgentMethod"


def test_heads_json_file(sd3, tmp_path):
    path = tmp_path / "heads.json"
    path.write_text(json.dumps({"format": "diffaccel.softpag.heads/1", "heads": {"transformer_blocks.0.attn": [1]}}))
    assert load_heads(path) == {"transformer_blocks.0.attn": [1]}
    proc = enable_softpag(sd3, heads=str(path))
    diffaccel.remove(sd3)
    assert proc.method.selection == {"transformer_blocks.0.attn": (1,)}


def test_unbatched_cfg_is_refused(sd3):
    enable_softpag(sd3, layers=["transformer_blocks.0"])
    try:
        sd3._guidance_scale = 4.0  # a CFG pipeline calling the denoiser with one (odd) batch
        with pytest.raises(UnsupportedModelError, match="negative prompt"):
            sd3.transformer(
                hidden_states=torch.randn(1, 16, 8, 8), encoder_hidden_states=torch.randn(1, 5, 32),
                pooled_projections=torch.randn(1, 64), timestep=torch.tensor([500.0]), return_dict=False,
            )
    finally:
        diffaccel.remove(sd3)


def test_apply_name_dispatches(sd3):
    plain = run(sd3, "tiny-sd3", guidance_scale=4.0)
    proc = diffaccel.apply(sd3, "softpag", layers=["transformer_blocks.1"], strength=0.0)
    try:
        zero = run(sd3, "tiny-sd3", guidance_scale=4.0)
    finally:
        diffaccel.remove(sd3)
    assert isinstance(proc.method, SoftPAGMethod)
    torch.testing.assert_close(zero, plain, rtol=1e-5, atol=1e-5)


def test_separate_cfg_calls_with_an_even_batch_are_refused():
    """Wan calls the denoiser once for the prompt and once for the negative prompt: with two videos per prompt the
    batch is even, so only the second call within one scheduler step tells that the pipeline does not batch CFG."""
    pipe = build_tiny("tiny-wan")
    pipe.set_progress_bar_config(disable=True)
    enable_softpag(pipe, layers=["blocks.0"])
    kwargs = tiny_spec("tiny-wan").call_kwargs(output_type="latent", num_inference_steps=1)
    try:
        with pytest.raises(UnsupportedModelError, match="twice in one denoising step"):
            pipe(PROMPT, guidance_scale=4.0, num_videos_per_prompt=2, **kwargs)
        pipe(PROMPT, guidance_scale=1.0, num_videos_per_prompt=2, **kwargs)  # no CFG: one call per step, runs
        pipe(PROMPT, guidance_scale=1.0, num_videos_per_prompt=2, **kwargs)  # a new run is a new step
    finally:
        diffaccel.remove(pipe)


def test_batched_cfg_runs_one_step_after_another(sd3):
    """Two one-step runs in a row meet the same timestep twice: a new run (new scheduler timesteps) is no error."""
    enable_softpag(sd3, layers=["transformer_blocks.0"])
    try:
        first = run(sd3, "tiny-sd3", guidance_scale=4.0, num_inference_steps=1)
        second = run(sd3, "tiny-sd3", guidance_scale=4.0, num_inference_steps=1)
    finally:
        diffaccel.remove(sd3)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
