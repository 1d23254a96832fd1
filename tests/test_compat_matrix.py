"""The compatibility matrix as a test (issue 11, item 6): no cell fails silently or gives a wrong result, and the
README table is the one the matrix produces (``python benchmarks/compat_matrix.py`` rewrites it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffaccel.bench.compat import FEATURES, MARK_BEGIN, MARK_END, readme_block, render_table, run_matrix
from diffaccel.methods.base import list_methods

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def matrix():
    torch._dynamo.reset()
    yield run_matrix()
    torch._dynamo.reset()


def test_every_cell_passes_or_is_a_clear_refusal(matrix):
    assert sorted(matrix) == list_methods()
    for name, cells in matrix.items():
        assert set(cells) == set(FEATURES), name
        for feature, status in cells.items():
            assert status == "pass" or status.startswith(("refused: ", "n/a: ")), f"{name} x {feature}: {status}"


def test_readme_table_is_current(matrix):
    text = README.read_text()
    start, end = text.index(MARK_BEGIN), text.index(MARK_END) + len(MARK_END)
    assert text[start:end] == readme_block(matrix), "run: python benchmarks/compat_matrix.py"


def test_render_table_footnotes_refusals_and_failures():
    table = render_table({"m": {"deepcopy": "pass", "LoRA": "n/a: peft missing", "fused QKV": "FAIL: silent"}})
    row = next(line for line in table.splitlines() if line.startswith("| m |"))
    assert row == "| m | FAIL [1] | FAIL [1] | FAIL [2] | n/a [3] | FAIL [1] | pass | FAIL [1] | FAIL [1] |"
    assert "[1] FAIL: not run" in table and "[2] FAIL: silent" in table and "[3] n/a: peft missing" in table
