"""IP-adapters with diffaccel (issue 11, item 3): loading one before or after ``apply`` keeps the method running.

FLUX: the double-stream modules get ``FluxIPAdapterAttnProcessor`` (it holds the IP weights); diffaccel wraps it
(same weights, same state-dict keys), runs the method on the joint attention and adds the IP attention dense; the
single-stream modules are rebuilt as ``DiffAccelAttnProcessor()`` and run the installed method. UNet: the
cross-attention modules get ``IPAdapterAttnProcessor2_0`` (dense, as diffaccel keeps cross-attention anyway, said
once); the self-attention modules are rebuilt and keep running the method. IP-adapter weights are built here
(random, the layout diffusers' loaders read), nothing is downloaded.
"""

from __future__ import annotations

import copy
import pickle
import warnings
from typing import Any

import pytest
import torch
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

import diffaccel
from diffaccel.pipelines.adapters.flux import DiffAccelFluxIPAdapterAttnProcessor
from diffaccel.pipelines.hooks import attention_modules
from diffaccel.warn import DiffAccelWarning, reset_warnings
from image_models import flux_inputs, max_abs_diff, run, tiny_flux, tiny_unet, unet_inputs

EMBED_DIM = 8
IMAGE_TOKENS = 4


def _image_proj(cross_dim: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """``ImageProjection`` weights in the original IP-adapter checkpoint layout (``proj``, ``norm``)."""
    return {
        "proj.weight": torch.randn(cross_dim * IMAGE_TOKENS, EMBED_DIM, generator=generator) * 0.3,
        "proj.bias": torch.randn(cross_dim * IMAGE_TOKENS, generator=generator) * 0.1,
        "norm.weight": torch.ones(cross_dim),
        "norm.bias": torch.zeros(cross_dim),
    }


def flux_ip_state_dict(model: torch.nn.Module, seed: int = 3) -> dict[str, dict[str, torch.Tensor]]:
    """One ``to_k_ip``/``to_v_ip`` pair (with biases) per double-stream block, numbered from 0."""
    g = torch.Generator().manual_seed(seed)
    cross, hidden = model.config.joint_attention_dim, model.inner_dim
    ip = {}
    for i in range(len(model.transformer_blocks)):
        for name in ("to_k_ip", "to_v_ip"):
            ip[f"{i}.{name}.weight"] = torch.randn(hidden, cross, generator=g) * 0.3
            ip[f"{i}.{name}.bias"] = torch.randn(hidden, generator=g) * 0.1
    return {"image_proj": _image_proj(cross, g), "ip_adapter": ip}


def unet_ip_state_dict(model: torch.nn.Module, seed: int = 3) -> dict[str, dict[str, torch.Tensor]]:
    """One bias-free ``to_k_ip``/``to_v_ip`` pair per cross-attention module, numbered 1, 3, 5, ... in
    ``attn_processors`` order (the original checkpoints count every attention module)."""
    g = torch.Generator().manual_seed(seed)
    cross = model.config.cross_attention_dim
    ip, key_id = {}, 1
    for name, module in model.named_modules():
        if not hasattr(module, "set_processor") or not getattr(module, "is_cross_attention", False):
            continue
        hidden = module.to_q.out_features
        for part in ("to_k_ip", "to_v_ip"):
            ip[f"{key_id}.{part}.weight"] = torch.randn(hidden, cross, generator=g) * 0.3
        key_id += 2
    return {"image_proj": _image_proj(cross, g), "ip_adapter": ip}


def _flux_call() -> tuple[dict[str, Any], torch.Tensor]:
    torch.manual_seed(0)
    inputs = flux_inputs(4, 4)
    return inputs, torch.randn(2, EMBED_DIM)


def _with_image(inputs: dict[str, Any], embeds: torch.Tensor) -> dict[str, Any]:
    return {**inputs, "joint_attention_kwargs": {"ip_adapter_image_embeds": [embeds[:, None]]}}


def _processor_classes(model: torch.nn.Module) -> dict[str, str]:
    return {name: type(m.processor).__name__ for name, m in attention_modules(model).items()}


@pytest.mark.parametrize("order", ["load-after-apply", "apply-after-load"])
def test_flux_ip_adapter_with_dense_equals_stock(order: str) -> None:
    inputs, embeds = _flux_call()
    stock = tiny_flux()
    model = copy.deepcopy(stock)
    without_ip = run(stock, inputs)
    stock._load_ip_adapter_weights([flux_ip_state_dict(stock)])
    expected = run(stock, _with_image(inputs, embeds))
    assert max_abs_diff(expected, without_ip) > 1e-3  # the IP tokens change the output: the test can fail
    if order == "load-after-apply":
        diffaccel.apply(model, "dense")
        model._load_ip_adapter_weights([flux_ip_state_dict(model)])
    else:
        model._load_ip_adapter_weights([flux_ip_state_dict(model)])
        diffaccel.apply(model, "dense")
    assert max_abs_diff(run(model, _with_image(inputs, embeds)), expected) == 0.0
    double = model.transformer_blocks[0].attn.processor
    assert isinstance(double, DiffAccelFluxIPAdapterAttnProcessor) and isinstance(double, FluxIPAdapterAttnProcessor)
    assert sorted(model.state_dict()) == sorted(stock.state_dict())  # IP weights kept under the same keys
    for key, value in stock.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_flux_ip_adapter_keeps_the_method_on_every_layer() -> None:
    inputs, embeds = _flux_call()
    model = tiny_flux()
    processor = diffaccel.apply(model, "gna", backend="reference")
    model._load_ip_adapter_weights([flux_ip_state_dict(model)])
    run(model, _with_image(inputs, embeds))
    counts = processor.method.call_counts
    assert counts.method == len(attention_modules(model)) and counts.dense == 0


def test_flux_ip_adapter_remove_copy_and_scale() -> None:
    inputs, embeds = _flux_call()
    stock = tiny_flux()
    model = copy.deepcopy(stock)
    stock._load_ip_adapter_weights([flux_ip_state_dict(stock)])
    diffaccel.apply(model, "dense")
    model._load_ip_adapter_weights([flux_ip_state_dict(model)])
    expected = run(stock, _with_image(inputs, embeds))
    assert max_abs_diff(run(model, _with_image(inputs, embeds)), expected) == 0.0  # the forward wraps the IP processor
    copied = copy.deepcopy(model)
    assert max_abs_diff(run(copied, _with_image(inputs, embeds)), expected) == 0.0
    wrapper = copied.transformer_blocks[0].attn.processor
    assert wrapper.diffaccel_processor is not model.transformer_blocks[0].attn.processor.diffaccel_processor
    pickle.loads(pickle.dumps(wrapper))  # picklable (S-compile saves whole models)
    # the scale diffusers sets on the processor reaches the IP attention
    for m in (stock, model):
        m.transformer_blocks[0].attn.processor.scale = [0.5]
    assert max_abs_diff(run(model, _with_image(inputs, embeds)), run(stock, _with_image(inputs, embeds))) == 0.0
    diffaccel.remove(model)
    assert _processor_classes(model) == _processor_classes(stock)
    assert max_abs_diff(run(model, _with_image(inputs, embeds)), run(stock, _with_image(inputs, embeds))) == 0.0


def _unet_call() -> tuple[dict[str, Any], torch.Tensor]:
    torch.manual_seed(0)
    return unet_inputs(8, 8), torch.randn(2, EMBED_DIM)


def _unet_with_image(inputs: dict[str, Any], embeds: torch.Tensor) -> dict[str, Any]:
    return {**inputs, "added_cond_kwargs": {"image_embeds": [embeds[:, None]]}}


def test_unet_ip_adapter_keeps_self_attention_method() -> None:
    """Before issue 11 the rebuild ``processor.__class__()`` silently made the UNet's self-attention dense."""
    reset_warnings()
    inputs, embeds = _unet_call()
    stock = tiny_unet()
    model = copy.deepcopy(stock)
    stock._load_ip_adapter_weights([unet_ip_state_dict(stock)])
    expected = run(stock, _unet_with_image(inputs, embeds))
    diffaccel.apply(model, "dense")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model._load_ip_adapter_weights([unet_ip_state_dict(model)])
        assert max_abs_diff(run(model, _unet_with_image(inputs, embeds)), expected) == 0.0
        run(model, _unet_with_image(inputs, embeds))
    messages = [str(w.message) for w in record if issubclass(w.category, DiffAccelWarning)]
    named = [m for m in messages if "IPAdapterAttnProcessor2_0" in m]
    assert len(named) == 1 and "cross-attention" in named[0]  # once, across two forwards

    processor = diffaccel.apply(model, "msw", backend="reference")
    modules = attention_modules(model)
    self_attention = [n for n, m in modules.items() if not m.is_cross_attention]
    assert all(isinstance(modules[n].processor, IPAdapterAttnProcessor2_0) for n in modules if n not in self_attention)
    run(model, _unet_with_image(inputs, embeds))
    before = (processor.method.call_counts.method, processor.method.call_counts.dense)
    assert before[0] > 0 and sum(before) == len(self_attention)
    processor.method.call_counts.reset()
    model._load_ip_adapter_weights([unet_ip_state_dict(model)])  # again: rebuilds the self-attention processors
    run(model, _unet_with_image(inputs, embeds))
    assert (processor.method.call_counts.method, processor.method.call_counts.dense) == before
