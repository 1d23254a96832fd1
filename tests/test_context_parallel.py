"""diffaccel under diffusers' context parallelism (issue 17): two CPU processes with gloo equal one process.

The two-process runs (tests/cp_helpers.py) spawn once per test session (module fixture) and run every case: tiny
Wan and FLUX transformers with dense, gna, tile (one frame list per head) and AdaSpa (head tiers ranked across
ranks), with ``ContextParallelConfig(ulysses_degree=2)``, against the same method in one process (fp32, 1e-5), both
install orders (diffaccel.apply before and after enable_parallelism), dense under ring_degree=2, and every config
diffaccel cannot honour (each must raise a clear error, never return a result). gloo's ``all_to_all_single`` serves
diffusers' ``_all_to_all_single`` directly (no fallback path is needed on the CPU).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import cp_helpers
from diffaccel.context import RunContext
from diffaccel.errors import ConfigError, LayoutError
from diffaccel.layout import TokenLayout
from diffaccel.methods.base import get_method
from diffaccel.pipelines import parallel

TOL = 1e-5


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    result = cp_helpers.spawn(cp_helpers.worker, 2, tmp_path_factory.mktemp("cp"), list(cp_helpers.CASES), True)
    assert "crash" not in result, result.get("crash")
    return result


@pytest.mark.parametrize("case", list(cp_helpers.CASES))
def test_two_processes_equal_one(two_ranks, case):
    got = two_ranks["cases"][case]
    assert got["finite"]
    assert got["diff"] <= TOL, f"{case}: two-process output differs from one process by {got['diff']}"
    counts, ref_counts = got["counts"], got["ref_counts"]
    assert counts == ref_counts
    if not case.endswith("-dense"):
        assert counts[0] > 0 and counts[1] == 0, f"{case} must run the method, not dense: {counts}"


def test_stock_diffusers_context_parallel_is_exact_on_gloo(two_ranks):
    assert two_ranks["stock_diff"] <= TOL


def test_ring_dense_equals_one_process(two_ranks):
    assert float(two_ranks["errors"]["ring-dense-diff"]) <= TOL


@pytest.mark.parametrize(
    "case, words",
    [
        ("ring-msw", ["'msw'", "ring_degree=2", "log-sum-exp", "dense"]),
        ("ulysses-unsupported-method", ["'msw'", "ulysses_degree=2", "adaspa, dense, gna, tile"]),
        ("ulysses-unsupported-method-cp-first", ["'vmoba'", "ulysses_degree=2"]),
        ("uneven-heads", ["3 attention heads", "ulysses_degree=2", "supported: 3"]),
        ("ulysses-anything", ["ulysses_anything", "not supported"]),
        ("bare-processor-after-cp", ["'dense'", "2 ranks", "diffaccel.apply"]),
    ],
)
def test_unsupported_configs_raise(two_ranks, case, words):
    msg = two_ranks["errors"][case]
    assert msg is not None, f"{case} returned a result instead of raising"
    assert msg.startswith("ConfigError"), msg
    for word in words:
        assert word in msg, (word, msg)


# ------------------------------------------------------------------------------------- one process, no collectives


def _gathered(local: TokenLayout, world: int) -> torch.Tensor:
    """Token ids of the model's order as ranks hold them after the all-to-all: rank 0's shard, rank 1's, ..."""
    t, v = local.num_text, local.num_tokens - local.num_text
    text, visual = torch.arange(t * world), t * world + torch.arange(v * world)  # model order: text then visual
    shards = []
    for r in range(world):
        parts = [text[r * t:(r + 1) * t], visual[r * v:(r + 1) * v]]
        shards += parts if local.text_first else parts[::-1]
    return torch.cat(shards)


@pytest.mark.parametrize("text_first", [True, False])
@pytest.mark.parametrize("world", [2, 3])
def test_model_order_restores_the_sequence(text_first, world):
    t, v = 2, 5
    text = slice(0, t) if text_first else slice(v, v + t)
    local = TokenLayout(num_tokens=t + v, grid=(v,), text=text)
    ids = _gathered(local, world)
    order = parallel.model_order(local, world)
    restored = ids[order]
    if text_first:
        assert restored.tolist() == list(range((t + v) * world))
    else:  # visual first in the model: visual ids come after the text ids in _gathered's numbering
        assert restored.tolist() == list(range(t * world, (t + v) * world)) + list(range(t * world))
    assert torch.equal(restored[torch.argsort(order)], ids)


def test_model_order_without_text_is_identity():
    assert parallel.model_order(TokenLayout(num_tokens=6, grid=(6,)), 2) is None


def test_global_layout_is_the_single_process_layout():
    local = TokenLayout(num_tokens=36, grid=(32,), text=slice(0, 4))
    glob = parallel.global_layout(local, 2, (8, 8))
    assert glob == TokenLayout(num_tokens=72, grid=(8, 8), text=slice(0, 8))
    local = TokenLayout(num_tokens=36, grid=(32,), text=slice(32, 36))
    assert parallel.global_layout(local, 2, (8, 8)).text == slice(64, 72)
    with pytest.raises(LayoutError):
        parallel.global_layout(local, 2, (8, 9))  # a grid the shards do not hold


