"""What adapters and the pipeline layer hand methods beyond q, k, v: the TokenLayout fields methods read instead
of guessing (UNet level, padded prompt lengths), the per-run bookkeeping kept out of RunContext, the step counter,
and the generic method hooks of ``diffaccel.apply`` (model setup, denoiser wrappers)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from image_models import flux_inputs, run, sd3_inputs, tiny_flux, tiny_sd3, tiny_unet, unet_inputs

import diffaccel
from diffaccel.context import RunContext
from diffaccel.errors import UnsupportedModelError
from diffaccel.layout import TokenLayout, downsampled_level
from diffaccel.methods.base import MethodBase, sdpa
from diffaccel.pipelines import model_setup
from diffaccel.pipelines.adapters import hunyuan_video as hv
from diffaccel.pipelines.adapters.base import TensorMemo
from diffaccel.pipelines.adapters.padding import trailing_padding_lengths
from diffaccel.pipelines.tiny import build_tiny, tiny_spec
from diffaccel.warn import DiffAccelWarning, reset_warnings


class Recording(MethodBase):
    """Dense SDPA that records (layer, layout, step, num_steps) of every call."""

    name = "test-plumbing-recording"

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, TokenLayout, int, int | None]] = []

    def __call__(self, q, k, v, layout, ctx, *, attn_mask=None, scale=None):
        self.calls.append((ctx.layer, layout, ctx.step, ctx.num_steps))
        return sdpa(q, k, v, attn_mask=attn_mask, scale=scale)

    def self_layouts(self) -> list[TokenLayout]:
        return [lay for _, lay, _, _ in self.calls if not lay.is_cross and lay.grid is not None]


# ----------------------------------------------------------------------------------------------- UNet level


@pytest.mark.parametrize("size", [(8, 12), (9, 13), (7, 7)])
def test_unet_layouts_say_level_and_factor(size):
    """Odd latents round up at each stride-2 level (9x13 -> 5x7): the factor is the number of halvings."""
    model, inputs = tiny_unet(), unet_inputs(*size)
    method = Recording()
    diffaccel.apply(model, method)
    run(model, inputs)
    seen = {(lay.grid, lay.downsample) for lay in method.self_layouts()}
    half = tuple(math.ceil(s / 2) for s in size)
    assert seen == {(size, 1), (half, 2)}
    assert all(lay.hierarchical for lay in method.self_layouts())
    for lay in method.self_layouts():
        assert downsampled_level(size, lay.num_tokens) == (lay.grid, lay.downsample)


def test_unet_layouts_say_the_finest_attention_level():
    """finest_downsample is the smallest factor of the forward's self-attention levels: 1 when the full-resolution
    level has attention, 2 on an SDXL-like UNet whose first attention level is 2x down (the tiny SDXL)."""
    model, inputs = tiny_unet(), unet_inputs(8, 8)
    method = Recording()
    diffaccel.apply(model, method)
    run(model, inputs)
    assert {lay.finest_downsample for lay in method.self_layouts()} == {1}
    pipe = build_tiny("tiny-sdxl")
    pipe.set_progress_bar_config(disable=True)
    method = Recording()
    diffaccel.apply(pipe, method)
    for _ in range(2):  # a second run: per forward, not "smallest ever seen"
        method.calls.clear()
        pipe("a", num_inference_steps=1, height=32, width=32, output_type="latent", generator=torch.Generator().manual_seed(0))
        layouts = method.self_layouts()
        assert layouts and min(lay.downsample for lay in layouts) == 2
        assert {lay.finest_downsample for lay in layouts} == {2}
    diffaccel.remove(pipe)


def test_unet_level_without_the_hook():
    """A bare set_attn_processor has no latent grid: the first (largest) self-attention grid stands for it."""
    model, inputs = tiny_unet(), unet_inputs(8, 8)
    method = Recording()
    model.set_attn_processor(diffaccel.DiffAccelAttnProcessor(method))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DiffAccelWarning)  # the layer-name warning of bare installs
        run(model, inputs)
    assert {(lay.grid, lay.downsample) for lay in method.self_layouts()} == {((8, 8), 1), ((4, 4), 2)}
    for size in ((12, 12), (4, 4)):  # the next forwards, larger then smaller: each is its own latent grid
        method.calls.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DiffAccelWarning)
            run(model, unet_inputs(*size))
        half = (size[0] // 2, size[1] // 2)
        assert {(lay.grid, lay.downsample) for lay in method.self_layouts()} == {(size, 1), (half, 2)}, size


def test_dit_layouts_keep_the_defaults():
    model, inputs = tiny_sd3(sd35=True), sd3_inputs(8, 12)
    method = Recording()
    diffaccel.apply(model, method)
    run(model, inputs)
    layouts = method.self_layouts()
    assert layouts and all(lay.downsample == 1 and not lay.hierarchical for lay in layouts)
    assert all(lay.text_lengths is None for lay in layouts)


# ----------------------------------------------------------------------------------------------- padded prompts


def _hunyuan():
    from test_adapters_video import CASES

    return CASES["hunyuan_video"]()


JOINT = ("transformer_blocks.0.attn", "single_transformer_blocks.0.attn")


def test_hunyuan_text_lengths_under_apply_and_bare():
    from test_adapters_video import GRID, TEXT

    model, inputs = _hunyuan()  # prompt mask: row 0 full, row 1 padded after 4 tokens
    method = Recording()
    diffaccel.apply(model, method)
    with torch.no_grad():
        model(**inputs, return_dict=False)
    lengths = {layer: lay.text_lengths for layer, lay, _, _ in method.calls}
    assert all(lengths[name] == (TEXT, 4) for name in JOINT), lengths
    diffaccel.remove(model)

    bare = Recording()
    model.set_attn_processor(diffaccel.DiffAccelAttnProcessor(bare, context=RunContext(grid=GRID)))
    from diffaccel.pipelines.adapters.base import mark_text_only

    mark_text_only(model.context_embedder)
    inputs["encoder_attention_mask"][0, 5:] = 0  # a new padding: read from the call's mask this time
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DiffAccelWarning)
        model(**inputs, return_dict=False)
    lengths = {layer: lay.text_lengths for layer, lay, _, _ in bare.calls}
    assert all(lengths[name] == (5, 4) for name in JOINT), lengths


def test_hunyuan_prompt_lengths_are_read_once_per_mask(monkeypatch):
    model, inputs = _hunyuan()
    reads = []
    original = hv._prompt_lengths
    monkeypatch.setattr(hv, "_prompt_lengths", lambda m: reads.append(1) or original(m))
    diffaccel.apply(model, "dense")
    with torch.no_grad():
        model(**inputs, return_dict=False)
        model(**inputs, return_dict=False)  # the same mask object at the next step: no read
        assert len(reads) == 1
        inputs["encoder_attention_mask"][1, 2:] = 0  # changed in place: its version moved, read again
        model(**inputs, return_dict=False)
        assert len(reads) == 2
        inputs["encoder_attention_mask"] = inputs["encoder_attention_mask"].clone()  # a new object
        model(**inputs, return_dict=False)
        assert len(reads) == 3


def _key_mask(nv: int, lengths: list[int], nt: int) -> torch.Tensor:
    keep = torch.ones(len(lengths), nv + nt, dtype=torch.bool)
    for b, n in enumerate(lengths):
        keep[b, nv + n :] = False
    return keep[:, None, None, :]


def test_trailing_padding_lengths_accepts_only_trailing_padding():
    nv, nt = 6, 5
    mask = _key_mask(nv, [5, 2, 0], nt)
    assert trailing_padding_lengths(mask, nv, nt) == (5, 2, 0)
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    assert trailing_padding_lengths(additive, nv, nt) == (5, 2, 0)
    hole = mask.clone()
    hole[1, 0, 0, nv] = False  # a hidden first text token with valid ones after it
    assert trailing_padding_lengths(hole, nv, nt) is None
    visual = mask.clone()
    visual[0, 0, 0, 1] = False  # a hidden visual key
    assert trailing_padding_lengths(visual, nv, nt) is None
    bias = additive.clone()
    bias[0, 0, 0, 0] = -1.0  # a finite bias is no padding mask
    assert trailing_padding_lengths(bias, nv, nt) is None
    assert trailing_padding_lengths(mask.expand(3, 1, nv + nt, nv + nt), nv, nt) is None  # per-query mask
    assert trailing_padding_lengths(mask.to(torch.int64), nv, nt) is None
    assert trailing_padding_lengths(mask, nv + nt, 0) is None


def test_tensor_memo_keys_on_object_and_version():
    memo, calls = TensorMemo(size=2), []

    def compute(t):
        calls.append(1)
        return float(t.sum())

    a, b, c = torch.ones(3), torch.ones(3), torch.ones(3)
    assert memo.get(a, compute) == 3.0 and memo.get(a, compute) == 3.0 and len(calls) == 1
    assert memo.get(b, compute) == 3.0 and len(calls) == 2  # equal values, another object: computed
    a.mul_(2)
    assert memo.get(a, compute) == 6.0 and len(calls) == 3  # in-place change: recomputed
    memo.get(c, compute)  # size 2: the oldest entry (b) is dropped
    memo.get(b, compute)
    assert len(calls) == 5


# ----------------------------------------------------------------------------------------------- FLUX bookkeeping


def test_flux_single_stream_text_length_is_kept_per_run_context():
    """Without the hook, single-stream calls take the text length of the last double-stream call of their context."""
    from diffaccel.pipelines.adapters.flux import FluxAdapter
    from diffaccel.pipelines.adapters.base import adapter_for

    model = tiny_flux()
    inputs = flux_inputs(8, 8)
    expected = run(model, inputs)
    one, two = RunContext(), RunContext()  # no grid: square inference, no hook: no text_len
    model.set_attn_processor(diffaccel.DiffAccelAttnProcessor("dense", context=one))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DiffAccelWarning)
        assert (run(model, inputs) - expected).abs().max() <= 1e-5
        adapter = adapter_for(model.transformer_blocks[0].attn)
        assert isinstance(adapter, FluxAdapter)
        assert adapter._joint_text_len.get(one) == inputs["encoder_hidden_states"].shape[1]
        assert two not in adapter._joint_text_len
        assert not hasattr(one, "joint_text_len") and not hasattr(one, "perturbed_rows")


def test_flux_grid_is_read_once_per_ids_object(monkeypatch):
    from diffaccel.pipelines.adapters import flux

    reads = []
    original = flux.flux_grid
    monkeypatch.setattr(flux, "flux_grid", lambda ids, n: reads.append(1) or original(ids, n))
    model, inputs = tiny_flux(), flux_inputs(8, 12)
    processor = diffaccel.apply(model, "dense")
    run(model, inputs)
    run(model, inputs)
    assert len(reads) == 1 and processor.context.grid == (8, 12)
    run(model, {**inputs, "img_ids": inputs["img_ids"].clone()})
    assert len(reads) == 2


# ----------------------------------------------------------------------------------------------- steps


def _steps_of_run(pipe, name: str, steps: int, **overrides) -> list[tuple[int, int | None]]:
    method = Recording()
    diffaccel.apply(pipe, method)
    kwargs = tiny_spec(name).call_kwargs(num_inference_steps=steps, **overrides)
    try:
        pipe("a house", generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs)
    finally:
        diffaccel.remove(pipe)
    per_forward = []
    for layer, _, step, num_steps in method.calls:  # one entry per forward: the first layer's calls
        if layer == method.calls[0][0]:
            per_forward.append((step, num_steps))
    return per_forward


def test_steps_from_the_scheduler_and_a_second_run():
    pipe = build_tiny("tiny-flux")
    pipe.set_progress_bar_config(disable=True)
    assert _steps_of_run(pipe, "tiny-flux", 3) == [(0, 3), (1, 3), (2, 3)]
    assert _steps_of_run(pipe, "tiny-flux", 4) == [(0, 4), (1, 4), (2, 4), (3, 4)]  # a new run starts at 0


def test_unbatched_cfg_calls_share_a_step():
    pipe = build_tiny("tiny-wan")  # WanPipeline calls the transformer for the prompt and the negative prompt
    pipe.set_progress_bar_config(disable=True)
    assert _steps_of_run(pipe, "tiny-wan", 2, guidance_scale=5.0) == [(0, 2), (0, 2), (1, 2), (1, 2)]


@pytest.mark.parametrize("scheduler", ["KDPM2DiscreteScheduler", "HeunDiscreteScheduler"])
def test_second_order_scheduler_evaluations_share_a_step(scheduler):
    """KDPM2 holds 2n - 1 distinct timesteps for n steps: counted by timestep values it would give 2n - 1 steps."""
    import diffusers

    pipe = build_tiny("tiny-sd")
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    assert _steps_of_run(pipe, "tiny-sd", 3) == [(0, 3), (1, 3), (1, 3), (2, 3), (2, 3)]


def test_steps_without_step_index_are_counted_by_timestep():
    """PNDM has no step_index: the step is counted over distinct timestep values (one host read per forward)."""
    pipe = build_tiny("tiny-sd")
    pipe.set_progress_bar_config(disable=True)
    steps = [s for s, _ in _steps_of_run(pipe, "tiny-sd", 3)]
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == len(set(steps)) - 1 >= 2


def test_step_counted_from_timestep_values():
    """Without a scheduler step: equal timesteps share a step (unbatched CFG), lower ones advance, higher restart."""
    ctx = RunContext()
    steps = []
    for t in (900.0, torch.tensor([900.0, 900.0]), 800.0, 800.0, torch.tensor([[0.0, 700.0]]), 1000.0, 950.0):
        ctx.begin_denoiser_call(None, None, t)
        steps.append(ctx.step)
    assert steps == [0, 0, 1, 1, 2, 0, 1]  # per-token timesteps: the noise level is the max
    assert ctx.timestep == 950.0 and ctx.denoiser_calls == 7


def test_step_from_step_fn_reads_no_timestep():
    ctx = RunContext(step_fn=lambda: 4, num_steps_fn=lambda: 9)
    t = torch.tensor([500.0])
    ctx.begin_denoiser_call((2, 2), None, t)
    assert ctx.step == 4 and ctx.num_steps == 9 and ctx.timestep is t


def test_scheduler_step_from_step_index():
    from types import SimpleNamespace

    from diffaccel.pipelines.hooks import scheduler_step

    assert scheduler_step(SimpleNamespace(step_index=None, begin_index=None, order=1)) == 0
    assert scheduler_step(SimpleNamespace(step_index=3, begin_index=None, order=1)) == 3
    assert scheduler_step(SimpleNamespace(step_index=5, begin_index=2, order=1)) == 3  # img2img starts at begin_index
    assert [scheduler_step(SimpleNamespace(step_index=i, begin_index=0, order=2)) for i in range(5)] == [0, 1, 1, 2, 2]


# ----------------------------------------------------------------------------------------------- generic hooks


class Wrapping(MethodBase):
    name = "test-plumbing-wrapping"
    wraps_denoiser = True

    def __call__(self, q, k, v, layout, ctx, *, attn_mask=None, scale=None):
        return sdpa(q, k, v, attn_mask=attn_mask, scale=scale)


def test_apply_hands_denoiser_wrappers_to_their_installer(monkeypatch):
    model = tiny_sd3()
    with pytest.raises(UnsupportedModelError, match="no installer is registered"):
        diffaccel.apply(model, Wrapping())
    assert not model._forward_pre_hooks
    seen = []
    monkeypatch.setitem(model_setup._WRAPPERS, Wrapping, lambda pipe, method, **cfg: seen.append((pipe, method, cfg)) or "p")
    method = Wrapping()
    assert diffaccel.apply(model, method) == "p" and seen == [(model, method, {})]
    with pytest.raises(TypeError, match="wraps_denoiser"):
        model_setup.register_denoiser_wrapper(MethodBase, lambda *a: None)


def test_model_setup_runs_on_apply_and_leftovers_warn(monkeypatch):
    class Setup(MethodBase):
        name = "test-plumbing-setup"

        def __call__(self, q, k, v, layout, ctx, *, attn_mask=None, scale=None):
            return sdpa(q, k, v, attn_mask=attn_mask, scale=scale)

    touched = []
    entry = model_setup.ModelSetup(
        setup=lambda method, model: touched.append(model) or setattr(model, "_test_changed", True),
        leftover=lambda model: "the test's change" if getattr(model, "_test_changed", False) else None,
    )
    monkeypatch.setitem(model_setup._SETUPS, Setup, entry)
    model = tiny_sd3()
    diffaccel.apply(model, Setup())
    assert touched == [model]
    reset_warnings()
    with pytest.warns(DiffAccelWarning, match="still holds the test's change"):
        diffaccel.apply(model, "dense")
    reset_warnings()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiffAccelWarning)
        diffaccel.apply(model, Setup())  # the method that made the change is not warned


def test_clear_processor_checks_each_module_once(monkeypatch):
    calls = []
    entry = model_setup.model_setup_for(diffaccel.get_method("clear", radius=2))
    monkeypatch.setitem(
        model_setup._SETUPS, type(diffaccel.get_method("clear", radius=2)),
        model_setup.ModelSetup(entry.setup, entry.leftover, lambda method, attn: calls.append(attn)),
    )
    model, inputs = tiny_flux(), flux_inputs(8, 8)
    model.set_attn_processor(diffaccel.ClearAttnProcessor(radius=2, block_size=16, backend="reference"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DiffAccelWarning)
        run(model, inputs)
        run(model, inputs)
    modules = [m for m in model.modules() if hasattr(m, "set_processor")]
    assert len(calls) == len(modules) and {id(m) for m in calls} == {id(m) for m in modules}


def test_bare_install_warns_that_layer_names_are_per_process():
    model = tiny_sd3()
    model.set_attn_processor(diffaccel.DiffAccelAttnProcessor("dense"))
    reset_warnings()
    with pytest.warns(DiffAccelWarning, match="differs between processes"):
        run(model, sd3_inputs(8, 8))
