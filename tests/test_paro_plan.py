"""PARO plan files and plan math: bit packing, timestep buckets, the order metric's sign, block-sum thresholding,
safetensors round trip with a validated header, mismatched plans refused with a message that says what differs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffaccel.errors import ConfigError
from diffaccel.methods.paro import ParoMethod
from diffaccel.methods.paro_plan import (
    HEADER_KEY,
    bucket_of,
    check_num_buckets,
    default_num_buckets,
    keep_from_mass,
    load_plan,
    pack_bits,
    select_orders,
    text_blocks,
    unpack_bits,
)
from paro_helpers import make_plan


@pytest.mark.parametrize("n", [1, 7, 8, 9, 17, 64])
def test_bits_round_trip(n):
    keep = torch.rand(3, 4, n) < 0.5
    packed = pack_bits(keep)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 4, -(-n // 8))
    assert torch.equal(unpack_bits(packed, n), keep)
    one = torch.zeros(1, n, dtype=torch.bool)
    one[0, n - 1] = True
    assert int(pack_bits(one)[0, (n - 1) // 8]) == 1 << ((n - 1) % 8)  # little-endian bit order


def test_buckets_per_step_first_half_one_shared_second_half():
    assert default_num_buckets(30) == 16
    assert [bucket_of(s, 30, 16) for s in range(30)] == list(range(15)) + [15] * 15
    assert [bucket_of(s, 10, 4) for s in range(10)] == [0, 0, 1, 1, 2, 3, 3, 3, 3, 3]
    assert [bucket_of(s, 5, 1) for s in range(5)] == [0] * 5
    assert [bucket_of(s, 5, 3) for s in range(5)] == [0, 1, 2, 2, 2]  # odd: the first half is 5 // 2 = 2 steps
    assert [bucket_of(s, 1, 1) for s in range(1)] == [0]
    check_num_buckets(16, 30)
    with pytest.raises(ConfigError, match="num_buckets"):
        check_num_buckets(17, 30)


def test_order_choice_prefers_sparse_and_coherent_orders():
    # order 1 has the most sparse blocks, order 2 the lowest incoherence
    sparse = torch.tensor([[0.2, 0.9, 0.3]])
    incoherence = torch.tensor([[10.0, 10.0, 2.0]])
    assert select_orders(sparse, incoherence, 1.0).tolist() == [1]  # sparsity only: most sparse wins (1 - M_sparse)
    assert select_orders(sparse, incoherence, 0.0).tolist() == [2]  # incoherence only: least incoherent wins
    same_quant = torch.full((1, 3), 5.0)
    assert select_orders(sparse, same_quant, 0.5).tolist() == [1]
    # normalisation over the orders: scaling one metric by a constant does not change the choice
    assert torch.equal(select_orders(sparse, incoherence * 100, 0.5), select_orders(sparse, incoherence, 0.5))


def test_text_blocks():
    assert text_blocks(40, 6, True, 16).tolist() == [True, False, False]
    assert text_blocks(40, 6, False, 16).tolist() == [False, False, True]
    assert text_blocks(40, 20, True, 16).tolist() == [True, True, False]
    assert text_blocks(40, 0, True, 16).tolist() == [False, False, False]


@pytest.mark.parametrize("density", [0.2, 0.5, 0.77, 1.0])
def test_block_sum_threshold_hits_the_density_and_keeps_the_heaviest(density):
    g = torch.Generator().manual_seed(1)
    heads, nb = 3, 9
    mass = torch.rand(heads, nb, nb, generator=g) ** 4
    flags = torch.zeros(nb, dtype=torch.bool)
    flags[0] = True  # text in block 0
    keep = keep_from_mass(mass, density, flags)
    target = round(density * nb * nb)
    for h in range(heads):
        forced = torch.zeros(nb, nb, dtype=torch.bool)
        forced[0], forced[:, 0] = True, True  # text rows and columns
        forced[torch.arange(nb), mass[h].argmax(-1)] = True  # the heaviest block of every row
        assert int(keep[h].sum()) == max(target, int(forced.sum()))
        assert keep[h][forced].all()
        chosen, dropped = mass[h][keep[h] & ~forced], mass[h][~keep[h]]
        if chosen.numel() and dropped.numel():
            assert chosen.min() >= dropped.max()


def test_save_load_round_trip(tmp_path):
    plan = make_plan()
    path = plan.save(tmp_path / "plan.safetensors")
    loaded = load_plan(path)
    for name in ("orders", "masks", "recall", "kept_density"):
        assert torch.equal(getattr(plan, name), getattr(loaded, name))
    assert loaded.header() == plan.header()
    assert loaded.keep(1, 0).shape == (2, 7, 7)  # 105 + 6 tokens in 16-token blocks
    assert torch.equal(loaded.keep(2, 0), plan.keep(2, 0))
    header = json.loads(__import__("safetensors").safe_open(str(path), "pt").metadata()[HEADER_KEY])
    assert header["grid"] == [3, 5, 7] and header["block"] == 16 and header["orders"][2] == "HWF"


def _message(exc: pytest.ExceptionInfo) -> str:
    return str(exc.value)


def test_mismatched_plans_are_refused_with_what_differs(tmp_path):
    plan = make_plan()
    ok = dict(grid=(3, 5, 7), text_len=6, text_first=True, heads=2, num_steps=4)
    plan.check_call(**ok)
    cases = {
        "grid 3x5x8 (plan: 3x5x7)": dict(ok, grid=(3, 5, 8)),
        "7 text tokens": dict(ok, text_len=7),
        "as a suffix": dict(ok, text_first=False),
        "4 heads (plan: 2)": dict(ok, heads=4),
        "10 steps (plan: 4)": dict(ok, num_steps=10),
    }
    for expected, call in cases.items():
        with pytest.raises(ConfigError, match="recalibrate") as exc:
            plan.check_call(**call)
        assert expected in _message(exc)
    with pytest.raises(ConfigError, match="config hash") as exc:
        plan.check_model("other-model", "ffffffffffffffff")
    assert "other-model" in _message(exc) and "recalibrate" in _message(exc)
    plan.check_model("a folder copy of it", plan.config_hash)  # same config, other id: accepted
    with pytest.raises(ConfigError, match="16-token blocks"):
        ParoMethod(plan=plan, block_size=32)
    with pytest.raises(ConfigError, match="density 0.5"):
        ParoMethod(plan=plan, density=0.3)
    with pytest.raises(ConfigError, match="no entry for attention layer"):
        plan.layer_index("blocks.7.attn1")
    method = ParoMethod(plan=plan)
    with pytest.raises(ConfigError, match="config hash"):
        method.note_model("other", "ffffffffffffffff")


def _write(path: Path, tensors: dict, header: dict | None) -> Path:
    save_file(tensors, str(path), metadata=None if header is None else {HEADER_KEY: json.dumps(header)})
    return path


def test_foreign_or_corrupt_files_are_refused(tmp_path):
    plan = make_plan()
    tensors = {"orders": plan.orders, "masks": plan.masks, "recall": plan.recall, "density": plan.kept_density}
    header = plan.header()
    with pytest.raises(ConfigError, match="does not exist"):
        load_plan(tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError, match="not a diffaccel PARO plan"):
        load_plan(_write(tmp_path / "a.safetensors", tensors, None))
    with pytest.raises(ConfigError, match="'heads' must be int"):
        load_plan(_write(tmp_path / "b.safetensors", tensors, {**header, "heads": "2"}))
    with pytest.raises(ConfigError, match="format version"):
        load_plan(_write(tmp_path / "c.safetensors", tensors, {**header, "format_version": 99}))
    with pytest.raises(ConfigError, match="masks"):
        load_plan(_write(tmp_path / "d.safetensors", {**tensors, "masks": plan.masks[:2]}, header))
    with pytest.raises(ConfigError, match="missing tensors"):
        load_plan(_write(tmp_path / "e.safetensors", {"orders": plan.orders}, header))
    with pytest.raises(ConfigError, match="orders must be axis-order indices"):
        load_plan(_write(tmp_path / "f.safetensors", {**tensors, "orders": plan.orders + 6}, header))
    junk = tmp_path / "g.safetensors"
    junk.write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_plan(junk)


def test_no_pickle_in_the_plan_code():
    import diffaccel.methods.paro as m1
    import diffaccel.methods.paro_plan as m2

    for module in (m1, m2):
        source = Path(module.__file__).read_text()
        assert "import pickle" not in source and "torch.load(" not in source
