"""Processor swaps after ``diffaccel.apply`` are never silent (issue 11, item 3).

Fused projections (before or after ``apply``) keep the method running and equal stock; a processor someone else
installs is named in one warning and kept by ``remove``; ``set_attention_backend`` says once that it has no effect;
a no-argument rebuild (``processor.__class__()``) runs the installed method and stays picklable.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from diffusers.models.attention_processor import JointAttnProcessor2_0

import diffaccel
from diffaccel.pipelines.hooks import attention_modules
from diffaccel.pipelines.processor import DiffAccelAttnProcessor
from diffaccel.warn import DiffAccelWarning, reset_warnings
from image_models import flux_inputs, max_abs_diff, run, sd3_inputs, tiny_flux, tiny_sd3, tiny_unet, unet_inputs

FAMILIES = {
    "sd3": (tiny_sd3, lambda: sd3_inputs(8, 8)),
    "unet": (tiny_unet, lambda: unet_inputs(8, 8)),
    "flux": (tiny_flux, lambda: flux_inputs(4, 4)),
}


def _diffaccel_messages(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, DiffAccelWarning)]


def _build(family: str):
    torch.manual_seed(0)
    make, inputs = FAMILIES[family]
    return make(), inputs()


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("when", ["before", "after"])
def test_fused_projections_keep_dense_exact(family: str, when: str) -> None:
    reset_warnings()
    model, inputs = _build(family)
    stock = copy.deepcopy(model)
    stock.fuse_qkv_projections()
    expected = run(stock, inputs)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        if when == "before":
            model.fuse_qkv_projections()
            processor = diffaccel.apply(model, "dense")
        else:
            processor = diffaccel.apply(model, "dense")
            model.fuse_qkv_projections()
        out = run(model, inputs)
        run(model, inputs)
    assert max_abs_diff(out, expected) <= 1e-6
    modules = attention_modules(model)
    assert all(m.processor is processor for m in modules.values())  # diffaccel still runs everywhere
    taken = [m for m in _diffaccel_messages(record) if "switched to Fused" in m]
    fused_class = type(stock.attn_processors[next(iter(stock.attn_processors))]).__name__
    if when == "after" and fused_class.startswith("Fused"):  # SD3, UNet install Fused*; FLUX keeps its processor
        assert len(taken) == 1 and fused_class in taken[0]
    else:
        assert not taken
    diffaccel.remove(model)
    assert {type(p).__name__ for p in model.attn_processors.values()} == {fused_class}


def test_fused_method_keeps_running_after_fuse() -> None:
    model, inputs = _build("sd3")
    processor = diffaccel.apply(model, "gna", backend="reference")
    model.fuse_qkv_projections()
    run(model, inputs)
    counts = processor.method.call_counts
    assert counts.method == len(attention_modules(model)) and counts.dense == 0


def test_foreign_processor_is_named_once_and_kept_by_remove() -> None:
    reset_warnings()
    model, inputs = _build("sd3")
    expected = run(model, inputs)
    diffaccel.apply(model, "dense")
    target = model.transformer_blocks[1].attn
    theirs = JointAttnProcessor2_0()
    target.set_processor(theirs)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run(model, inputs)
        run(model, inputs)
    named = [m for m in _diffaccel_messages(record) if "JointAttnProcessor2_0" in m and "no longer runs" in m]
    assert len(named) == 1 and "'dense'" in named[0] and "transformer_blocks.1.attn" in named[0]
    assert target.processor is theirs  # left as the user set it
    diffaccel.remove(model)
    assert target.processor is theirs and max_abs_diff(run(model, inputs), expected) <= 1e-6
    assert all(type(p).__name__ == "JointAttnProcessor2_0" for p in model.attn_processors.values())


def test_set_default_attn_processor_refuses_naming_diffaccel() -> None:
    model, _ = _build("unet")
    diffaccel.apply(model, "dense")
    with pytest.raises(ValueError, match="DiffAccelAttnProcessor"):
        model.set_default_attn_processor()


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_set_attention_backend_warns_once(family: str) -> None:
    reset_warnings()
    model, inputs = _build(family)
    expected = run(model, inputs)
    diffaccel.apply(model, "dense")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model.set_attention_backend("native")
        model.set_attention_backend("native")
        out = run(model, inputs)
    named = [m for m in _diffaccel_messages(record) if "set_attention_backend('native')" in m]
    assert len(named) == 1 and "no effect" in named[0]
    assert max_abs_diff(out, expected) <= 1e-6
    model.reset_attention_backend()  # back to None: nothing to say


def test_no_argument_rebuild_runs_the_installed_method() -> None:
    reset_warnings()
    model, inputs = _build("flux")
    processor = diffaccel.apply(model, "gna", backend="reference")
    rebuilt = {name: type(p)() for name, p in model.attn_processors.items()}  # what diffusers' loaders do
    assert all(p.rebuilt for p in rebuilt.values())
    model.set_attn_processor(dict(rebuilt))
    with pytest.warns(DiffAccelWarning, match="processor.__class__"):
        run(model, inputs)
    assert processor.method.call_counts.method == len(attention_modules(model))
    assert all(p.method.call_counts.method == 0 for p in rebuilt.values())
    copied = copy.deepcopy(model)
    assert max_abs_diff(run(copied, inputs), run(model, inputs)) == 0.0
    again = pickle.loads(pickle.dumps(next(iter(rebuilt.values()))))
    assert again.rebuilt and again.method.name == "dense"
    # elsewhere (no diffaccel.apply) a no-argument processor is plain dense
    bare, bare_inputs = _build("flux")
    expected = run(bare, bare_inputs)
    bare.set_attn_processor(DiffAccelAttnProcessor())
    assert max_abs_diff(run(bare, bare_inputs), expected) == 0.0
    diffaccel.remove(model)
    assert {type(p).__name__ for p in model.attn_processors.values()} == {"FluxAttnProcessor"}


def test_named_processor_is_not_rebuilt() -> None:
    assert not DiffAccelAttnProcessor("dense").rebuilt
    assert not DiffAccelAttnProcessor(strict=True).rebuilt


def test_named_processor_rebuild_defers_only_to_its_own_method() -> None:
    from diffaccel.pipelines.named_processors import GNAAttnProcessor, MSWAttnProcessor

    model, inputs = _build("flux")
    installed = diffaccel.apply(model, GNAAttnProcessor(backend="reference"))
    assert not installed.rebuilt
    model.set_attn_processor(GNAAttnProcessor())  # what processor.__class__() builds
    run(model, inputs)
    assert installed.method.call_counts.method == len(attention_modules(model))
    other = MSWAttnProcessor()  # another method, asked for explicitly: runs itself
    assert other.rebuilt and not other.defers_to(installed)
    model.set_attn_processor(other)
    installed.method.call_counts.reset()
    run(model, inputs)
    assert installed.method.call_counts.method == 0 and sum(vars(other.method.call_counts).values()) > 0
