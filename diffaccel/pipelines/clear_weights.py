"""CLEAR's distilled attention projections for FLUX: find, check and install them.

Liu et al., "CLEAR: Conv-Like Linearization Revs Pre-Trained Diffusion Transformers Up" (arXiv 2412.16112), repo
``Huage001/CLEAR``. CLEAR fine-tunes only the attention projections of FLUX.1-dev (``attn.to_q``, ``to_k``,
``to_v``, ``to_out`` of every double- and single-stream block) so that a local circular window of radius ``r``
reproduces the dense model; ``distill.py`` saves exactly those parameters, under the transformer's own parameter
names, to a ``safetensors`` file. Released files (Hugging Face ``Huage001/CLEAR``): ``clear_local_{32,16,8}``
(local window only) and ``clear_local_{16,8}_down_4`` (plus pooled key/value tokens with a learned
``spatial_weight``; research/locality.md §4.1-4.3).

Only the local-window variants are supported: the pooled-KV variants need an extra attention branch whose weight
layout is not documented, and are refused with a clear error. The weights are copied into the model's parameters
in place (dtype and device of the model), like loading a LoRA fused; reload the model to undo.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffaccel.errors import ConfigError, ModelLoadError

HUB_REPO = "Huage001/CLEAR"
"""The authors' Hugging Face repository of distilled FLUX.1-dev attention weights."""

_FILE_RE = re.compile(r"clear_local_(\d+)(?:_down_(\d+))?\.safetensors$")
_TRAINED = (".attn.to_q.", ".attn.to_k.", ".attn.to_v.", ".attn.to_out.")
MARK = "_diffaccel_clear_weights"
"""Attribute set on the transformer and on each attention module whose projections were replaced."""


@dataclass(frozen=True)
class ClearWeightsInfo:
    """What :func:`load_clear_weights` installed: the file, the window radius it was distilled for, the modules."""

    path: str
    radius: float | None
    num_tensors: int
    modules: tuple[str, ...]


def clear_filename(radius: float) -> str:
    """Name of the released local-window file for ``radius`` (``clear_local_16.safetensors``)."""
    if float(radius) != int(radius):
        raise ConfigError(f"CLEAR weights exist for integer radii (8, 16, 32), got radius {radius!r}")
    return f"clear_local_{int(radius)}.safetensors"


def _radius_of(path: str) -> tuple[float | None, int | None]:
    m = _FILE_RE.search(os.path.basename(path))
    if m is None:
        return None, None
    return float(m.group(1)), (int(m.group(2)) if m.group(2) else None)


def resolve_clear_file(
    source: str | os.PathLike, *, radius: float | None = None, filename: str | None = None,
    revision: str | None = None,
) -> str:
    """Local path of the weights file: ``source`` is a ``.safetensors`` file, a folder, or a Hub repository id.

    In a folder or Hub repo the file is ``filename`` if given, else ``clear_local_{radius}.safetensors``; a folder
    with a single ``clear_local_*.safetensors`` (or a single ``.safetensors``) needs neither.
    """
    src = os.fspath(source)
    if os.path.isfile(src):
        return src
    if os.path.isdir(src):
        if filename is not None:
            path = os.path.join(src, filename)
            if not os.path.isfile(path):
                raise ModelLoadError(f"no file {filename!r} in {src}")
            return path
        if radius is not None:
            path = os.path.join(src, clear_filename(radius))
            if os.path.isfile(path):
                return path
        candidates = sorted(p.name for p in Path(src).glob("*.safetensors"))
        clear = [c for c in candidates if _FILE_RE.search(c)]
        pick = clear if clear else candidates
        if len(pick) == 1:
            return os.path.join(src, pick[0])
        raise ModelLoadError(
            f"cannot choose the CLEAR weights in {src}: found {', '.join(candidates) or 'no .safetensors file'}; "
            "pass radius= or filename="
        )
    if src.count("/") == 1 and not src.startswith((".", "/")):
        name = filename if filename is not None else (clear_filename(radius) if radius is not None else None)
        if name is None:
            raise ConfigError(f"to download CLEAR weights from the Hub repo {src!r} pass radius= (8, 16, 32) or filename=")
        from huggingface_hub import hf_hub_download

        try:
            return hf_hub_download(repo_id=src, filename=name, revision=revision)
        except Exception as exc:  # network, missing file, offline mode: one actionable message
            raise ModelLoadError(f"could not fetch {name} from the Hub repo {src}: {exc}") from exc
    raise ModelLoadError(f"CLEAR weights source {src!r} is not a file, a folder or a Hub repo id (owner/name)")


