"""diffaccel under ``torch.compile`` / ``torch.export``: the method call and the run hook as opaque custom ops.

A diffaccel method is Python with state (plans cached per layer, dense warm-up steps, online routers); traced by
dynamo, every Python value it reads (the layer name, the step, a cached plan) becomes a guard, so a regional
compile recompiles once per block and a full compile once per step, and host reads (plan checks, ``.item()``)
break the graph. Under compilation the processor therefore calls the method through one custom op,
``diffaccel::attend``, which dynamo keeps opaque (its fake implementation gives only the output's shape and
dtype); the method runs eagerly inside it, at graph run time, exactly as without compile. What the op needs to
find its state comes in as graph values that never guard on per-layer Python state:

* the layer: a fixed-size ``uint8`` tensor holding the module's qualified name (``layer_token``), an attribute
  that :func:`diffaccel.apply` puts on every attention module. Dynamo lifts it as a graph input (guarded on shape
  and dtype only), so one block graph serves every block of ``compile_repeated_blocks``;
* the processor: an int key (one processor serves every layer, so the key is the same constant in every block);
* the layout: its fields as a short string (equal for every block of one resolution).

A full-model compile also traces the denoiser's pre-hook, whose Python side effects dynamo applies only after the
graph has run; the run state (step, timestep) is therefore recorded by a second op, ``diffaccel::begin_call``,
at graph run time, and its output (a copy of ``hidden_states``) feeds the model, so every ``attend`` op runs after
it. The grid and text length still come from shapes and from Python ints recorded by the pipeline (never from
tensor values) because the adapters' traced layout code needs them.

References: PyTorch custom operators (``torch.library.custom_op``, ``register_fake``), and the practice of wrapping
attention kernels as opaque ops (SageAttention, FlashAttention's ``torch.library`` registration).
"""

from __future__ import annotations

import itertools
import weakref
from functools import lru_cache
from typing import Any, Optional

import torch

from diffaccel.errors import LayoutError
from diffaccel.layout import TokenLayout

NAME_BYTES = 192
"""Length of the layer-name token: qualified names up to this many UTF-8 bytes (padded with zeros), so every
token has one shape and one guard."""

_TOKEN_ATTR = "_diffaccel_layer_token"
_PROCESSORS: dict[int, "weakref.ref[Any]"] = {}
_KEYS = itertools.count(1)


def register_processor(processor: Any) -> int:
    """A process-local key for ``processor`` (weakly held), the op's way back to the method and the run context."""
    key = next(_KEYS)
    _PROCESSORS[key] = weakref.ref(processor, lambda _ref, key=key: _PROCESSORS.pop(key, None))
    return key


def processor_for_key(key: int) -> Any:
    ref = _PROCESSORS.get(int(key))
    processor = None if ref is None else ref()
    if processor is None:
        raise LayoutError(
            f"diffaccel: no live processor has key {key}; a compiled graph or exported program refers to a processor "
            "of another process or one that was freed. Re-run diffaccel.apply and compile again"
        )
    return processor


