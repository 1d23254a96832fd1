"""PSNR and SSIM: against torchmetrics (when importable), and their defining properties."""

from __future__ import annotations

import math

import pytest
import torch

from diffaccel.eval.fidelity import Fidelity, compare, gaussian_window, psnr, ssim


def noisy_pair(shape, noise=0.1, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=dtype)
    y = (x + noise * torch.randn(shape, generator=g, dtype=dtype)).clamp(0, 1)
    return x, y


@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (2, 3, 40, 37), (4, 1, 11, 64)])
def test_ssim_matches_torchmetrics(shape):
    tm = pytest.importorskip("torchmetrics.functional.image")
    x, y = noisy_pair(shape, seed=sum(shape))
    ref_reflect = float(tm.structural_similarity_index_measure(y, x, data_range=1.0))
    assert ssim(x, y, border="reflect") == pytest.approx(ref_reflect, rel=1e-10, abs=1e-12)
    # torchmetrics pads by reflection; its full map cropped to the valid region is the paper's SSIM.
    _, full = tm.structural_similarity_index_measure(y, x, data_range=1.0, return_full_image=True)
    ref_valid = float(full[..., 5:-5, 5:-5].mean())
    assert ssim(x, y) == pytest.approx(ref_valid, rel=1e-10, abs=1e-12)


def test_psnr_matches_torchmetrics():
    tm = pytest.importorskip("torchmetrics.functional.image")
    x, y = noisy_pair((2, 3, 16, 16))
    assert psnr(x, y) == pytest.approx(float(tm.peak_signal_noise_ratio(y, x, data_range=1.0)), rel=1e-6)  # torchmetrics: float32 log


def test_psnr_known_value():
    x = torch.full((3, 8, 8), 0.25)
    assert psnr(x, x + 0.1) == pytest.approx(20.0, abs=1e-4)  # MSE 0.01 -> 20 dB
    assert psnr(x * 2, x * 2 + 0.2, data_range=2.0) == pytest.approx(20.0, abs=1e-4)


def test_identical_inputs():
    x = torch.rand(2, 3, 24, 24)
    assert psnr(x, x) == math.inf
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    assert compare(x, x) == Fidelity(psnr=math.inf, ssim=pytest.approx(1.0, abs=1e-12))


def test_symmetric_and_monotone_in_noise():
    x, y = noisy_pair((1, 3, 32, 32), noise=0.05)
    assert ssim(x, y) == pytest.approx(ssim(y, x), rel=1e-12)
    assert psnr(x, y) == pytest.approx(psnr(y, x), rel=1e-12)
    scores = [ssim(*noisy_pair((1, 3, 32, 32), noise=n, seed=1)) for n in (0.02, 0.1, 0.3)]
    assert scores[0] > scores[1] > scores[2]
    values = [psnr(*noisy_pair((1, 3, 32, 32), noise=n, seed=1)) for n in (0.02, 0.1, 0.3)]
    assert values[0] > values[1] > values[2]


def test_video_is_the_mean_over_frames():
    x, y = noisy_pair((5, 3, 16, 16))
    frames = [ssim(x[i], y[i]) for i in range(5)]
    assert ssim(x, y) == pytest.approx(sum(frames) / 5, rel=1e-12)
    assert ssim(x[None], y[None]) == pytest.approx(ssim(x, y), rel=1e-12)  # (B, F, C, H, W)
    assert ssim(x, y, chunk=2) == pytest.approx(ssim(x, y), rel=1e-12)
    assert psnr(x[None], y[None]) == pytest.approx(psnr(x, y), rel=1e-12)


def test_low_precision_inputs_are_computed_in_float32():
    x, y = noisy_pair((1, 3, 16, 16), dtype=torch.float32)
    assert ssim(x.half(), y.half()) == pytest.approx(ssim(x.half().float(), y.half().float()), rel=1e-6)


def test_nan_is_reported_not_hidden():
    x = torch.rand(3, 16, 16)
    y = x.clone()
    y[0, 0, 0] = float("nan")
    assert math.isnan(psnr(x, y))
    assert math.isnan(ssim(x, y))


def test_gaussian_window():
    g = gaussian_window(11, 1.5, torch.float64)
    assert g.sum().item() == pytest.approx(1.0)
    assert torch.equal(g, g.flip(0)) and int(g.argmax()) == 5
    with pytest.raises(ValueError, match="kernel_size"):
        gaussian_window(10)


@pytest.mark.parametrize(
    "x, y, kwargs, match",
    [
        (torch.rand(3, 16, 16), torch.rand(3, 16, 17), {}, "same shape"),
        (torch.zeros(3, 16, 16, dtype=torch.uint8), torch.zeros(3, 16, 16, dtype=torch.uint8), {}, "floating-point"),
        (torch.rand(3, 8, 8), torch.rand(3, 8, 8), {}, "at least kernel_size=11"),
        (torch.rand(3, 16, 16), torch.rand(3, 16, 16), {"data_range": 0}, "data_range"),
        (torch.rand(3, 16, 16), torch.rand(3, 16, 16), {"border": "zeros"}, "border"),
        (torch.rand(1, 1, 1, 1, 16, 16), torch.rand(1, 1, 1, 1, 16, 16), {}, "2 to 5 dims"),
    ],
)
def test_bad_input(x, y, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ssim(x, y, **kwargs)
