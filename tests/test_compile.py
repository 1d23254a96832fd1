"""diffaccel under torch.compile(fullgraph=True), regional compilation and torch.export (issue 11, item 1).

Every registered method runs inside the opaque ``diffaccel::attend`` op (diffaccel/pipelines/compile_ops.py), so
one compiled graph of a denoiser serves every method: the tests compile once per family and swap the processor's
method, checking the compiled output against eager and that the method itself (not a dense fallback) ran.
``backend="eager"``/``"aot_eager"`` keep them fast; the FX graph is what matters here.
"""

from __future__ import annotations

import pytest
import torch

import diffaccel
from diffaccel.bench.compat import method_kwargs as compat_method_kwargs
from diffaccel.errors import LayoutError
from diffaccel.methods.base import get_method, list_methods, method_parameters
from diffaccel.pipelines.compile_ops import decode_layout, encode_layout, layer_token, token_name
from diffaccel.layout import TokenLayout
from tests.paro_helpers import make_plan

FLUX_LAYERS = ("transformer_blocks.0.attn", "transformer_blocks.1.attn", "single_transformer_blocks.0.attn",
               "single_transformer_blocks.1.attn")
WAN_LAYERS = ("blocks.0.attn1", "blocks.1.attn1")
REFUSED = {("flux", "tile"): "tile: attention tiles need a video grid"}
"""Cells where the method itself refuses the model (eagerly as well as compiled): the same clear error."""


