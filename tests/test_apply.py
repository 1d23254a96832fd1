"""diffaccel.apply / remove: what they accept, what they refuse (with messages that say what is allowed),
and that a pipeline's denoisers, processors and hooks are installed and restored exactly."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.models.attention_processor import Attention
from image_models import run, sd3_inputs, tiny_sd3, tiny_unet, unet_inputs

import diffaccel
from diffaccel.errors import ConfigError, UnknownMethodError, UnsupportedModelError
from diffaccel.pipelines.hooks import attention_modules, installed_processor


class NotADenoiser(torch.nn.Module):
    """A model class with diffusers attention but no diffaccel family."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = Attention(query_dim=16, heads=2, dim_head=8)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.attn(hidden_states)


def _processors(model: torch.nn.Module) -> dict[str, object]:
    return {n: m.processor for n, m in attention_modules(model).items()}


def test_unsupported_model_lists_families_and_changes_nothing() -> None:
    model = NotADenoiser()
    before = _processors(model)
    with pytest.raises(UnsupportedModelError) as err:
        diffaccel.apply(model, "dense")
    message = str(err.value)
    assert "NotADenoiser" in message
    for cls in ("SD3Transformer2DModel", "FluxTransformer2DModel", "UNet2DConditionModel"):
        assert cls in message
    assert _processors(model) == before and installed_processor(model) is None
    assert not model._forward_pre_hooks


def test_unknown_method_lists_registered_and_changes_nothing() -> None:
    model = tiny_sd3()
    before = _processors(model)
    with pytest.raises(UnknownMethodError) as err:
        diffaccel.apply(model, "no-such-method")
    assert "no-such-method" in str(err.value) and "dense" in str(err.value)
    assert all(before[n] is p for n, p in _processors(model).items())
    assert installed_processor(model) is None and not model._forward_pre_hooks


def test_bad_config_names_the_parameter() -> None:
    with pytest.raises(ConfigError, match="density"):
        diffaccel.apply(tiny_sd3(), "dense", density=0.5)


def test_processor_instance_with_config_is_refused() -> None:
    with pytest.raises(TypeError, match="config"):
        diffaccel.apply(tiny_sd3(), diffaccel.DiffAccelAttnProcessor("dense"), density=0.5)


def test_object_without_denoiser() -> None:
    with pytest.raises(UnsupportedModelError, match="transformer"):
        diffaccel.apply(SimpleNamespace(vae=None), "dense")


def test_pipeline_with_transformer_records_steps_and_restores() -> None:
    transformer = tiny_sd3()
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(4)
    pipe = SimpleNamespace(transformer=transformer, scheduler=scheduler, vae=None)
    stock = _processors(transformer)
    inputs = sd3_inputs(8, 12)
    reference = run(transformer, inputs)

    processor = diffaccel.apply(pipe, "dense")
    assert installed_processor(transformer) is processor
    assert all(p is processor for p in _processors(transformer).values())
    assert torch.equal(run(transformer, inputs), reference)  # dense is bitwise stock
    ctx = processor.context
    assert ctx.num_steps == 4 and ctx.grid == (4, 6) and ctx.text_len == 5 and ctx.denoiser_calls == 1

    diffaccel.remove(pipe)
    assert all(stock[n] is p for n, p in _processors(transformer).items())
    assert installed_processor(transformer) is None and not transformer._forward_pre_hooks
    run(transformer, inputs)
    assert ctx.denoiser_calls == 1, "the run-context hook is still installed after remove()"
    diffaccel.remove(pipe)  # a second remove is a no-op


def test_pipeline_with_unet() -> None:
    unet = tiny_unet()
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(3)
    pipe = SimpleNamespace(unet=unet, scheduler=scheduler)
    inputs = unet_inputs(8, 12)
    reference = run(unet, inputs)
    processor = diffaccel.apply(pipe, "dense")
    assert torch.equal(run(unet, inputs), reference)
    assert processor.context.grid == (8, 12) and processor.context.num_steps == 3
    diffaccel.remove(pipe)
    assert installed_processor(unet) is None


def test_two_transformers_share_one_processor() -> None:
    """Pipelines with two denoisers (Wan 2.2's transformer_2) get one processor and one run context."""
    first, second = tiny_sd3(), tiny_sd3(sd35=True)
    pipe = SimpleNamespace(transformer=first, transformer_2=second)
    processor = diffaccel.apply(pipe, "dense")
    assert installed_processor(first) is processor and installed_processor(second) is processor
    run(first, sd3_inputs(8, 8, timestep=900.0))
    run(second, sd3_inputs(8, 12, timestep=400.0))
    assert processor.context.denoiser_calls == 2 and processor.context.step == 1
    assert processor.context.grid == (4, 6)
    diffaccel.remove(pipe)
    assert installed_processor(first) is None and installed_processor(second) is None


def test_apply_twice_keeps_the_original_stock_processors() -> None:
    model = tiny_sd3()
    stock = _processors(model)
    first = diffaccel.apply(model, "dense")
    second = diffaccel.apply(model, "dense")
    assert second is not first
    assert all(p is second for p in _processors(model).values())
    assert len(model._forward_pre_hooks) == 1
    diffaccel.remove(model)
    assert all(stock[n] is p for n, p in _processors(model).items())
    assert not model._forward_pre_hooks


def test_failed_reapply_keeps_the_previous_installation() -> None:
    model = tiny_sd3()
    processor = diffaccel.apply(model, "dense")
    with pytest.raises(UnknownMethodError):
        diffaccel.apply(model, "no-such-method")
    assert installed_processor(model) is processor
    assert all(p is processor for p in _processors(model).values())


def test_num_steps_of_second_order_schedulers():
    """Heun holds 2n - 1 timesteps for n steps (one evaluation at the first step, two at the others)."""
    from diffusers import EulerDiscreteScheduler, HeunDiscreteScheduler

    from diffaccel.pipelines.hooks import _scheduler_steps

    for cls in (HeunDiscreteScheduler, EulerDiscreteScheduler):
        scheduler = cls()
        scheduler.set_timesteps(10)
        assert _scheduler_steps(scheduler) == 10, cls.__name__
