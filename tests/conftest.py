"""Test setup: Triton's interpreter on CPU (set before diffaccel.kernels is imported), offline hubs, seeds.

On a CUDA machine the kernels run compiled (unset TRITON_INTERPRET or set it to 0 there).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_fresh_warnings():
    from diffaccel.warn import reset_warnings

    torch.manual_seed(0)
    reset_warnings()
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
