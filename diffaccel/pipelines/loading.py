"""Load a pipeline by name: a tiny offline pipeline, a Hugging Face Hub id, or a local folder.

Hub ids and folders take one code path, :meth:`diffusers.DiffusionPipeline.from_pretrained`, which resolves an
existing folder locally and anything else on the Hub (or its cache). Failures become a one-line
:class:`~diffaccel.errors.ModelLoadError` that names the model and the cause.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from diffaccel.errors import ConfigError, ModelLoadError
from diffaccel.pipelines.tiny import build_tiny, is_tiny, tiny_names

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
"""Names accepted for ``dtype`` (plus ``auto``)."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU; a CUDA device must exist."""
    if isinstance(device, torch.device):
        name = str(device)
    else:
        name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} was requested but no CUDA device is available; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r} does not exist; {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type != "cpu":
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto``/``None`` is bfloat16 on CUDA (what FLUX, SD3.5 and Wan are run in) and float32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ConfigError(f"dtype must be one of float32, float16, bfloat16, got {dtype}")
        return dtype
    if dtype is None or str(dtype).lower() == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    key = str(dtype).lower()
    if key not in DTYPES:
        raise ConfigError(f"dtype must be one of auto, {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[key]


def _hub_errors() -> tuple[type[BaseException], ...]:
    """Exception classes that mean 'this model cannot be fetched or read' (not a bug in diffaccel)."""
    errors: list[type[BaseException]] = [OSError, ValueError, ImportError]
    try:
        from huggingface_hub.errors import EntryNotFoundError

        errors.append(EntryNotFoundError)
    except ImportError:  # pragma: no cover - older hubs put it elsewhere; OSError covers them
        pass
    try:
        import httpx

        errors.append(httpx.HTTPError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def _one_line(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _looks_like_path(model: str) -> bool:
    """Paths are told from hub ids (``org/name``) by a leading ``/ . ~``, a backslash, or more than one ``/``."""
    return model.startswith(("/", ".", "~")) or "\\" in model or model.count("/") > 1


def check_model_folder(path: Path, shown: str | None = None) -> None:
    """Raise :class:`ModelLoadError` unless ``path`` is a folder written by ``save_pretrained``.

    ``shown`` is the path as the user wrote it, for the message.
    """
    shown = str(path) if shown is None else shown
    if not path.exists():
        raise ModelLoadError(f"model folder {shown!r} does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"model path {shown!r} is a file; expected a pipeline folder with model_index.json")
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(
            f"folder {shown!r} has no model_index.json: it is not a diffusers pipeline saved with save_pretrained"
        )


def load_pipeline(
    model: str,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device = "auto",
    cpu_offload: bool = False,
    seed: int = 0,
    **from_pretrained_kwargs: Any,
) -> Any:
    """A diffusers pipeline ready to run on ``device`` in ``dtype``.

    Args:
        model: a tiny pipeline name (:func:`~diffaccel.pipelines.tiny.tiny_names`), a local folder written by
            ``save_pretrained``, or a Hub id (``black-forest-labs/FLUX.1-dev``), loaded with
            ``DiffusionPipeline.from_pretrained``.
        dtype: ``auto`` (bfloat16 on CUDA, float32 on CPU), ``float32``, ``float16`` or ``bfloat16``.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        cpu_offload: keep the models on the CPU and move each to the GPU only while it runs
            (``enable_model_cpu_offload``); needs CUDA.
        seed: weight seed of tiny pipelines (ignored for pretrained weights).
        **from_pretrained_kwargs: passed on (``variant``, ``revision``, ...).

    Raises:
        ModelLoadError: unknown tiny name, missing folder, unreachable or unknown Hub id, unreadable files.
        ConfigError: bad dtype or device, or offload without CUDA.
    """
    if not isinstance(model, str) or not model.strip():
        raise ModelLoadError(f"model must be a tiny pipeline name, a Hub id or a folder, got {model!r}")
    model = model.strip()
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if cpu_offload and dev.type != "cuda":
        raise ConfigError("cpu_offload needs a CUDA device (it moves each model to the GPU while it runs)")

    if is_tiny(model):
        pipe = build_tiny(model, seed=seed)  # float32
        if torch_dtype != torch.float32:
            pipe.to(dtype=torch_dtype)
    elif model.startswith("tiny-") and not os.path.exists(model):
        raise ModelLoadError(f"unknown tiny pipeline {model!r}; tiny pipelines: {', '.join(tiny_names())}")
    else:
        pipe = _from_pretrained(model, torch_dtype, from_pretrained_kwargs)

    if cpu_offload:
        pipe.enable_model_cpu_offload(device=dev)
    else:
        pipe.to(dev)
    return pipe


def _dtype_keyword() -> str:
    """``dtype`` where diffusers accepts it (it deprecates ``torch_dtype``), ``torch_dtype`` on older releases."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return "torch_dtype"
    return "dtype"


def _from_pretrained(model: str, torch_dtype: torch.dtype, kwargs: dict[str, Any]) -> Any:
    from diffusers import DiffusionPipeline

    path = Path(os.path.expanduser(model))
    is_folder = path.exists() or _looks_like_path(model)
    if is_folder:
        check_model_folder(path, shown=model)
    source = str(path) if is_folder else model
    try:
        return DiffusionPipeline.from_pretrained(source, **{_dtype_keyword(): torch_dtype}, **kwargs)
    except _hub_errors() as exc:
        if is_folder:
            raise ModelLoadError(f"cannot load folder {model!r}: {_one_line(exc)}") from exc
        if _hub_offline():
            raise ModelLoadError(
                f"cannot load Hub id {model!r}: no such local folder, and it is not in the Hugging Face cache while "
                "HF_HUB_OFFLINE=1 forbids downloads"
            ) from exc
        raise ModelLoadError(f"cannot load Hub id {model!r} (no such local folder): {_hub_reason(exc)}") from exc


def _hub_reason(exc: BaseException) -> str:
    """Why a Hub id did not load, in words a CLI user can act on (diffusers' own text suggests Python keywords
    such as ``local_files_only`` that the command line does not have): the whole message, never cut."""
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    names = {type(e).__name__ for e in chain}
    text = " ".join(str(e) for e in chain)
    if "GatedRepoError" in names or "gated" in text.lower():
        return "the repository is gated: accept its license on huggingface.co and log in (huggingface-cli login)"
    if "RepositoryNotFoundError" in names or "404" in text:
        return "no such repository on the Hub (check the id; private repositories need huggingface-cli login)"
    if names & {"LocalEntryNotFoundError", "ConnectionError", "ConnectTimeout", "ReadTimeout", "OfflineModeIsEnabled"} \
            or "not fully cached" in text or "outgoing traffic has been disabled" in text:
        return ("the Hub could not be reached and the model is not in the Hugging Face cache; connect to the "
                "internet (or set HF_ENDPOINT to a mirror), or pass a local folder or a tiny model (diffaccel models)")
    return " ".join(str(exc).split()) or type(exc).__name__


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))
