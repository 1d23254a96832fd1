"""The recent families (FLUX.2, FLUX.3, Qwen-Image, HunyuanVideo-1.5, LTX-2, Z-Image) through routed adapters.

Each tiny transformer is built from a config and called directly with non-square grids, batch 2 (the batch of
classifier-free guidance), padded prompts and video grids whose F, H, W all differ. Checked here: dense through
diffaccel equals stock exactly (the stock processor runs, so the difference is 0), the layout each call hands the
method (text placement and valid lengths, the grid with the model's patching), that the interception leaves
diffusers untouched (module globals, processors, other models), and that every registered method runs on each.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch

import diffaccel
from diffaccel.errors import ConfigError, UnsupportedModelError
from diffaccel.methods.base import get_method, list_methods
from diffaccel.pipelines.adapters import dispatch as routed
from diffaccel.pipelines.adapters.base import supported_processors
from diffaccel.pipelines.hooks import attention_modules

B = 2
H, W, T = 3, 5, 7  # image token grid (non-square) and prompt length
F_, HV, WV = 2, 3, 4  # video token grid, all different


@dataclass
class Case:
    name: str
    build: Callable[[], tuple[torch.nn.Module, dict[str, Any]]]


def _ids4(*sizes: int) -> torch.Tensor:
    return torch.cartesian_prod(*(torch.arange(s) for s in sizes))


def _flux2():
    from diffusers import Flux2Transformer2DModel

    m = Flux2Transformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=32,
                                axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
    kw = dict(hidden_states=torch.randn(B, H * W, 8), encoder_hidden_states=torch.randn(B, T, 32),
              timestep=torch.tensor([0.5, 0.5]), img_ids=_ids4(1, H, W, 1).expand(B, -1, -1),
              txt_ids=_ids4(1, 1, 1, T).expand(B, -1, -1))
    return m, kw


def _flux3():
    from diffusers import Flux3Transformer2DModel

    m = Flux3Transformer2DModel(in_channels=8, cond_in_channels=8, num_layers=1, num_single_layers=1,
                                attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                timestep_channels=32, axes_dims_rope=(4, 4, 4, 4))
    kw = dict(hidden_states=torch.randn(B, H * W, 8), encoder_hidden_states=torch.randn(B, T, 32),
              timestep=torch.tensor([0.5, 0.5]), img_ids=_ids4(1, H, W, 1), txt_ids=_ids4(1, 1, 1, T))
    return m, kw


def _qwen():
    from diffusers import QwenImageTransformer2DModel

    m = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                                    num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0  # the second prompt is padded after 4 tokens
    kw = dict(hidden_states=torch.randn(B, H * W, 16), encoder_hidden_states=torch.randn(B, T, 32),
              encoder_hidden_states_mask=mask, timestep=torch.tensor([0.5, 0.5]), img_shapes=[[(1, H, W)]] * B)
    return m, kw


def _hv15():
    from diffusers import HunyuanVideo15Transformer3DModel

    m = HunyuanVideo15Transformer3DModel(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                         num_layers=2, num_refiner_layers=1, text_embed_dim=32, text_embed_2_dim=24,
                                         image_embed_dim=20, rope_axes_dim=(4, 6, 6), target_size=16, task_type="t2v")
    em = torch.ones(B, 7, dtype=torch.long)
    em[1, 5:] = 0
    em2 = torch.ones(B, 5, dtype=torch.long)
    em2[0, 3:] = 0
    kw = dict(hidden_states=torch.randn(B, 9, F_, HV, WV), timestep=torch.tensor([500.0, 500.0]),
              encoder_hidden_states=torch.randn(B, 7, 32), encoder_attention_mask=em,
              encoder_hidden_states_2=torch.randn(B, 5, 24), encoder_attention_mask_2=em2,
              image_embeds=torch.zeros(B, 6, 20))
    return m, kw


def _ltx2():
    from diffusers import LTX2VideoTransformer3DModel

    m = LTX2VideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
                                    attention_head_dim=8, cross_attention_dim=16, audio_in_channels=4,
                                    audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=4,
                                    audio_cross_attention_dim=8, num_layers=1, caption_channels=16)
    # as many audio as video tokens, so only the module (not the token count) tells audio from video attention
    audio = F_ * HV * WV
    kw = dict(hidden_states=torch.randn(B, F_ * HV * WV, 8), audio_hidden_states=torch.randn(B, audio, 4),
              encoder_hidden_states=torch.randn(B, T, 16), audio_encoder_hidden_states=torch.randn(B, T, 16),
              timestep=torch.tensor([500.0, 500.0]), num_frames=F_, height=HV, width=WV, audio_num_frames=audio)
    return m, kw


def _z_image():
    from diffusers import ZImageTransformer2DModel

    m = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2,
                                 n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=24, axes_dims=(4, 6, 6),
                                 axes_lens=(256, 32, 32))
    # 4 x 8 image tokens (a multiple of 32: no image padding); captions of 9 and 40 tokens pad to 32 and 64
    kw = dict(x=[torch.randn(4, 1, 8, 16) for _ in range(B)], t=torch.tensor([0.5, 0.5]),
              cap_feats=[torch.randn(9, 24), torch.randn(40, 24)])
    return m, kw


CASES = [Case("flux2", _flux2), Case("flux3", _flux3), Case("qwenimage", _qwen), Case("hunyuan_video15", _hv15),
         Case("ltx2", _ltx2), Case("z_image", _z_image)]


def _output(model, kw) -> torch.Tensor:
    with torch.no_grad():
        out = model(**kw, return_dict=False)
    first = out[0]
    return torch.stack(first) if isinstance(first, list) else torch.cat([o.flatten() for o in out if o is not None])


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(case: Case):
        if case.name not in cache:
            torch.manual_seed(0)
            model, kw = case.build()
            cache[case.name] = (model.eval(), kw)
        return cache[case.name]

    return get


class Recorder:
    """Dense attention that records (layer, layout, mask) of every call and checks diffusers stays untouched."""

    def __init__(self):
        self.dense = get_method("dense")
        self.config = self.dense.config
        self.calls: list[tuple[str, Any, Any]] = []

    def __call__(self, q, k, v, layout, ctx, *, attn_mask=None, scale=None):
        self.calls.append((ctx.layer, layout, attn_mask))
        return self.dense(q, k, v, layout, ctx, attn_mask=attn_mask, scale=scale)

    def by_layer(self) -> dict[str, list]:
        out: dict[str, list] = {}
        for layer, layout, mask in self.calls:
            out.setdefault(layer, []).append((layout, mask))
        return out


def _record(model, kw) -> Recorder:
    rec = Recorder()
    processor = diffaccel.apply(model, "dense")
    processor.method = rec
    try:
        _output(model, kw)
    finally:
        diffaccel.remove(model)
    assert rec.calls
    return rec


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_dense_equals_stock_and_remove_restores(built, case):
    model, kw = built(case)
    stock_processors = {n: m.processor for n, m in attention_modules(model).items()}
    stock = _output(model, kw)
    diffaccel.apply(model, "dense")
    try:
        assert all(type(m.processor).__name__ == "DiffAccelAttnProcessor" for m in attention_modules(model).values())
        dense = _output(model, kw)
    finally:
        diffaccel.remove(model)
    assert torch.isfinite(stock).all()
    assert torch.equal(dense, stock), float((dense - stock).abs().max())  # the stock code runs: exactly 0
    assert {n: m.processor for n, m in attention_modules(model).items()} == stock_processors
    assert torch.equal(_output(model, kw), stock)


def test_flux2_layouts(built):
    rec = _record(*built(CASES[0]))
    layers = rec.by_layer()
    double = layers["transformer_blocks.0.attn"][0][0]
    single = layers["single_transformer_blocks.0.attn"][0][0]
    for layout in (double, single):
        assert layout.text == slice(0, T) and layout.grid == (H, W) and layout.num_tokens == T + H * W


def test_flux2_reference_image_tokens_run_dense(built):
    from diffaccel.pipelines.adapters.flux2 import grid_from_ids

    # target + a reference image placed below it (FLUX.2 offsets reference ids in t; rows alone would tile a grid)
    ids = torch.cat([_ids4(1, H, W, 1), _ids4(1, H, W, 1) + torch.tensor([10, H, 0, 0])])
    assert grid_from_ids(ids, 2 * H * W, row_axis=1, col_axis=2, time_axis=0, model="FLUX.2") is None
    assert grid_from_ids(_ids4(1, H, W, 1), H * W, row_axis=1, col_axis=2, time_axis=0, model="FLUX.2") == (H, W)
    column_major = _ids4(1, W, H, 1)[:, [0, 2, 1, 3]]
    assert grid_from_ids(column_major, H * W, row_axis=1, col_axis=2, time_axis=0, model="FLUX.2") is None


def test_flux3_layouts(built):
    layers = _record(*built(CASES[1])).by_layer()
    image = layers["mode_blocks.image.0.attn"][0][0]
    assert image.text is None and image.grid == (H, W)
    joint = layers["single_transformer_blocks.0.attn"][0][0]
    assert joint.text == slice(0, T) and joint.grid == (H, W)
    text_only = layers["txt_mode_blocks.0.attn"][0][0]
    assert text_only.grid is None  # text mode blocks stay dense


def test_qwen_layouts_turn_the_prompt_mask_into_valid_lengths(built):
    layers = _record(*built(CASES[2])).by_layer()
    layout, mask = layers["transformer_blocks.0.attn"][0]
    assert layout.text == slice(0, T) and layout.grid == (H, W)
    assert layout.text_lengths == (T, 4)
    assert mask.shape == (B, 1, 1, T + H * W) and not bool(mask[1, 0, 0, 4:T].any()) and bool(mask[0].all())


def test_qwen_grid_of_img_shapes():
    from diffaccel.pipelines.adapters.qwenimage import qwen_grid

    assert qwen_grid([[(1, 3, 5)], [(1, 3, 5)]]) == (3, 5)
    assert qwen_grid([[(2, 3, 5)]]) == (2, 3, 5)
    assert qwen_grid([[(1, 3, 5), (1, 4, 4)]]) is None  # edit: target + reference image in one sequence
    assert qwen_grid([(1, 3, 5)]) == (3, 5)


def test_hunyuan_video15_layouts(built):
    model, kw = built(CASES[3])
    layers = _record(model, kw).by_layer()
    layout, mask = layers["transformer_blocks.0.attn"][0]
    num_text = layout.num_text
    assert layout.grid == (F_, HV, WV) and layout.text == slice(F_ * HV * WV, F_ * HV * WV + num_text)
    assert num_text == 7 + 5 + 6  # LLM prompt, glyph prompt and image tokens, reordered valid-first by the model
    # valid tokens per row: row 0 has 7 + 3 (+ 0 image tokens in t2v), row 1 has 5 + 5
    assert layout.text_lengths == (10, 10)
    assert mask.shape == (B, 1, 1, layout.num_tokens)
    assert bool(mask[:, 0, 0, : F_ * HV * WV].all())
    refiner = [v for k, v in layers.items() if k.startswith("context_embedder")]
    assert refiner and all(lay.grid is None for entries in refiner for lay, _ in entries)


def test_ltx2_video_self_attention_only(built):
    layers = _record(*built(CASES[4])).by_layer()
    video = layers["transformer_blocks.0.attn1"][0][0]
    assert video.grid == (F_, HV, WV) and video.text is None
    for name in ("audio_attn1", "attn2", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn"):
        layout = layers[f"transformer_blocks.0.{name}"][0][0]
        assert layout.grid is None, name
    assert layers["transformer_blocks.0.attn2"][0][0].is_cross


def test_z_image_layouts(built):
    layers = _record(*built(CASES[5])).by_layer()
    main, mask = layers["layers.0.attention"][0]
    assert main.grid == (4, 8) and main.text == slice(32, 32 + 64)
    assert main.text_lengths == (32, 64)  # the 9-token caption pads to 32, the batch to 64
    noise, _ = layers["noise_refiner.0.attention"][0]
    assert noise.grid is None  # the refiners stay dense: one token geometry for the method's layers
    assert all(lay.grid is None for lay, _ in layers["context_refiner.0.attention"])


def test_interception_leaves_diffusers_untouched(built):
    """The module global stays diffusers' dispatcher during a routed call; another model runs stock meanwhile."""
    import diffusers.models.transformers.transformer_flux2 as flux2_module
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    model, kw = built(CASES[0])
    torch.manual_seed(0)
    other, _ = _flux2()
    other.eval()
    expected_other = _output(other, kw)
    seen = []

    class Probe(Recorder):
        def __call__(self, q, k, v, layout, ctx, *, attn_mask=None, scale=None):
            seen.append(flux2_module.dispatch_attention_fn is dispatch_attention_fn)
            seen.append(torch.equal(_output(other, kw), expected_other))  # re-entrant: a stock model inside a call
            return super().__call__(q, k, v, layout, ctx, attn_mask=attn_mask, scale=scale)

    processor = diffaccel.apply(model, "dense")
    processor.method = Probe()
    try:
        _output(model, kw)
    finally:
        diffaccel.remove(model)
    assert seen and all(seen)
    assert flux2_module.dispatch_attention_fn is dispatch_attention_fn