def test_shard_context_splits_grid_and_text():
    ctx = RunContext(grid=(4, 4, 4), text_len=8, step=3)
    shard = parallel.shard_context(ctx, 2, "dense")
    assert shard is not ctx and math.prod(shard.grid) == 32 and len(shard.grid) == 3
    assert shard.text_len == 4 and shard.step == 3 and ctx.grid == (4, 4, 4) and ctx.text_len == 8
    with pytest.raises(LayoutError, match="diffaccel.apply"):
        parallel.shard_context(RunContext(), 2, "dense")
    with pytest.raises(LayoutError, match="does not split into 2"):
        parallel.shard_context(RunContext(grid=(3, 3)), 2, "dense")
    with pytest.raises(LayoutError, match="7 text tokens"):
        parallel.shard_context(RunContext(grid=(4, 4), text_len=7), 2, "dense")


def _cp(ring=1, ulysses=1, **kw):
    return SimpleNamespace(ring_degree=ring, ulysses_degree=ulysses, **kw)


def test_check_method_modes():
    assert parallel.check_method(get_method("dense"), _cp(ulysses=2)) == "ulysses"
    assert parallel.check_method(get_method("dense"), _cp(ring=2)) == "ring"
    for name in ("gna", "tile", "adaspa"):
        assert parallel.check_method(get_method(name), _cp(ulysses=4)) == "ulysses"
        with pytest.raises(ConfigError, match=f"'{name}' cannot run with ring_degree=2"):
            parallel.check_method(get_method(name), _cp(ring=2))
    with pytest.raises(ConfigError, match="one of the two"):
        parallel.check_method(get_method("dense"), _cp(ring=2, ulysses=2))
    with pytest.raises(ConfigError, match="'paro' does not support context parallelism"):
        parallel.check_method(get_method("paro"), _cp(ulysses=2))
    assert parallel.supported_methods("ring") == ["dense"]


def test_unsupported_family_raises_before_any_exchange():
    adapter = SimpleNamespace(family="sd3", project=lambda *a: pytest.fail("projected an unsupported family"))
    config = SimpleNamespace(context_parallel_config=_cp(ulysses=2))
    with pytest.raises(ConfigError, match="families wan, flux only"):
        parallel.run_context_parallel(get_method("gna"), adapter, torch.nn.Identity(), None, RunContext(), config)


def test_attach_reads_the_model_config_and_checks_the_method():
    processor = SimpleNamespace(method=get_method("msw"), _parallel_config=None)
    model = SimpleNamespace(_parallel_config=SimpleNamespace(context_parallel_config=_cp(ulysses=2)))
    with pytest.raises(ConfigError, match="'msw'"):
        parallel.attach(processor, model)
    processor = SimpleNamespace(method=get_method("dense"), _parallel_config=None)
    parallel.attach(processor, model)
    assert processor._parallel_config is model._parallel_config
    assert parallel.parallel_config(processor) is model._parallel_config
    parallel.attach(processor := SimpleNamespace(method=get_method("msw"), _parallel_config=None),
                    SimpleNamespace(_parallel_config=None))
    assert parallel.parallel_config(processor) is None


# ------------------------------------------------------------------------------------------------ the CLI launcher


def test_generate_cp_2_launches_torchrun_and_rank_0_writes(tmp_path):
    """``diffaccel generate --cp 2`` on tiny FLUX: two gloo ranks, one table, one image, equal to one process."""
    import os
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    from diffaccel.run import GenerateOptions, generate

    args = ["generate", "-m", "gna", "--model", "tiny-flux", "--steps", "1", "--warmup", "0", "--repeats", "1",
            "--no-compare", "--set", "backend=reference", "--set", "block_size=16"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-m", "diffaccel.cli", *args, "--cp", "2", "--out", str(tmp_path / "cp")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    # rank 0 prints; rank 1 neither prints nor writes
    assert sum(line.startswith("image:") for line in lines) == 1, proc.stdout
    written = sorted(p.name for p in (tmp_path / "cp").iterdir())
    assert written == ["tiny-flux_gna.png"]
    one = generate(GenerateOptions(method="gna", params={"backend": "reference", "block_size": 16}, model="tiny-flux",
                                   steps=1, warmup=0, repeats=1, compare=False, out=tmp_path / "one"))
    assert one.runs[-1].note is None  # the method ran (no dense fallback)
    two = np.asarray(Image.open(tmp_path / "cp" / "tiny-flux_gna.png"))
    ref = np.asarray(Image.open(one.output_path))
    assert two.shape == ref.shape and np.array_equal(two, ref)


def test_generate_cp_needs_torchrun_and_a_supported_method(tmp_path, monkeypatch):
    from diffaccel.run import GenerateOptions, generate

    for name in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="torchrun"):
        generate(GenerateOptions(method="dense", model="tiny-flux", cp=2, out=tmp_path))
    with pytest.raises(ConfigError, match="'msw' does not support context parallelism"):
        generate(GenerateOptions(method="msw", model="tiny-flux", cp=2, out=tmp_path))
    with pytest.raises(ConfigError, match="cp must be an integer >= 1"):
        generate(GenerateOptions(method="dense", model="tiny-flux", cp=0, out=tmp_path))


def test_torchrun_command_keeps_the_arguments():
    from diffaccel import multigpu

    cmd = multigpu.torchrun_command(4, ["generate", "-m", "gna", "--cp", "4"])
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"]
    assert cmd[5:] == ["-m", "diffaccel.cli", "generate", "-m", "gna", "--cp", "4"]
