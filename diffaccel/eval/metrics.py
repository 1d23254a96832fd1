"""Per-sample metrics of ``diffaccel eval``: fidelity to dense, LPIPS, CLIP score, and the weights they need.

Fidelity to the dense output of the same prompt and seed needs no download: PSNR and SSIM (torchmetrics'
functional ones; diffaccel's own :mod:`diffaccel.eval.fidelity` where torchmetrics is missing, and the report says
which), the cosine similarity of the final latents (the ``latents`` the pipeline hands its last
``callback_on_step_end``, i.e. after the last scheduler step, before the VAE) and the relative L1 distance of the
decoded outputs, ``sum |out - dense| / sum |dense|``.

Model-based metrics take local weights (``--lpips-weights``, ``--clip-model``) or the library's own cache or
download; when neither works they are *skipped*: :class:`Skipped` carries the one-line reason that the console
and the report show. Downloads are off when ``HF_HUB_OFFLINE`` or ``DIFFACCEL_OFFLINE`` is set (CI and the tests
set them), so nothing downloads in the tests.

LPIPS is Zhang et al., CVPR 2018 (torchmetrics' port, AlexNet backbone); the CLIP score is Hessel et al., EMNLP
2021 (``100 * max(cos(image, text), 0)``, the formula of torchmetrics' ``CLIPScore``, computed here from the
``CLIPModel`` output's embeddings: torchmetrics 1.9 reads ``get_image_features`` as a tensor, which transformers 5
no longer returns, and accepts only Hub ids containing "openai").
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from diffaccel.errors import ConfigError

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
"""torchmetrics' default CLIP for the CLIP score (also the image features of background consistency)."""


@dataclass(frozen=True)
class Skipped:
    """A metric that did not run, and why (one line, shown in the console and in the report)."""

    metric: str
    reason: str

    def line(self) -> str:
        return f"skipped {self.metric}: {self.reason}"


def downloads_allowed() -> bool:
    """False when ``HF_HUB_OFFLINE`` or ``DIFFACCEL_OFFLINE`` is set to a true value."""
    return not any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE", "DIFFACCEL_OFFLINE"))