class CountingBackend:
    """A dynamo backend that runs the graph eagerly and counts the graphs compiled."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs += 1
        return gm.forward


def method_kwargs(name: str, family: str) -> dict:
    return compat_method_kwargs(name, softpag_layer=(FLUX_LAYERS if family == "flux" else WAN_LAYERS)[0])


def build_method(name: str, family: str):
    method = get_method(name, **method_kwargs(name, family))
    if name == "paro":
        if family == "flux":
            plan = make_plan(grid=(8, 8), text_len=8, text_first=True, layers=FLUX_LAYERS, steps=1, num_buckets=1)
        else:
            plan = make_plan(grid=(3, 4, 4), text_len=0, text_first=True, layers=WAN_LAYERS, steps=1, num_buckets=1)
        method.set_plan(plan)
    return method


def denoiser_inputs(family: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    if family == "flux":
        from diffusers import FluxPipeline

        return dict(hidden_states=torch.randn(1, 64, 16, generator=g),
                    encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                    pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                    img_ids=FluxPipeline._prepare_latent_image_ids(1, 8, 8, "cpu", torch.float32),
                    txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]), return_dict=False)
    return dict(hidden_states=torch.randn(1, 16, 3, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(1, 8, 32, generator=g), timestep=torch.tensor([500.0]),
                return_dict=False)


def tiny_denoiser(family: str, **overrides) -> torch.nn.Module:
    from diffaccel.pipelines.tiny import sharpen_attention

    torch.manual_seed(0)
    if family == "flux":
        from diffusers import FluxTransformer2DModel

        cfg = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                   axes_dims_rope=(4, 6, 6))
        model = FluxTransformer2DModel(**{**cfg, **overrides})
    else:
        from diffusers import WanTransformer3DModel

        cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16,
                   out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
                   qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
        model = WanTransformer3DModel(**{**cfg, **overrides})
    sharpen_attention(model)
    return model.eval()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_layer_token_and_layout_codec_round_trip():
    for name in ("blocks.0.attn1", "single_transformer_blocks.37.attn", "ü" * 10):
        t = layer_token(name)
        assert t.shape == (192,) and t.dtype == torch.uint8
        assert token_name(t) == name
    with pytest.raises(LayoutError, match="longer than"):
        layer_token("x" * 200)
    for layout in (TokenLayout(72, (8, 8), text=slice(0, 8)), TokenLayout(192, (3, 8, 8)),
                   TokenLayout(64, None, is_cross=True, num_keys=8),
                   TokenLayout(70, (8, 8), text=slice(64, 70), text_lengths=(6, 4), downsample=2,
                               hierarchical=True, finest_downsample=1)):
        assert decode_layout(encode_layout(layout)) == layout


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_every_method_runs_in_one_fullgraph_compiled_denoiser(family):
    model = tiny_denoiser(family)
    kw = denoiser_inputs(family)
    processor = diffaccel.apply(model, "dense")
    if family == "flux":
        diffaccel.set_grid(model, (8, 8))
    backend = CountingBackend()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    ran, graphs = [], []
    for name in list_methods():
        processor.method = build_method(name, family)
        refused = REFUSED.get((family, name))
        if refused is not None:
            with torch.no_grad(), pytest.raises(Exception, match=refused):
                compiled(**kw)
            with torch.no_grad(), pytest.raises(Exception, match=refused):
                model(**kw)
            continue
        counts = getattr(processor.method, "call_counts", None)
        with torch.no_grad():
            eager = model(**kw)[0]
            eager_counts = None if counts is None else (counts.method, counts.dense)
            out = compiled(**kw)[0]
        assert torch.isfinite(out).all(), name
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5, msg=f"{family}/{name}")
        if counts is not None:  # the compiled call ran what the eager call ran (method or dense, per layer)
            assert (counts.method - eager_counts[0], counts.dense - eager_counts[1]) == eager_counts, name
            if counts.method:
                ran.append(name)
        graphs.append(backend.graphs)
    # the method is opaque: the graphs of the first call (the pre-hook's frame and the forward) serve every method
    assert graphs == [graphs[0]] * len(graphs) and graphs[0] <= 2, graphs
    assert {"gna", "msw", "clear", "agent", "vmoba", "paro"} <= set(ran) | {n for f, n in REFUSED if f == family}


@pytest.mark.parametrize("positional", [False, True])
def test_compiled_step_state_is_recorded_at_run_time(positional):
    """Python side effects of a traced hook would land after the graph: the step must be the call's own (with
    AOTAutograd, which would drop a recording op whose output the model does not consume)."""
    model = tiny_denoiser("wan")
    processor = diffaccel.apply(model, "dense")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if positional else "eager")
    seen = []

    class Spy:
        config = object()

        def __call__(self, q, k, v, layout, ctx, *, attn_mask=None, scale=None):
            seen.append((ctx.step, float(ctx.timestep), ctx.layer, layout.grid))
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)

    processor.method = Spy()
    with torch.no_grad():
        for t in (900.0, 500.0):
            kw = {**denoiser_inputs("wan"), "timestep": torch.tensor([t])}
            if positional:
                compiled(kw.pop("hidden_states"), **kw)
            else:
                compiled(**kw)
    self_calls = [s for s in seen if s[3] is not None]
    assert [s[:3] for s in self_calls] == [(0, 900.0, "blocks.0.attn1"), (0, 900.0, "blocks.1.attn1"),
                                           (1, 500.0, "blocks.0.attn1"), (1, 500.0, "blocks.1.attn1")]
    assert all(s[3] == (3, 4, 4) for s in self_calls)


def test_flux_compiled_without_an_announced_grid_is_a_clear_error_not_a_guess():
    model = tiny_denoiser("flux")
    diffaccel.apply(model, "gna", kernel_size=3, block_size=16, backend="reference")
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="set_grid"):
        compiled(**denoiser_inputs("flux"))
    diffaccel.set_grid(model, (4, 16))  # the wrong grid for 8x8 ids of the same count is not checked by values,
    # but a grid of another token count is refused by shape:
    diffaccel.set_grid(model, (4, 4))
    torch._dynamo.reset()
    with pytest.raises(Exception, match="does not describe this call"):
        compiled(**denoiser_inputs("flux"))
    with pytest.raises(ValueError, match="grid must be"):
        diffaccel.set_grid(model, (8, 0))


def test_pipeline_announces_the_flux_grid_to_a_compiled_transformer():
    from diffaccel.pipelines.tiny import build_tiny, tiny_spec

    pipe = build_tiny("tiny-flux")
    diffaccel.apply(pipe, "gna", kernel_size=3, block_size=16, backend="reference")
    kwargs = tiny_spec("tiny-flux").call_kwargs(num_inference_steps=1, output_type="latent", width=32)  # 16x8
    with torch.no_grad():
        eager = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
        pipe.transformer = torch.compile(pipe.transformer, fullgraph=True, backend="eager")
        compiled = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert pipe.transformer._orig_mod.__dict__["_diffaccel_grid"] == (16, 8)
    diffaccel.remove(pipe)
    assert "_prepare_latent_image_ids" not in pipe.__dict__


def test_regional_compile_reuses_one_block_graph_on_24_blocks():
    model = tiny_denoiser("wan", num_layers=24)
    diffaccel.apply(model, "gna", kernel_size=3, block_size=16, backend="reference")
    kw = denoiser_inputs("wan")
    with torch.no_grad():
        eager = model(**kw)[0]
    backend = CountingBackend()
    limit = torch._dynamo.config.recompile_limit
    model.compile_repeated_blocks(fullgraph=True, backend=backend)
    with torch.no_grad():
        out = model(**kw)[0]
        out2 = model(**{**kw, "timestep": torch.tensor([400.0])})[0]
    assert backend.graphs == 1, f"{backend.graphs} block graphs for 24 blocks (per-layer guards)"
    assert torch._dynamo.config.recompile_limit == limit
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out2).all()
    assert model.__dict__["_diffaccel_installation"].processor.method.call_counts.method == 72  # eager + 2 compiled calls x 24 blocks


def test_regional_compile_flux_compiles_as_many_block_graphs_as_stock():
    """FLUX's first single-stream block gets a differently strided input (one recompile in stock diffusers too);
    diffaccel adds none, whatever the number of blocks."""
    kw = denoiser_inputs("flux")
    graphs = {}
    for method in (None, "msw"):
        torch._dynamo.reset()
        model = tiny_denoiser("flux", num_layers=3, num_single_layers=5)
        if method is not None:
            diffaccel.apply(model, method, block_size=16, backend="reference")
            diffaccel.set_grid(model, (8, 8))
        with torch.no_grad():
            eager = model(**kw)[0]
        backend = CountingBackend()
        model.compile_repeated_blocks(fullgraph=True, backend=backend)
        with torch.no_grad():
            out = model(**kw)[0]
        graphs[method] = backend.graphs
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    assert graphs["msw"] == graphs[None] <= 3, graphs


def test_export_of_a_denoiser_with_a_static_method():
    model = tiny_denoiser("wan")
    diffaccel.apply(model, "tile", block_size=16, backend="reference")
    kw = denoiser_inputs("wan")
    with torch.no_grad():
        eager = model(**kw)[0]
        exported = torch.export.export(model, (), {k: v for k, v in kw.items() if k != "return_dict"}
                                       | {"return_dict": False}, strict=True)
        targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
        assert "diffaccel.attend.default" in targets
        out = exported.module()(**kw)[0]
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


def test_triton_statistics_kernels_are_opaque_custom_ops_under_fullgraph():
    from diffaccel.kernels import attention_with_lse, block_attention_mass
    from diffaccel.kernels import ops
    from diffaccel.kernels.reference import attention_with_lse_reference, block_attention_mass_reference

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(3))
    torch.library.opcheck(ops.attention_with_lse_op, (q, k, v, 0.25))
    lse = attention_with_lse_reference(q, k, v, scale=0.25)[1]
    torch.library.opcheck(ops.block_attention_mass_op, (q, k, lse, 16, 16, 0.25))

    def stats(q, k, v):
        out, lse = attention_with_lse(q, k, v, scale=0.25)
        return out, lse, block_attention_mass(q, k, lse, 16, scale=0.25)

    backend = CountingBackend()
    got = torch.compile(stats, fullgraph=True, backend=backend)(q, k, v)
    ref_out, ref_lse = attention_with_lse_reference(q, k, v, scale=0.25)
    ref_mass = block_attention_mass_reference(q, k, ref_lse, (16, 16), scale=0.25)
    for a, b in zip(got, (ref_out, ref_lse, ref_mass)):
        assert not torch.isnan(a).any()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert backend.graphs == 1
    gm = torch.export.export(_Stats(), (q, k, v)).graph
    targets = {str(n.target) for n in gm.nodes if n.op == "call_function"}
    assert {"diffaccel.attention_with_lse.default", "diffaccel.block_attention_mass.default"} <= targets


class _Stats(torch.nn.Module):
    def forward(self, q, k, v):
        from diffaccel.kernels import attention_with_lse, block_attention_mass

        out, lse = attention_with_lse(q, k, v, scale=0.25)
        return out, block_attention_mass(q, k, lse, 16, scale=0.25)
