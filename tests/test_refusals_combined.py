"""Combinations refused at integration of the compile, context-parallel and routed-adapter paths: each raises one
clear error instead of computing attention over a shard (issue 17: never silently wrong)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import diffaccel
from diffaccel.errors import ConfigError
from tests.test_adapters_families import _z_image
from tests.test_compile import denoiser_inputs, tiny_denoiser


def _pretend_context_parallel(model: torch.nn.Module) -> None:
    """What diffusers' ``enable_parallelism`` leaves on our processor (no process group needed to reach the check)."""
    cp = SimpleNamespace(ring_degree=1, ulysses_degree=2, ulysses_anything=False, ring_anything=False)
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if isinstance(processor, diffaccel.DiffAccelAttnProcessor):
            processor._parallel_config = SimpleNamespace(context_parallel_config=cp)


def test_context_parallelism_under_torch_compile_is_refused():
    model = tiny_denoiser("wan")
    diffaccel.apply(model, "dense")
    _pretend_context_parallel(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    with pytest.raises(Exception, match="torch.compile with context parallelism"):
        with torch.no_grad():
            compiled(**denoiser_inputs("wan"))
    torch._dynamo.reset()


def test_routed_family_under_context_parallelism_is_refused():
    model, kw = _z_image()
    diffaccel.apply(model, "dense")
    _pretend_context_parallel(model)
    with pytest.raises(ConfigError, match="z_image family is not supported"):
        with torch.no_grad():
            model(**kw)