def layer_token(name: str) -> torch.Tensor:
    """The ``uint8`` tensor ``(NAME_BYTES,)`` that carries ``name`` into compiled graphs."""
    raw = name.encode("utf-8")
    if len(raw) > NAME_BYTES:
        raise LayoutError(f"layer name {name!r} is longer than {NAME_BYTES} bytes; it cannot be carried as a token")
    token = torch.zeros(NAME_BYTES, dtype=torch.uint8)
    if raw:
        token[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return token


def token_name(token: torch.Tensor) -> str:
    """The name :func:`layer_token` encoded (the token lives on the CPU: reading it never syncs a device)."""
    return _decode(bytes(token.tolist()))


@lru_cache(maxsize=4096)
def _decode(raw: bytes) -> str:
    return raw.rstrip(b"\x00").decode("utf-8")


def set_layer_token(module: torch.nn.Module, name: str) -> None:
    """Give an attention module its layer token (a plain attribute: not a buffer, so not in the state dict and
    never moved to the GPU by ``.to()``)."""
    module.__dict__[_TOKEN_ATTR] = layer_token(name)


def get_layer_token(module: torch.nn.Module) -> torch.Tensor:
    token = module.__dict__.get(_TOKEN_ATTR)
    if token is None:
        raise LayoutError(
            f"{type(module).__name__} runs a diffaccel processor under torch.compile but has no layer token: install "
            "with diffaccel.apply(pipe_or_model, method) before compiling (a bare set_attn_processor does not name "
            "the layers)"
        )
    return token


# ------------------------------------------------------------------------------------------------ layout codec
def encode_layout(layout: TokenLayout) -> str:
    """The layout's fields as a string of ints (constant-folded by dynamo: only ints, ``str`` and ``join``)."""
    def ints(values: Any) -> str:
        return "n" if values is None else ".".join([str(int(x)) for x in values])

    text = None if layout.text is None else (layout.text.start, layout.text.stop)
    parts = [
        str(int(layout.num_tokens)),
        ints(layout.grid),
        ints(text),
        "1" if layout.is_cross else "0",
        "n" if layout.num_keys is None else str(int(layout.num_keys)),
        ints(layout.text_lengths),
        str(int(layout.downsample)),
        "1" if layout.hierarchical else "0",
        str(int(layout.finest_downsample)),
    ]
    return "|".join(parts)


@lru_cache(maxsize=1024)
def decode_layout(encoded: str) -> TokenLayout:
    """The :class:`TokenLayout` :func:`encode_layout` described."""
    parts = encoded.split("|")

    def ints(s: str) -> tuple[int, ...] | None:
        return None if s == "n" else (tuple(int(x) for x in s.split(".")) if s else ())

    text = ints(parts[2])
    return TokenLayout(
        num_tokens=int(parts[0]),
        grid=ints(parts[1]),
        text=None if text is None else slice(text[0], text[1]),
        is_cross=parts[3] == "1",
        num_keys=None if parts[4] == "n" else int(parts[4]),
        text_lengths=ints(parts[5]),
        downsample=int(parts[6]),
        hierarchical=parts[7] == "1",
        finest_downsample=int(parts[8]),
    )


# ------------------------------------------------------------------------------------------------ the ops
@torch.library.custom_op("diffaccel::attend", mutates_args=())
def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    layer: torch.Tensor,
    processor: int,
    layout: str,
    scale: Optional[float],
) -> torch.Tensor:
    """Run the processor's method on one attention call (eagerly, at graph run time)."""
    proc = processor_for_key(processor)
    ctx = proc.context
    ctx.layer = token_name(layer)
    out = proc.method(q, k, v, decode_layout(layout), ctx, attn_mask=attn_mask, scale=scale)
    out = out.contiguous()
    if any(out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for t in (q, k, v)):
        out = out.clone()  # a custom op's output may not alias its inputs
    return out


@attend.register_fake
def _attend_fake(q, k, v, attn_mask, layer, processor, layout, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("diffaccel::begin_call", mutates_args=())
def begin_call(
    hidden_states: torch.Tensor,
    timestep: Optional[torch.Tensor],
    timestep_value: Optional[float],
    processor: int,
    grid: Optional[list[int]],
    text_len: Optional[int],
) -> torch.Tensor:
    """Record one denoiser call in the run context (step, timestep) at graph run time; returns a copy of
    ``hidden_states`` that the model consumes, so the attention ops of this call run after it."""
    ctx = processor_for_key(processor).context
    ctx.begin_denoiser_call(None if grid is None else tuple(grid), text_len, timestep if timestep is not None
                            else timestep_value)
    return hidden_states.clone()


@begin_call.register_fake
def _begin_call_fake(hidden_states, timestep, timestep_value, processor, grid, text_len):
    return torch.empty_like(hidden_states)


def compiling() -> bool:
    """True while dynamo traces (``torch.compile``, ``torch.export``)."""
    return torch.compiler.is_compiling()
