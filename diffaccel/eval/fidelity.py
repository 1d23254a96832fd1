"""Fidelity of an accelerated output to the dense one: PSNR and SSIM on images and videos in [0, 1].

Images are ``(C, H, W)`` or a batch ``(N, C, H, W)``; videos are ``(F, C, H, W)`` or ``(B, F, C, H, W)``.
Both metrics treat every frame as an image: PSNR pools the squared error over all elements (one number for
the whole image, batch or video), SSIM averages the SSIM map over all pixels, channels and frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Fidelity:
    """PSNR (dB, ``inf`` for identical inputs) and SSIM (1 for identical inputs) of an output against a reference."""

    psnr: float
    ssim: float


def _as_images(x: torch.Tensor, name: str) -> torch.Tensor:
    """``x`` viewed as ``(N, C, H, W)`` (grayscale ``(H, W)`` becomes ``(1, 1, H, W)``)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor with values in [0, data_range], got {x.dtype}")
    if x.ndim == 2:
        return x[None, None]
    if x.ndim == 3:
        return x[None]
    if x.ndim == 4:
        return x
    if x.ndim == 5:
        return x.reshape(-1, *x.shape[-3:])
    raise ValueError(f"{name} must have 2 to 5 dims ((H, W) ... (B, F, C, H, W)), got shape {tuple(x.shape)}")


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape != y.shape:
        raise ValueError(f"inputs must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    a, b = _as_images(x, "x"), _as_images(y, "y")
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return a.to(dtype), b.to(device=a.device, dtype=dtype)


def _check_range(data_range: float) -> None:
    if not isinstance(data_range, (int, float)) or isinstance(data_range, bool) or not data_range > 0:
        raise ValueError(f"data_range must be a positive number, got {data_range!r}")


def psnr(x: torch.Tensor, y: torch.Tensor, *, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio ``10 log10(data_range^2 / MSE)`` in dB, MSE over all elements; ``inf`` if equal."""
    _check_range(data_range)
    a, b = _check_pair(x, y)
    mse = float(torch.mean((a - b) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def gaussian_window(kernel_size: int = 11, sigma: float = 1.5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The normalised 1-D Gaussian of SSIM (Wang et al. 2004 use size 11, sigma 1.5)."""
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd positive integer, got {kernel_size!r}")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")
    coords = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return (g / g.sum()).to(dtype)


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    data_range: float = 1.0,
    kernel_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    border: str = "valid",
    chunk: int = 16,
) -> float:
    """Mean structural similarity (Wang, Bovik, Sheikh, Simoncelli, IEEE TIP 2004) with a Gaussian window.

    Local statistics use a separable Gaussian (``kernel_size``, ``sigma``) per channel; the SSIM map is averaged
    over pixels, channels and images.

    Args:
        border: ``"valid"`` averages the map where the window fits inside the image, as the paper's reference
            code does; ``"reflect"`` pads the image by reflection and averages the full-size map, as
            torchmetrics' ``structural_similarity_index_measure`` does.
        chunk: images processed at a time, to bound memory on long videos.
    """
    _check_range(data_range)
    if border not in ("valid", "reflect"):
        raise ValueError(f"border must be 'valid' or 'reflect', got {border!r}")
    a, b = _check_pair(x, y)
    h, w = a.shape[-2:]
    if h < kernel_size or w < kernel_size:
        raise ValueError(f"images must be at least kernel_size={kernel_size} pixels on each side, got {h}x{w}")
    pad = (kernel_size - 1) // 2
    g = gaussian_window(kernel_size, sigma, a.dtype).to(a.device)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    step = max(1, int(chunk))
    total, count = 0.0, 0
    for start in range(0, a.shape[0], step):
        pa = a[start : start + step]
        pb = b[start : start + step]
        n, c = pa.shape[:2]
        pa = pa.reshape(n * c, 1, h, w)
        pb = pb.reshape(n * c, 1, h, w)
        if border == "reflect":
            pa = F.pad(pa, (pad, pad, pad, pad), mode="reflect")
            pb = F.pad(pb, (pad, pad, pad, pad), mode="reflect")
        stats = _blur(torch.cat([pa, pb, pa * pa, pb * pb, pa * pb], dim=1), g)
        mu_a, mu_b, e_aa, e_bb, e_ab = stats.unbind(dim=1)
        var_a = e_aa - mu_a**2
        var_b = e_bb - mu_b**2
        cov = e_ab - mu_a * mu_b
        num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
        den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
        smap = num / den
        total += float(smap.sum())
        count += smap.numel()
    return total / count


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter of each channel of ``x`` (``(N, K, H, W)``), valid region only."""
    k = x.shape[1]
    gh = g.view(1, 1, -1, 1).expand(k, 1, -1, 1)
    gw = g.view(1, 1, 1, -1).expand(k, 1, 1, -1)
    return F.conv2d(F.conv2d(x, gh, groups=k), gw, groups=k)


def compare(output: torch.Tensor, reference: torch.Tensor, *, data_range: float = 1.0) -> Fidelity:
    """PSNR and SSIM of ``output`` against ``reference``."""
    return Fidelity(psnr=psnr(output, reference, data_range=data_range), ssim=ssim(output, reference, data_range=data_range))
