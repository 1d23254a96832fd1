"""Shipped weights of the trained tiny pipelines: one fp16 safetensors file per model with a validated header.

The file's metadata holds ``diffaccel_trained`` (JSON): format version, model name, the denoiser config and
how it was trained (device, steps, wall time, final loss, command, seed). Tensors are named
``<component>.<parameter>`` for the components in :data:`COMPONENTS`. Loading checks the format, the model name
and that every expected tensor is present with the right shape before any weight is copied; a mismatch is a
:class:`~diffaccel.errors.ModelLoadError` naming the file and the first bad entry. Never pickle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from diffaccel.errors import ModelLoadError

FORMAT = "diffaccel-trained/1"
COMPONENTS = ("transformer", "text_encoder", "text_encoder_2")
"""Pipeline attributes whose weights a file may hold (those the pipeline has)."""

WEIGHTS_DIR = Path(__file__).parent / "weights"


def weights_path(name: str, folder: Path | None = None) -> Path:
    return (folder or WEIGHTS_DIR) / f"{name}.safetensors"


def save_pipeline_weights(pipe: Any, path: Path, header: dict[str, Any]) -> None:
    """Write the pipeline's :data:`COMPONENTS` in fp16 to ``path`` (and ``header`` next to it as ``.json``)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for comp in COMPONENTS:
        module = getattr(pipe, comp, None)
        if module is None:
            continue
        for key, value in module.state_dict().items():
            tensors[f"{comp}.{key}"] = value.detach().to(torch.float16).contiguous().clone()
    head = dict(header, format=FORMAT)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"diffaccel_trained": json.dumps(head, sort_keys=True)})
    tmp.replace(path)  # an interrupted save never leaves a half-written file under the real name
    path.with_suffix(".json").write_text(json.dumps(head, indent=2, sort_keys=True) + "\n")


def read_header(path: Path) -> dict[str, Any]:
    """The validated JSON header of ``path``."""
    from safetensors import safe_open

    if not path.is_file():
        raise ModelLoadError(f"trained weights {path} not found; rebuild them with `diffaccel train-tiny`")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    try:
        head = json.loads(meta["diffaccel_trained"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: no valid 'diffaccel_trained' JSON header ({exc})") from None
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        raise ModelLoadError(f"{path}: header format {head.get('format') if isinstance(head, dict) else head!r}, expected {FORMAT!r}")
    for key in ("model", "transformer_config", "training"):
        if key not in head:
            raise ModelLoadError(f"{path}: header lacks {key!r}")
    return head


def load_pipeline_weights(pipe: Any, path: Path, model: str) -> dict[str, Any]:
    """Copy the weights of ``path`` into ``pipe`` (float32); returns the header. Validates before copying."""
    from safetensors.torch import load_file

    head = read_header(path)
    if head["model"] != model:
        raise ModelLoadError(f"{path}: holds model {head['model']!r}, expected {model!r}")
    tensors = load_file(str(path))
    states: dict[str, dict[str, torch.Tensor]] = {}
    for comp in COMPONENTS:
        module = getattr(pipe, comp, None)
        if module is None:
            continue
        expected = module.state_dict()
        state = {}
        for key, value in expected.items():
            name = f"{comp}.{key}"
            if name not in tensors:
                raise ModelLoadError(f"{path}: missing tensor {name!r}")
            if tuple(tensors[name].shape) != tuple(value.shape):
                raise ModelLoadError(f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {tuple(value.shape)}")
            state[key] = tensors[name].to(value.dtype)
        states[comp] = state
    for comp, state in states.items():
        getattr(pipe, comp).load_state_dict(state, strict=True)
    return head
