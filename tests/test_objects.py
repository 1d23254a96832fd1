"""A model with diffaccel applied behaves like a model (issue 11, item 4): ``copy.deepcopy`` gives an independent
working copy, ``torch.save``/``torch.load`` of the whole model round-trips (hooks are picklable objects, not
closures), and ``save_pretrained`` writes the stock weights only."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import diffaccel
from diffaccel.pipelines.hooks import ContextHook, installed_processor
from tests.test_compile import denoiser_inputs, tiny_denoiser


def _hooks(model):
    return [h for h in model._forward_pre_hooks.values() if isinstance(h, ContextHook)]


@pytest.mark.parametrize("family,method,kw", [("wan", "gna", {"kernel_size": 3}), ("flux", "msw", {})])
def test_deepcopy_is_independent_and_runs(family, method, kw):
    model = tiny_denoiser(family)
    diffaccel.apply(model, method, block_size=16, backend="reference", **kw)
    inputs = denoiser_inputs(family)
    with torch.no_grad():
        before = model(**inputs)[0]
        clone = copy.deepcopy(model)
        out = clone(**inputs)[0]
    torch.testing.assert_close(out, before, rtol=0, atol=0)
    p, q = installed_processor(model), installed_processor(clone)
    assert q is not p and q.method is not p.method and q.context is not p.context
    assert q._op_key != p._op_key
    assert len(_hooks(clone)) == 1 and _hooks(clone)[0].ctx is q.context  # the copy's hook fills the copy's context
    assert q.context.denoiser_calls == 2 and p.context.denoiser_calls == 1  # copied at 1, then counted apart
    # every attention module of the copy runs the copy's processor
    assert all(m.processor is q for n, m in clone.named_modules() if hasattr(m, "set_processor"))
    diffaccel.remove(clone)  # removing from the copy leaves the original applied
    assert installed_processor(model) is p and len(_hooks(model)) == 1
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs)[0], before, rtol=0, atol=0)


def test_deepcopy_of_a_pipeline_keeps_its_scheduler_link():
    from diffaccel.pipelines.tiny import build_tiny

    pipe = build_tiny("tiny-wan")
    diffaccel.apply(pipe, "gna", kernel_size=3, block_size=16, backend="reference")
    clone = copy.deepcopy(pipe)
    ctx = installed_processor(clone.transformer).context
    assert ctx.step_fn.scheduler is clone.scheduler and ctx.num_steps_fn.scheduler is clone.scheduler
    clone.scheduler.set_timesteps(3)
    assert ctx.num_steps_fn() == 3 and installed_processor(pipe.transformer).context.num_steps_fn() != 3


@pytest.mark.parametrize("family", ["wan", "flux"])
def test_torch_save_and_load_of_a_whole_model(family):
    model = tiny_denoiser(family)
    diffaccel.apply(model, "gna", kernel_size=3, block_size=16, backend="reference")
    inputs = denoiser_inputs(family)
    with torch.no_grad():
        before = model(**inputs)[0]
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        out = loaded(**inputs)[0]
    torch.testing.assert_close(out, before, rtol=0, atol=0)
    assert installed_processor(loaded).method.call_counts.method > 0
    assert installed_processor(loaded)._op_key != installed_processor(model)._op_key


def test_state_dict_holds_the_stock_weights_only(tmp_path):
    model = tiny_denoiser("wan")
    stock_keys = set(model.state_dict())
    diffaccel.apply(model, "gna", kernel_size=3, block_size=16, backend="reference")
    assert set(model.state_dict()) == stock_keys  # the layer tokens are plain attributes, not buffers
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    assert installed_processor(reloaded) is None  # diffaccel is not saved: re-apply with one line
    assert not any(type(m.processor).__name__ == "DiffAccelAttnProcessor"
                   for m in reloaded.modules() if hasattr(m, "set_processor"))
    diffaccel.apply(reloaded, "gna", kernel_size=3, block_size=16, backend="reference")
    inputs = denoiser_inputs("wan")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs)[0], model(**inputs)[0], rtol=1e-4, atol=1e-5)