def importable(module: str) -> bool:
    """Whether ``module`` imports (torchvision may be installed yet fail to import beside another torch)."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return False
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - e.g. torchvision's 'operator torchvision::nms does not exist'
        return False
    return True


def missing_dependency(metric: str, package: str, module: str | None = None, why: str = "") -> Skipped | None:
    """Why ``metric`` cannot run for want of ``package`` (not installed) or ``module`` (installed, but does not
    import: ``why``), or ``None`` when both are there. The one check every optional metric starts with."""
    if importlib.util.find_spec(package) is None:
        return Skipped(metric, f"{package} is not installed (pip install 'diffaccel[eval]')")
    if module is not None and not importable(module):
        return Skipped(metric, f"{module} does not import ({why}; see README: the torch pair)")
    return None


def frames_of(x: torch.Tensor) -> torch.Tensor:
    """An image ``(C, H, W)`` or a video ``(F, C, H, W)`` as a batch ``(N, C, H, W)`` of float32."""
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"expected an image (C, H, W) or a video (F, C, H, W), got shape {tuple(x.shape)}")
    return x.float()


# ----------------------------------------------------------------------------------------------- fidelity


def psnr_ssim(output: torch.Tensor, reference: torch.Tensor) -> tuple[float, float, str]:
    """PSNR (dB over all pixels and frames; ``inf`` when equal) and mean SSIM of ``output`` against ``reference``
    (both in [0, 1]), and the implementation used (``torchmetrics`` or ``diffaccel``)."""
    a, b = frames_of(output), frames_of(reference)
    if a.shape != b.shape:
        raise ValueError(f"output and reference shapes differ: {tuple(a.shape)} and {tuple(b.shape)}")
    if importlib.util.find_spec("torchmetrics") is None:
        from diffaccel.eval.fidelity import psnr, ssim

        return psnr(a, b), ssim(a, b, border="reflect"), "diffaccel"
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    mse = float(torch.mean((a.double() - b.double()) ** 2))
    p = math.inf if mse == 0.0 else float(peak_signal_noise_ratio(a, b, data_range=1.0))
    s = float(structural_similarity_index_measure(a, b, data_range=1.0))
    return p, s, "torchmetrics"


def cosine(a: torch.Tensor | None, b: torch.Tensor | None) -> float | None:
    """Cosine similarity of two tensors flattened (float64); ``None`` without both."""
    if a is None or b is None:
        return None
    x, y = a.detach().double().flatten(), b.detach().double().flatten()
    if x.shape != y.shape:
        raise ValueError(f"latent shapes differ: {tuple(a.shape)} and {tuple(b.shape)}")
    return float(F.cosine_similarity(x, y, dim=0, eps=1e-12))


def relative_l1(output: torch.Tensor, reference: torch.Tensor) -> float:
    """``sum |output - reference| / sum |reference|`` (0 when equal; ``inf`` for a zero reference and a change)."""
    num = float((output.double() - reference.double()).abs().sum())
    den = float(reference.double().abs().sum())
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


# ----------------------------------------------------------------------------------------------- LPIPS

TORCHVISION_ALEXNET = "alexnet-owt-7be5be79.pth"
"""The file name of torchvision's ImageNet AlexNet weights in torch.hub's checkpoint cache."""


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)  # torchvision ships .pth (tensors only)


def build_lpips(weights: str | Path | None) -> Callable[[torch.Tensor, torch.Tensor], float] | Skipped:
    """LPIPS (AlexNet) as ``fn(output, reference) -> float`` (mean over frames), or why it cannot run.

    ``weights``: torchvision's AlexNet state dict (``features.N.*`` keys; ``.pth`` or ``.safetensors``); the linear
    LPIPS layers ship inside torchmetrics. Without it, torchvision's own cache or download is used.
    """
    name = "LPIPS"
    skipped = missing_dependency(name, "torchmetrics", "torchvision", "its AlexNet backbone needs it")
    if skipped is not None:
        return skipped
    from torchmetrics.functional.image.lpips import _NoTrainLpips

    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise ConfigError(f"--lpips-weights {str(path)!r} is not a file (torchvision's AlexNet state dict)")
        state = _read_state(path)
        net = _NoTrainLpips(net="alex", pnet_rand=True)
        wanted = dict(net.net.named_parameters())
        missing = []
        for key, param in wanted.items():
            source = "features." + key.split(".", 1)[1]  # slice1.0.weight -> features.0.weight
            if source not in state or state[source].shape != param.shape:
                missing.append(source)
            else:
                param.data.copy_(state[source])
        if missing:
            raise ConfigError(f"--lpips-weights {str(path)!r} lacks AlexNet tensors {', '.join(missing[:3])}")
    else:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_ALEXNET
        if not cached.is_file() and not downloads_allowed():
            return Skipped(name, f"no --lpips-weights and no {cached} (downloads off)")
        try:
            net = _NoTrainLpips(net="alex")
        except Exception as exc:  # noqa: BLE001 - a failed download is a skip, not a crash
            return Skipped(name, f"no --lpips-weights and torchvision's download failed ({type(exc).__name__})")
    net.eval()

    def lpips(output: torch.Tensor, reference: torch.Tensor) -> float:
        with torch.no_grad():
            value = net(frames_of(output), frames_of(reference), normalize=True)
        return float(value.mean())

    return lpips


# ----------------------------------------------------------------------------------------------- CLIP


def _hub_source(path_or_id: str | None, default: str, flag: str, metric: str) -> str | Skipped:
    """A local folder (must exist), or the default Hub id when downloads are allowed or it is already cached."""
    if path_or_id is not None:
        if not Path(path_or_id).is_dir():
            raise ConfigError(f"{flag} {path_or_id!r} is not a folder (a saved transformers model)")
        return str(path_or_id)
    if downloads_allowed():
        return default
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(default, "config.json"), str):
            return default
    except Exception:  # noqa: BLE001
        pass
    return Skipped(metric, f"no {flag} and {default} is not in the Hugging Face cache (downloads off)")


def build_clip_score(model: str | None) -> Callable[[torch.Tensor, str], float] | Skipped:
    """The CLIP score ``fn(output, prompt) -> float`` (mean over frames for a video), or why it cannot run."""
    name = "CLIP score"
    skipped = missing_dependency(name, "torchmetrics")
    if skipped is not None:
        return skipped
    source = _hub_source(model, DEFAULT_CLIP_MODEL, "--clip-model", name)
    if isinstance(source, Skipped):
        return source
    try:
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(source).eval()
        processor = CLIPProcessor.from_pretrained(source)
    except Exception as exc:  # noqa: BLE001 - a model that cannot load is a skip with its reason
        return Skipped(name, f"cannot load CLIP {source!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})")

    def clip_score(output: torch.Tensor, prompt: str) -> float:
        frames = (frames_of(output).clamp(0, 1) * 255).round().to(torch.uint8)
        images = [f.permute(1, 2, 0).numpy() for f in frames]
        inputs = processor(text=[prompt], images=images, return_tensors="pt", padding=True, truncation=True)
        with torch.no_grad():
            out = model(**inputs)
        cos = F.cosine_similarity(out.image_embeds, out.text_embeds.expand_as(out.image_embeds), dim=-1)
        return float((100 * cos.clamp(min=0)).mean())

    return clip_score