def test_threads_do_not_share_routes(built):
    model, kw = built(CASES[2])
    stock = _output(model, kw)
    diffaccel.apply(model, "dense")
    results: list[torch.Tensor] = []
    try:
        threads = [threading.Thread(target=lambda: results.append(_output(model, kw))) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        diffaccel.remove(model)
    assert len(results) == 3 and all(torch.equal(r, stock) for r in results)


class _TwoCallProcessor:
    """A processor that calls the dispatcher twice (like an IP-adapter branch): self- plus extra-context attention."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        q = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
        k = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        first = dispatch_attention_fn(q, k, v, backend=self._attention_backend)  # noqa: F821 (module global)
        second = dispatch_attention_fn(q, v, k, backend=self._attention_backend)  # noqa: F821
        return attn.to_out[0]((first + 0.5 * second).flatten(2, 3))


def test_several_dispatch_calls_in_one_processor_call():
    from diffusers.models.attention_dispatch import dispatch_attention_fn as stock_dispatch
    from diffusers.models.attention_processor import Attention

    from diffaccel.context import RunContext
    from diffaccel.layout import TokenLayout
    from diffaccel.pipelines.adapters.base import AttentionCall

    _TwoCallProcessor.__call__.__globals__["dispatch_attention_fn"] = stock_dispatch
    seen = []

    class TwoCallAdapter(routed.RoutedAdapter):
        def layout(self, attn, call, ctx, query, key, attn_mask, index):
            seen.append(index)
            return TokenLayout(num_tokens=query.shape[1], grid=(2, 3)), attn_mask

    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    stock = _TwoCallProcessor()
    attn.__dict__["_diffaccel_stock_processor"] = stock
    x = torch.randn(B, 6, 16)
    with torch.no_grad():
        expected = stock(attn, x)
        got = TwoCallAdapter().run_stock(attn, AttentionCall(hidden_states=x), RunContext(), get_method("dense"))
    assert seen == [0, 1]
    assert torch.equal(got, expected)
    assert _TwoCallProcessor.__call__.__globals__["dispatch_attention_fn"] is stock_dispatch


def test_calls_methods_cannot_take_run_stock_attention():
    q = torch.randn(1, 4, 2, 8)
    route_call = routed.Route(None, torch.nn.Identity(), None, None, None, None)
    with pytest.warns(UserWarning, match="is_causal"):
        out = routed.routed_dispatch(q, q, q, is_causal=True, backend=route_call)
    expected = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, q, q)), is_causal=True)
    assert torch.equal(out, expected.transpose(1, 2))
    # any other backend value goes to diffusers' dispatcher unchanged
    plain = routed.routed_dispatch(q, q, q)
    assert torch.equal(plain, torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in (q, q, q))).transpose(1, 2))


def test_processor_without_dispatch_cannot_be_routed():
    from diffusers.models.attention_processor import AttnProcessor

    with pytest.raises(UnsupportedModelError, match="dispatch_attention_fn"):
        routed.routed_function(AttnProcessor)


def test_unsupported_processor_lists_the_supported_ones():
    from diffusers.models.transformers.transformer_flux2 import Flux2KVAttnProcessor

    model, kw = _flux2()
    model.transformer_blocks[0].attn.set_processor(Flux2KVAttnProcessor())
    with pytest.raises(UnsupportedModelError) as info:
        diffaccel.apply(model, "dense")
    message = str(info.value)
    assert "Flux2KVAttnProcessor" in message
    for name in ("Flux2AttnProcessor", "QwenDoubleStreamAttnProcessor2_0", "ZSingleStreamAttnProcessor",
                 "LTX2AudioVideoAttnProcessor", "HunyuanVideo15AttnProcessor2_0", "Flux3AttnProcessor"):
        assert name in message and name in supported_processors()


@pytest.mark.parametrize("index", [0, 2, 5], ids=["flux2", "qwenimage", "z_image"])
def test_bare_set_attn_processor_runs_the_stock_processor(built, index):
    model, kw = built(CASES[index])
    stock = _output(model, kw)
    modules = attention_modules(model)
    saved = {name: m.processor for name, m in modules.items()}
    bare = diffaccel.DiffAccelAttnProcessor("dense")
    for m in modules.values():
        m.set_processor(bare)  # what set_attn_processor does (Z-Image's model has no set_attn_processor)
    try:
        out = _output(model, kw)
    finally:
        for name, m in modules.items():
            m.set_processor(saved[name])
    assert torch.equal(out, stock)


SPARSE_OPTIONS = {"backend": "reference"}
NEEDS_A_PIPELINE = {"paro"}
NOT_APPLICABLE = {"tile": {"flux2", "flux3", "qwenimage", "z_image"}, "softpag": {"z_image"}}
"""tile needs a video grid; SoftPAG's denoiser wrapper knows one latent batch (Z-Image passes a list of latents):
test_methods_that_do_not_apply_say_so. LTX-2's second (audio) batch is combined too: test_softpag_on_ltx2_*."""
SOFTPAG_LAYER = {"flux2": "transformer_blocks.0.attn", "flux3": "single_transformer_blocks.0.attn",
                 "qwenimage": "transformer_blocks.0.attn", "hunyuan_video15": "transformer_blocks.0.attn",
                 "ltx2": "transformer_blocks.0.attn1", "z_image": "layers.0.attention"}
"""PARO runs from a plan calibrated on a pipeline's prompt: covered by tests/test_pipelines_families.py."""


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_method_runs(built, case):
    """Every registered method runs on each family through the layout alone (finite output, right shape)."""
    model, kw = built(case)
    stock = _output(model, kw)
    ran = []
    for name in list_methods():
        if name in NEEDS_A_PIPELINE or case.name in NOT_APPLICABLE.get(name, ()):
            continue
        options = dict(SPARSE_OPTIONS) if "backend" in _fields(name) else {}
        if name == "softpag":  # no published SoftPAG layer for these families: the first self-attention
            options["layers"] = [SOFTPAG_LAYER[case.name]]
        with torch.no_grad():
            try:
                diffaccel.apply(model, name, **options)
                out = _output(model, kw)
            finally:
                diffaccel.remove(model)
        assert out.shape == stock.shape and torch.isfinite(out).all(), name
        ran.append(name)
    assert set(ran) == {m for m in list_methods() if m not in NEEDS_A_PIPELINE and case.name not in
                        NOT_APPLICABLE.get(m, ())}


@pytest.mark.parametrize("method,family,error", [("tile", "flux2", "video grid"), ("tile", "flux3", "video grid"),
                                                 ("softpag", "z_image", "latent batch")])
def test_methods_that_do_not_apply_say_so(built, method, family, error):
    model, kw = built(next(c for c in CASES if c.name == family))
    options = {"layers": [SOFTPAG_LAYER[family]]} if method == "softpag" else {}
    with pytest.raises((ConfigError, UnsupportedModelError), match=error):
        try:
            diffaccel.apply(model, method, **options)
            _output(model, kw)
        finally:
            diffaccel.remove(model)


def _fields(name: str) -> set[str]:
    from diffaccel.methods.base import method_parameters

    return {row[0] for row in method_parameters(name)}


# ---------------------------------------------------------------------------------------------- SoftPAG on LTX-2


class _LTX2Pipe:
    """What SoftPAG reads of an ``LTX2Pipeline`` during a call: CFG on, a video and an audio CFG scale."""

    def __init__(self, transformer, video_cfg: float, audio_cfg: float, **flags: bool):
        self.transformer = transformer
        self.do_classifier_free_guidance = True
        self.guidance_scale = video_cfg
        self.audio_guidance_scale = audio_cfg
        self.guidance_rescale = 0.0
        self.do_spatio_temporal_guidance = flags.get("stg", False)
        self.do_modality_isolation_guidance = flags.get("modality", False)


def _softpag_ltx2(model, kw, video_cfg, audio_cfg, scale, **flags):
    from diffaccel.pipelines.guidance import enable_softpag

    pipe = _LTX2Pipe(model, video_cfg, audio_cfg, **flags)
    try:
        enable_softpag(pipe, layers=[SOFTPAG_LAYER["ltx2"]], scale=scale)
        with torch.no_grad():
            video, audio = model(**kw, return_dict=False)
    finally:
        diffaccel.remove(model)
    return video, audio


def test_softpag_on_ltx2_combines_video_and_audio_each_with_its_cfg_scale(built):
    """The audio prediction comes back with the pipeline's batch [uncond, cond] and its cond row moved by
    (s / audio_cfg)·(cond - perturbed), the video's by (s / video_cfg)·(cond - perturbed): the pipeline's
    uncond + cfg·(cond' - uncond) is then PAG on both streams. Before the fix the audio kept the tripled batch."""
    model, kw = built(CASES[4])
    with torch.no_grad():
        stock_video, stock_audio = model(**kw, return_dict=False)
    zero = _softpag_ltx2(model, kw, 2.0, 4.0, 0.0)
    for got, stock in zip(zero, (stock_video, stock_audio)):
        assert got.shape == stock.shape  # batch B, not B + B/2
        torch.testing.assert_close(got, stock, atol=1e-5, rtol=1e-5)
    a = _softpag_ltx2(model, kw, 2.0, 4.0, 1.0)
    b = _softpag_ltx2(model, kw, 4.0, 2.0, 1.0)
    for index, (scale_a, scale_b) in enumerate(((2.0, 4.0), (4.0, 2.0))):  # video, then audio
        stock = (stock_video, stock_audio)[index]
        delta_a, delta_b = a[index][1:] - stock[1:], b[index][1:] - stock[1:]
        assert torch.isfinite(delta_a).all() and float(delta_a.abs().max()) > 1e-4  # the perturbation reaches it
        torch.testing.assert_close(delta_a * scale_a, delta_b * scale_b, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a[index][:1], stock[:1], atol=1e-5, rtol=1e-5)  # uncond rows unchanged


def test_softpag_on_ltx2_combines_the_fields_of_its_output_object(built):
    """With ``return_dict=True`` the transformer returns ``AudioVisualModelOutput(sample, audio_sample)``: both
    fields are combined as in the tuple."""
    from diffaccel.pipelines.guidance import enable_softpag

    model, kw = built(CASES[4])
    expected = _softpag_ltx2(model, kw, 2.0, 4.0, 1.0)
    try:
        enable_softpag(_LTX2Pipe(model, 2.0, 4.0), layers=[SOFTPAG_LAYER["ltx2"]], scale=1.0)
        with torch.no_grad():
            out = model(**kw, return_dict=True)
    finally:
        diffaccel.remove(model)
    torch.testing.assert_close(out.sample, expected[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.audio_sample, expected[1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("flag,advice", [("stg", "stg_scale=0"), ("modality", "modality_scale=1")])
def test_softpag_on_ltx2_refuses_the_pipelines_extra_guidance_calls(built, flag, advice):
    model, kw = built(CASES[4])
    with pytest.raises(UnsupportedModelError, match=advice):
        _softpag_ltx2(model, kw, 3.0, 7.0, 1.0, **{flag: True})


def test_softpag_refuses_a_second_prediction_it_has_no_scale_for(built, monkeypatch):
    from diffaccel.pipelines import guidance

    monkeypatch.setattr(guidance, "SECOND_PREDICTION_CFG", {})
    model, kw = built(CASES[4])
    with pytest.raises(UnsupportedModelError, match="returns 2 predictions"):
        _softpag_ltx2(model, kw, 3.0, 7.0, 1.0)


def test_softpag_refuses_a_cfg_scale_it_cannot_fold_into(built):
    model, kw = built(CASES[4])
    with pytest.raises(ConfigError, match="audio_guidance_scale is 0.0"):
        _softpag_ltx2(model, kw, 3.0, 0.0, 1.0)


def test_paro_calibration_on_flux3_says_the_model_mixes_token_geometries(built):
    """FLUX.3's image mode blocks (no text) and joint blocks (text) share the grid but not the token set: one PARO
    plan cannot serve both, said as such (not "calibrate with one size", which would not help)."""
    from diffaccel.methods.paro_calibration import ParoCalibrator

    model, kw = built(CASES[1])
    diffaccel.apply(model, ParoCalibrator(num_steps=1))
    try:
        with pytest.raises(ConfigError, match=f"over {T} text tokens .*earlier layers over 0.*does not run on this"):
            _output(model, kw)
    finally:
        diffaccel.remove(model)


@pytest.mark.parametrize("name,options", [("gna", {"kernel_size": (3, 3)}), ("msw", {}), ("clear", {"radius": 2.0}),
                                          ("vmoba", {"dense_fraction": 0.0})])
def test_qwen_padded_prompt_runs_the_method_as_the_unpadded_prompt(built, name, options):
    """Qwen-Image's text is a prefix with a padded tail: the method runs on the valid tokens, laid out as the prompt
    cut to its valid length would be, so the padded row's image output equals that of the cut prompt."""
    import warnings

    model, kw = built(CASES[2])
    cut = dict(kw, hidden_states=kw["hidden_states"][1:], encoder_hidden_states=kw["encoder_hidden_states"][1:, :4],
               encoder_hidden_states_mask=None, timestep=kw["timestep"][1:], img_shapes=kw["img_shapes"][1:])
    outputs = []
    for inputs in (kw, cut):
        processor = diffaccel.apply(model, name, backend="reference", **options)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("error", message=".*runs dense")
                with torch.no_grad():
                    outputs.append(model(**inputs, return_dict=False)[0])
        finally:
            diffaccel.remove(model)
        assert processor.method.call_counts.method > 0 and processor.method.call_counts.dense == 0
    padded, unpadded = outputs
    assert torch.isfinite(padded).all()
    torch.testing.assert_close(padded[1:], unpadded, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("text_first", [True, False], ids=["prefix", "suffix"])
def test_attend_valid_text_with_dense_attention_is_the_masked_call(text_first):
    """With dense attention on the valid tokens, every row (valid and padding, text and visual) equals the stock
    key-padding-masked call: the gather, the padding queries and the reassembly are exact."""
    from diffaccel.layout import TokenLayout
    from diffaccel.methods._online import attend_valid_text
    from diffaccel.methods.base import sdpa

    nv, nt, length = 12, 5, 2
    n = nv + nt
    text = slice(0, nt) if text_first else slice(nv, n)
    layout = TokenLayout(num_tokens=n, grid=(3, 4), text=text)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 8) for _ in range(3))
    valid = torch.ones(n, dtype=torch.bool)
    valid[text.start + length: text.stop] = False
    seen = []

    def dense(a, b, c, sub):
        seen.append(sub)
        return sdpa(a, b, c)

    out = attend_valid_text(q, k, v, layout, length, None, dense)
    expected = sdpa(q, k, v, attn_mask=valid[None, None, None, :])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    (sub,) = seen
    assert sub.num_tokens == nv + length and sub.num_text == length and sub.text_first == text_first
