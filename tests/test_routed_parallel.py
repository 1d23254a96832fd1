"""Context parallelism through routed adapters (issue 13, FLUX.1 and Wan migrated), in one process.

The two-process runs (tests/test_context_parallel.py) check that FLUX.1 and Wan under ``enable_parallelism`` equal
one process; here, without collectives: the route hands the stock processor the diffaccel processor's parallel
config, the layout sees the rank's shard, calls the stock processor dispatches without a parallel config (Wan's
cross-attention, whose keys are whole) run on the local queries, and the refusals (masks, padded prompts, methods
and families that cannot run) come before any exchange.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import cp_helpers
import diffaccel
from diffaccel.context import RunContext
from diffaccel.errors import ConfigError
from diffaccel.layout import TokenLayout
from diffaccel.methods.base import get_method
from diffaccel.pipelines import parallel
from diffaccel.pipelines.adapters.dispatch import Route, _StockView


def _config(ulysses: int = 2, ring: int = 1) -> SimpleNamespace:
    cp = SimpleNamespace(ring_degree=ring, ulysses_degree=ulysses, ulysses_anything=False, ring_anything=False)
    return SimpleNamespace(context_parallel_config=cp)


def _pretend(processor, config) -> None:
    """What ``enable_parallelism`` leaves on our processor (no process group: only paths without an exchange run)."""
    processor._parallel_config = config


def test_route_layout_sees_the_shard_and_the_view_carries_the_processor_config():
    ctx = RunContext(grid=(4, 4), text_len=8)
    config = _config()
    route = Route(SimpleNamespace(family="flux"), torch.nn.Identity(), None, ctx, get_method("dense"), None,
                  parallel=config)
    shard = route.layout_context()
    assert shard is not ctx and shard.grid == (1, 8) and shard.text_len == 4
    assert ctx.grid == (4, 4) and ctx.text_len == 8 and route.layout_context() is shard
    stock = SimpleNamespace(_parallel_config="the stock processor's own", _attention_backend=None, other=3)
    view = _StockView(stock, route)
    assert view._parallel_config is config and view._attention_backend is route and view.other == 3
    plain = Route(SimpleNamespace(family="flux"), torch.nn.Identity(), None, ctx, get_method("dense"), None)
    assert plain.layout_context() is ctx and _StockView(stock, plain)._parallel_config is None


def test_wan_cross_attention_under_context_parallelism_runs_on_the_local_queries():
    """Wan's stock processor dispatches attn2 without its parallel config (keys whole): exact per query, no exchange."""
    torch.manual_seed(0)
    model = cp_helpers.tiny_wan()
    attn2 = model.blocks[0].attn2
    x, text = torch.randn(2, 16, 64), torch.randn(2, 8, 64)
    with torch.no_grad():
        expected = attn2(x, text, None, None)
        processor = diffaccel.apply(model, "dense")
        _pretend(processor, _config())
        processor.context.grid = (2, 4, 4)  # as the hook records it; this rank holds 16 of the 32 query tokens
        got = attn2(x, text, None, None)
    assert torch.equal(got, expected)


def test_attend_context_parallel_refuses_masks_and_padded_prompts_before_any_exchange():
    q = k = v = torch.randn(1, 2, 12, 8)
    local = TokenLayout(num_tokens=12, grid=(8,), text=slice(0, 4))
    with pytest.raises(ConfigError, match="attention masks"):
        parallel.attend_context_parallel(get_method("dense"), q, k, v, local, RunContext(grid=(4, 4)), _config(),
                                         who="method 'dense'", attn_mask=torch.ones(1, 1, 1, 12, dtype=torch.bool))
    padded = TokenLayout(num_tokens=12, grid=(8,), text=slice(0, 4), text_lengths=(3,))
    with pytest.raises(ConfigError, match="padded prompts"):
        parallel.attend_context_parallel(get_method("dense"), q, k, v, padded, RunContext(grid=(4, 4)), _config(),
                                         who="method 'dense'")
    with pytest.raises(ConfigError, match="'msw' does not support context parallelism"):
        parallel.attend_context_parallel(get_method("msw"), q, k, v, local, RunContext(grid=(4, 4)), _config(),
                                         who="method 'msw'")


@pytest.mark.parametrize("cross", [True, False])
def test_attend_context_parallel_unsharded_call_is_the_method_on_the_shard(cross):
    """A call dispatched without the parallel config (its tensors are not sharded as a sequence) or a cross layout
    runs the method on the local tensors: no exchange (none could run here: the config has no process group)."""
    g = torch.Generator().manual_seed(3)
    keys = 5 if cross else 12
    q, k, v = (torch.randn(1, 2, n, 8, generator=g) for n in (12, keys, keys))
    local = (TokenLayout(num_tokens=12, grid=None, is_cross=True, num_keys=5) if cross
             else TokenLayout(num_tokens=12, grid=(3, 4)))
    method = get_method("dense")
    got = parallel.attend_context_parallel(method, q, k, v, local, RunContext(grid=(4, 6)), _config(),
                                           who="method 'dense'", sharded=False)
    assert torch.equal(got, method(q, k, v, local, RunContext(grid=(4, 6))))
    if cross:  # a cross layout stays local even when the call is sharded (queries sharded, keys whole)
        got = parallel.attend_context_parallel(method, q, k, v, local, RunContext(grid=(4, 6)), _config(),
                                               who="method 'dense'", sharded=True)
        assert torch.equal(got, method(q, k, v, local, RunContext(grid=(4, 6))))


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_routed_flux_and_wan_refuse_methods_without_context_parallel_before_projecting(family, monkeypatch):
    from tests.test_compile import denoiser_inputs, tiny_denoiser

    model = tiny_denoiser(family)
    processor = diffaccel.apply(model, "msw")
    _pretend(processor, _config())
    from diffaccel.pipelines.adapters import dispatch

    monkeypatch.setattr(dispatch, "routed_function", lambda cls: pytest.fail("ran the stock processor"))
    with pytest.raises(ConfigError, match="'msw' does not support context parallelism"):
        with torch.no_grad():
            model(**denoiser_inputs(family))


def test_supported_families_are_the_routed_flux_and_wan():
    from diffaccel.pipelines.adapters.base import _ADAPTERS, _load_builtin_adapters

    _load_builtin_adapters()
    for name in ("FluxAttnProcessor", "FluxIPAdapterAttnProcessor", "WanAttnProcessor"):
        adapter = _ADAPTERS[name]
        assert getattr(adapter, "runs_stock", False) and adapter.family in parallel.SUPPORTED_FAMILIES