def _transformer_of(pipe_or_model: Any) -> torch.nn.Module:
    if isinstance(pipe_or_model, torch.nn.Module):
        return pipe_or_model
    model = getattr(pipe_or_model, "transformer", None)
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"{type(pipe_or_model).__name__} has no transformer to load CLEAR weights into")
    return model


def load_clear_weights(
    pipe_or_model: Any,
    source: str | os.PathLike = HUB_REPO,
    *,
    radius: float | None = None,
    filename: str | None = None,
    revision: str | None = None,
) -> ClearWeightsInfo:
    """Install CLEAR's distilled attention projections into a FLUX transformer (or a pipeline's transformer).

    Every tensor in the file must name an attention projection (``*.attn.to_q/to_k/to_v/to_out.*``) of the model,
    with the model's shape; anything else is refused before a single parameter changes. The radius the weights were
    distilled for is read from the released file names (``clear_local_16`` -> 16) and must match ``radius`` when
    both are known. Use the same radius with ``diffaccel.apply(pipe, "clear", radius=...)``.

    Args:
        pipe_or_model: a FLUX pipeline or its ``FluxTransformer2DModel``.
        source: a ``.safetensors`` file, a local folder, or a Hub repo id (default ``Huage001/CLEAR``).
        radius: window radius in latent tokens; picks ``clear_local_{radius}.safetensors`` in a folder or repo.
        filename: the file inside a folder or repo (overrides ``radius`` for the choice).
        revision: Hub revision.
    """
    from safetensors.torch import load_file

    model = _transformer_of(pipe_or_model)
    path = resolve_clear_file(source, radius=radius, filename=filename, revision=revision)
    file_radius, down = _radius_of(path)
    if down is not None and down > 1:
        raise ConfigError(
            f"{os.path.basename(path)} is CLEAR's down-sampled key/value variant (down_factor {down}); diffaccel "
            "supports the local-window variants only (clear_local_8/16/32.safetensors)"
        )
    if radius is not None and file_radius is not None and float(radius) != file_radius:
        raise ConfigError(f"{os.path.basename(path)} was distilled for radius {file_radius:g}, not radius {radius:g}")
    state = load_file(path)
    if not state:
        raise ConfigError(f"{path} holds no tensors")
    if any("spatial_weight" in key for key in state):
        raise ConfigError(
            f"{path} holds 'spatial_weight' tensors: CLEAR's down-sampled key/value variant, which diffaccel does "
            "not support (use clear_local_8/16/32.safetensors)"
        )
    params = dict(model.named_parameters())
    foreign = sorted(key for key in state if not any(t in key for t in _TRAINED))
    missing = sorted(key for key in state if key not in params and key not in foreign)
    mismatched = sorted(
        f"{key} {tuple(state[key].shape)} vs model {tuple(params[key].shape)}"
        for key in state if key in params and tuple(state[key].shape) != tuple(params[key].shape)
    )
    problems = []
    if foreign:
        problems.append(f"tensors that are not attention projections: {', '.join(foreign[:5])}")
    if missing:
        hint = " (fused QKV projections? call transformer.unfuse_qkv_projections() first)" if any(
            "to_qkv" in n for n in params
        ) else ""
        problems.append(f"parameters the model does not have{hint}: {', '.join(missing[:5])}")
    if mismatched:
        problems.append(f"shape mismatches: {', '.join(mismatched[:5])}")
    if problems:
        raise ConfigError(
            f"{os.path.basename(path)} does not fit {type(model).__name__} (CLEAR weights are for FLUX.1-dev): "
            + "; ".join(problems)
        )
    modules = sorted({key.split(".attn.")[0] + ".attn" for key in state})
    with torch.no_grad():
        for key, tensor in state.items():
            params[key].copy_(tensor.to(dtype=params[key].dtype, device=params[key].device))
    info = ClearWeightsInfo(path=path, radius=file_radius if file_radius is not None else radius,
                            num_tensors=len(state), modules=tuple(modules))
    model.__dict__[MARK] = info
    for name in modules:
        model.get_submodule(name).__dict__[MARK] = info
    return info


def installed_clear_weights(module: torch.nn.Module) -> ClearWeightsInfo | None:
    """What :func:`load_clear_weights` installed on a transformer or an attention module (None if nothing)."""
    return module.__dict__.get(MARK)
