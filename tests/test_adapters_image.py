"""The image adapters (SD3/SD3.5 joint, FLUX.1, SD/SDXL UNet) reproduce the stock diffusers processors exactly.

Every check runs a tiny random fp32 model twice on the same inputs, once with the stock processors and once
through diffaccel with the ``dense`` method, and compares bit for bit (the adapters run the stock ops in the stock
order; NaN fails). Batch 2 stands for
classifier-free guidance; latents are square and non-square.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoTransformerBlock
from image_models import (
    LATENT_SIZES,
    MODELS,
    TEXT_LEN,
    TRANSFORMERS,
    flux_image_ids,
    flux_inputs,
    max_abs_diff,
    run,
    sd3_inputs,
    tiny_flux,
    tiny_sd3,
)

import diffaccel
from diffaccel.context import RunContext
from diffaccel.errors import LayoutError
from diffaccel.methods.base import MethodBase, sdpa
from diffaccel.pipelines.adapters.base import AttentionCall, stock_processor_name
from diffaccel.pipelines.adapters.flux import flux_grid
from diffaccel.pipelines.adapters.sd3 import _joint_attention
from diffaccel.pipelines.hooks import attention_modules

TOL = 1e-5


class CountingDense(MethodBase):
    """Dense attention that counts the calls per layer, to prove the processor really ran on every module."""

    name = "test-counting-dense"

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}

    def __call__(self, q, k, v, layout, ctx, *, attn_mask=None, scale=None):
        self.calls[ctx.layer] = self.calls.get(ctx.layer, 0) + 1
        return sdpa(q, k, v, attn_mask=attn_mask, scale=scale)


def build(name: str, size: str):
    make_model, make_inputs = MODELS[name]
    return make_model(), make_inputs(*LATENT_SIZES[size])


@pytest.mark.parametrize("size", list(LATENT_SIZES))
@pytest.mark.parametrize("name", list(MODELS))
def test_apply_dense_equals_stock_and_remove_restores(name: str, size: str) -> None:
    model, inputs = build(name, size)
    modules = attention_modules(model)
    stock_processors = {n: m.processor for n, m in modules.items()}
    reference = run(model, inputs)

    method = CountingDense()
    diffaccel.apply(model, method)
    assert all(isinstance(m.processor, diffaccel.DiffAccelAttnProcessor) for m in modules.values())
    out = run(model, inputs)
    assert max_abs_diff(out, reference) == 0.0
    assert set(method.calls) == set(modules), "some attention modules did not run through the method"

    diffaccel.remove(model)
    assert all(m.processor is stock_processors[n] for n, m in modules.items())
    assert torch.equal(run(model, inputs), reference)


@pytest.mark.parametrize("name", list(MODELS))
def test_bare_set_attn_processor_square_equals_stock(name: str) -> None:
    """Without diffaccel.apply the stock processor is inferred and a square grid assumed."""
    model, inputs = build(name, "square")
    reference = run(model, inputs)
    method = CountingDense()
    model.set_attn_processor(diffaccel.DiffAccelAttnProcessor(method))
    assert max_abs_diff(run(model, inputs), reference) == 0.0
    assert len(method.calls) == len(attention_modules(model))


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_bare_set_attn_processor_non_square_names_apply(name: str) -> None:
    """No hook and a non-square grid: dense is exact; a grid method in strict mode names diffaccel.apply."""
    model, inputs = build(name, "non-square")
    stock = run(model, inputs)
    model.set_attn_processor(diffaccel.DiffAccelAttnProcessor("dense"))
    assert max_abs_diff(run(model, inputs), stock) == 0.0
    model.set_attn_processor(diffaccel.DiffAccelAttnProcessor("tile", backend="reference", strict=True))
    with pytest.raises(LayoutError, match=r"diffaccel\.apply"):
        run(model, inputs)


def _capture_module_calls(model: torch.nn.Module, inputs: dict) -> dict[str, tuple[tuple, dict]]:
    """The arguments each attention module received during one stock forward."""
    captured: dict[str, tuple[tuple, dict]] = {}
    handles = []
    for name, module in attention_modules(model).items():
        def hook(mod, args, kwargs, name=name):
            captured.setdefault(name, (args, dict(kwargs)))
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    run(model, inputs)
    for h in handles:
        h.remove()
    return captured


@pytest.mark.parametrize("name", ["sd3", "sd35", "flux"])
def test_module_outputs_match_stock_structure(name: str) -> None:
    """Each attention module returns what its stock processor returns: a (image, text) pair for joint calls (text
    without ``to_add_out`` in SD3's ``context_pre_only`` block), one tensor for image-only and single-stream calls."""
    model, inputs = build(name, "non-square")
    captured = _capture_module_calls(model, inputs)
    modules = attention_modules(model)
    with torch.no_grad():
        expected = {n: modules[n](*a, **k) for n, (a, k) in captured.items()}
        diffaccel.apply(model, "dense")
        run(model, inputs)  # fills the run context (grid, text length)
        got = {n: modules[n](*a, **k) for n, (a, k) in captured.items()}
    kinds = set()
    for n in captured:
        exp, out = expected[n], got[n]
        assert type(exp) is type(out), n
        if isinstance(exp, tuple):
            kinds.add("pair")
            assert len(exp) == len(out) == 2, n
            for e, o in zip(exp, out, strict=True):
                assert max_abs_diff(e, o) == 0.0, n
        else:
            kinds.add("single")
            assert max_abs_diff(exp, out) == 0.0, n
    assert kinds == ({"pair"} if name == "sd3" else {"pair", "single"})


def test_sd3_context_pre_only_block_is_covered() -> None:
    model = tiny_sd3()
    last = model.transformer_blocks[-1].attn
    assert last.context_pre_only and last.to_add_out is None
    assert not model.transformer_blocks[0].attn.context_pre_only


def test_sd3_fused_projections_equal_stock() -> None:
    model = tiny_sd3()
    model.fuse_qkv_projections()
    assert type(model.transformer_blocks[0].attn.processor).__name__ == "FusedJointAttnProcessor2_0"
    inputs = sd3_inputs(8, 12)
    reference = run(model, inputs)
    diffaccel.apply(model, "dense")
    assert max_abs_diff(run(model, inputs), reference) == 0.0


def test_flux_fused_projections_equal_stock() -> None:
    model = tiny_flux()
    inputs = flux_inputs(4, 6)
    unfused = run(model, inputs)
    model.fuse_qkv_projections()
    assert all(m.fused_projections for m in attention_modules(model).values())
    reference = run(model, inputs)
    assert max_abs_diff(reference, unfused) <= TOL  # stock fused vs stock unfused: other matmul shapes, not bitwise
    method = CountingDense()
    diffaccel.apply(model, method)
    assert max_abs_diff(run(model, inputs), reference) == 0.0
    assert len(method.calls) == 2


def test_flux_deprecated_batched_ids_equal_stock() -> None:
    model = tiny_flux(guidance_embeds=True)
    inputs = flux_inputs(4, 6, guidance=True)
    inputs["img_ids"] = inputs["img_ids"].expand(2, -1, -1)
    inputs["txt_ids"] = inputs["txt_ids"].expand(2, -1, -1)
    reference = run(model, inputs)
    processor = diffaccel.apply(model, "dense")
    assert max_abs_diff(run(model, inputs), reference) == 0.0
    assert processor.context.grid == (4, 6) and processor.context.text_len == TEXT_LEN


def test_flux_single_stream_text_length_without_hook() -> None:
    """A single-stream call with no hook and no double-stream call before it cannot know its text length."""
    model = tiny_flux()
    single = model.single_transformer_blocks[0].attn
    x = torch.randn(2, TEXT_LEN + 16, model.inner_dim)
    rope = model.pos_embed(torch.cat([torch.zeros(TEXT_LEN, 3), flux_image_ids(4, 4)]))
    with torch.no_grad():
        expected = single(x, image_rotary_emb=rope)
        single.set_processor(diffaccel.DiffAccelAttnProcessor("dense"))
        assert max_abs_diff(single(x, image_rotary_emb=rope), expected) == 0.0  # dense needs no text length
        single.set_processor(diffaccel.DiffAccelAttnProcessor("tile", backend="reference", strict=True))
        with pytest.raises(LayoutError, match=r"diffaccel\.apply"):
            single(x, image_rotary_emb=rope)
        # With the text length known (as the hook or a double-stream call records it) the call is exact.
        single.set_processor(diffaccel.DiffAccelAttnProcessor("dense", context=RunContext(text_len=TEXT_LEN)))
        assert max_abs_diff(single(x, image_rotary_emb=rope), expected) == 0.0


def test_flux_mask_and_inconsistent_calls() -> None:
    """A (batch, keys) mask is widened as diffusers' native backend does; a double-stream module without text fails."""
    model = tiny_flux()
    double = model.transformer_blocks[0].attn
    x, text = torch.randn(2, 16, model.inner_dim), torch.randn(2, TEXT_LEN, model.inner_dim)
    mask = torch.ones(2, TEXT_LEN + 16, dtype=torch.bool)
    mask[1, :2] = False
    with torch.no_grad():
        expected = double(x, text, attention_mask=mask)
        double.set_processor(diffaccel.DiffAccelAttnProcessor("dense"))
        for e, o in zip(expected, double(x, text, attention_mask=mask), strict=True):
            assert max_abs_diff(e, o) == 0.0
        with pytest.raises(LayoutError, match="encoder_hidden_states"):
            double(x)


@pytest.mark.parametrize(
    ("ids", "count", "match"),
    [
        (flux_image_ids(4, 6), 20, "image tokens"),
        (torch.cat([flux_image_ids(2, 3), flux_image_ids(2, 3)]), 12, "Kontext"),
        (flux_image_ids(6, 4)[:, [0, 2, 1]], 24, "row-major"),
        (torch.zeros(24), 24, "shaped"),
    ],
)
def test_flux_grid_rejects_bad_ids(ids: torch.Tensor, count: int, match: str) -> None:
    with pytest.raises(LayoutError, match=match):
        flux_grid(ids, count)


def test_flux_grid_reads_rows_and_cols() -> None:
    assert flux_grid(flux_image_ids(3, 5), 15) == (3, 5)
    assert flux_grid(flux_image_ids(3, 5)[None].expand(2, -1, -1), 15) == (3, 5)
    assert flux_grid(flux_image_ids(3, 5) * 2 + 7, 15) == (3, 5)  # offsets and strides do not matter


def _hunyuan_double_stream_attention() -> Attention:
    return HunyuanVideoTransformerBlock(num_attention_heads=2, attention_head_dim=8, mlp_ratio=1.0).attn


def test_joint_inference_rule_is_sd3_only() -> None:
    """SD3's joint Attention and HunyuanVideo's are built alike; only the call (RoPE) tells them apart."""
    sd3_attn = tiny_sd3(sd35=True).transformer_blocks[0].attn
    hunyuan_attn = _hunyuan_double_stream_attention()
    x, text = torch.randn(1, 4, 16), torch.randn(1, 3, 16)
    plain = AttentionCall(hidden_states=x, encoder_hidden_states=text)
    rope = (torch.ones(7, 8), torch.zeros(7, 8))
    with_rope = AttentionCall(hidden_states=x, encoder_hidden_states=text, image_rotary_emb=rope)

    assert _joint_attention(sd3_attn, plain) == "JointAttnProcessor2_0"
    assert stock_processor_name(sd3_attn, plain) == "JointAttnProcessor2_0"
    assert _joint_attention(hunyuan_attn, with_rope) is None
    assert _joint_attention(sd3_attn, None) is None  # no call, no guess
    # AuraFlow's joint attention: bias-free projections.
    auraflow_like = Attention(query_dim=16, added_kv_proj_dim=16, dim_head=8, heads=2, out_dim=16, bias=False,
                              context_pre_only=False)
    assert _joint_attention(auraflow_like, plain) is None
    # SD3.5's image-only attn2 is plain attention (no text projections): not a joint module.
    assert _joint_attention(tiny_sd3(sd35=True).transformer_blocks[0].attn2, plain) is None
    try:
        name = stock_processor_name(hunyuan_attn, with_rope)
    except diffaccel.UnsupportedModelError:
        name = None
    assert name != "JointAttnProcessor2_0"
