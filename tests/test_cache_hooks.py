"""diffusers' cache hooks (``transformer.enable_cache(config)``) with diffaccel's processors (issue 11, item 5).

Every cache config that the installed diffusers exports is listed (a new one fails the listing test until it is
added here). Each runs on the tiny FLUX and Wan pipelines with ``dense`` (the oracle: equal to the stock processors
under the same cache) and with a sparse method (``gna``); where the stock processors fail under a config on these
pipelines, diffaccel must fail the same way (never worse than stock).
"""

from __future__ import annotations

import diffusers.hooks as dh
import pytest
import torch

import diffaccel
from diffaccel.pipelines.tiny import build_tiny, tiny_spec

STEPS = 2


def _configs(pipe):
    timestep = lambda: pipe.current_timestep  # noqa: E731
    return {
        "FirstBlockCacheConfig": lambda: dh.FirstBlockCacheConfig(threshold=0.2),
        "TaylorSeerCacheConfig": lambda: dh.TaylorSeerCacheConfig(),
        "MagCacheConfig": lambda: dh.MagCacheConfig(mag_ratios=[1.0] * STEPS, num_inference_steps=STEPS),
        "PyramidAttentionBroadcastConfig": lambda: dh.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, current_timestep_callback=timestep),
        "FasterCacheConfig": lambda: dh.FasterCacheConfig(
            spatial_attention_block_skip_range=2, current_timestep_callback=timestep),
        "SeaCacheConfig": lambda: dh.SeaCacheConfig(),
        "TextKVCacheConfig": lambda: dh.TextKVCacheConfig(),
    }


NOT_CACHES = {"LayerSkipConfig", "SmoothedEnergyGuidanceConfig"}
"""Configs in diffusers.hooks that are guidance helpers, not ``enable_cache`` configs."""


def test_every_installed_cache_config_is_covered():
    exported = {n for n in dir(dh) if n.endswith("Config")} - NOT_CACHES
    assert exported == set(_configs(None))


@pytest.fixture(scope="module", params=["tiny-flux", "tiny-wan"])
def pipe(request):
    return build_tiny(request.param), request.param


def _run(pipe, name):
    kwargs = tiny_spec(name).call_kwargs(num_inference_steps=STEPS, output_type="latent")
    with torch.no_grad():
        return pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs)[0]


def _with_cache(pipe, name, config, method):
    if method is not None:
        diffaccel.apply(pipe, method, **({} if method == "dense" else
                                         {"kernel_size": 3, "block_size": 16, "backend": "reference"}))
    try:
        pipe.transformer.enable_cache(config)
        try:
            return _run(pipe, name), None
        except Exception as error:  # noqa: BLE001 - compared with what the stock processors raise
            return None, error
        finally:
            pipe.transformer.disable_cache()
    finally:
        diffaccel.remove(pipe)


@pytest.mark.parametrize("config_name", sorted(_configs(None)))
def test_cache_config_with_dense_equals_stock_and_a_sparse_method_runs(pipe, config_name):
    pipe, name = pipe
    make = _configs(pipe)[config_name]
    stock, stock_error = _with_cache(pipe, name, make(), None)
    dense, dense_error = _with_cache(pipe, name, make(), "dense")
    sparse, sparse_error = _with_cache(pipe, name, make(), "gna")
    if stock_error is not None:  # a limitation of the cache on this pipeline: the same error, not a new one
        assert type(dense_error) is type(stock_error) and type(sparse_error) is type(stock_error), (
            stock_error, dense_error, sparse_error)
        return
    assert dense_error is None and sparse_error is None, (dense_error, sparse_error)
    torch.testing.assert_close(dense, stock, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(sparse).all()
