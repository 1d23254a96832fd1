"""What the online sparse methods (AdaSpa, VMoBA) share: step schedules, run detection, layer indices, padded
prompts, and the overhead accounting of the ``overhead()`` contract.

Online methods decide per input what to keep, so their search or scoring costs time at run time. The contract
(``ARCHITECTURE`` / issue 10): a method instance may define ``overhead() -> dict[str, float] | None`` with the seconds
spent searching or scoring in its last run and the attention time that the sparse calls saved against dense on the
same layers; ``diffaccel generate`` prints it as one line. Times are CUDA events on a GPU (resolved when
``overhead()`` is called, no synchronization per call) and wall clock on the CPU.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from diffaccel.context import RunContext
from diffaccel.layout import TokenLayout
from diffaccel.methods.base import sdpa
from diffaccel.warn import warn_once

ASSUMED_STEPS = 50
"""Steps assumed when the run does not say how many it has (the papers' 50-step runs); a warning says so."""


def run_steps(ctx: RunContext, method: str) -> int:
    """The run's number of steps (``ctx.num_steps``), or :data:`ASSUMED_STEPS` with a one-time warning."""
    if ctx.num_steps is not None and ctx.num_steps > 0:
        return int(ctx.num_steps)
    warn_once(
        f"{method}-num-steps",
        f"{method}: the run does not say how many denoising steps it has; the step schedule assumes "
        f"{ASSUMED_STEPS} (install with diffaccel.apply so the scheduler tells it)",
    )
    return ASSUMED_STEPS


def fraction_steps(fractions: tuple[float, ...], num_steps: int) -> tuple[int, ...]:
    """0-based step indices of fractions of a run: ``round(f * T) - 1`` (at least 0), sorted, distinct.

    AdaSpa's search at "step 10 of 50" (1-based, the last of the 10 dense warm-up steps) is index 9 = 0.2 * 50 - 1.
    """
    return tuple(sorted({max(0, round(f * num_steps) - 1) for f in fractions}))


_INT = re.compile(r"\d+")


def layer_index(name: str | None, seen: dict[str, int]) -> int:
    """The layer's index: the first integer in its qualified name (``blocks.7.attn1`` -> 7, deterministic across
    runs and processes), else the order in which unnamed/unnumbered layers were first seen (``seen`` holds it)."""
    match = _INT.search(name or "")
    if match is not None:
        return int(match.group())
    key = name or ""
    if key not in seen:
        seen[key] = len(seen)
    return seen[key]


class RunTracker:
    """Tells when a new run begins: the step or the denoiser-call count goes back (a new pipeline call re-applies
    the method or restarts the scheduler), so per-run state (masks, LSEs, timings) is never reused across runs."""

    def __init__(self) -> None:
        self.step = -1
        self.calls = -1

    def new_run(self, ctx: RunContext) -> bool:
        new = self.step < 0 or ctx.step < self.step or ctx.denoiser_calls < self.calls
        self.step, self.calls = ctx.step, ctx.denoiser_calls
        return new


class OverheadMeter:
    """Seconds per kind of work of one run, per layer: ``dense`` (SDPA: warm-up), ``dense_lse`` (a dense pass that
    returns the LSE), ``search`` (searching / scoring / mask building), ``sparse`` (the block-sparse kernel).

    ``saved_s`` estimates the attention time saved: for each sparse call, the layer's mean dense time (SDPA calls of
    the same run, else its LSE passes) minus the sparse call's time. Layers with no dense call in the run are left out
    of it (and counted in ``unmatched_sparse_calls``).
    """

    def __init__(self) -> None:
        self.records: list[tuple[str, str, object]] = []

    def reset(self) -> None:
        self.records = []

    @contextmanager
    def time(self, kind: str, layer: str | None, device: torch.device) -> Iterator[None]:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.records.append((kind, layer or "", (start, end)))
        else:
            t0 = time.perf_counter()
            yield
            self.records.append((kind, layer or "", time.perf_counter() - t0))

    def _seconds(self) -> list[tuple[str, str, float]]:
        out = []
        synced = False
        for kind, layer, value in self.records:
            if isinstance(value, tuple):
                if not synced:
                    torch.cuda.synchronize()
                    synced = True
                value = value[0].elapsed_time(value[1]) / 1000.0
            out.append((kind, layer, float(value)))
        return out

    def summary(self) -> dict[str, float] | None:
        if not self.records:
            return None
        rows = self._seconds()
        total: dict[str, float] = defaultdict(float)
        dense: dict[str, list[float]] = defaultdict(list)
        dense_lse: dict[str, list[float]] = defaultdict(list)
        for kind, layer, s in rows:
            total[kind] += s
            if kind == "dense":
                dense[layer].append(s)
            elif kind == "dense_lse":
                dense_lse[layer].append(s)
        saved, unmatched, sparse_calls = 0.0, 0, 0
        for kind, layer, s in rows:
            if kind != "sparse":
                continue
            sparse_calls += 1
            ref = dense.get(layer) or dense_lse.get(layer)
            if not ref:
                unmatched += 1
                continue
            saved += sum(ref) / len(ref) - s
        search = total["search"]
        return {
            "search_s": search,
            "dense_attention_s": total["dense"] + total["dense_lse"],
            "sparse_attention_s": total["sparse"],
            "saved_s": saved,
            "search_over_saved": search / saved if saved > 0 else float("inf"),
            "sparse_calls": float(sparse_calls),
            "unmatched_sparse_calls": float(unmatched),
        }


def with_text_lengths(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: TokenLayout,
    lengths: tuple[int, ...],
    scale: float | None,
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, TokenLayout, str], torch.Tensor],
) -> torch.Tensor:
    """Joint attention whose mask hides padding text keys at the end of the text (a suffix: HunyuanVideo; a prefix:
    Qwen-Image).

    Per group of batch rows with the same number ``L`` of valid text tokens, the valid tokens (visual + ``L``) are a
    plain joint call: ``attend(q, k, v, layout, group_key)``; ``group_key`` ("L<n>") lets the method keep per-group
    state. Padding text queries attend densely over the valid keys, as the stock processor computes them.
    """
    distinct = sorted(set(lengths))
    out = None if len(distinct) == 1 else torch.empty_like(q)
    for length in distinct:
        rows = None if out is None else torch.tensor(
            [i for i, m in enumerate(lengths) if m == length], dtype=torch.long, device=q.device)
        qb, kb, vb = (q, k, v) if rows is None else (t.index_select(0, rows) for t in (q, k, v))
        part = attend_valid_text(qb, kb, vb, layout, int(length), scale,
                                 lambda a, b, c, sub: attend(a, b, c, sub, f"L{length}"))
        if out is None:
            return part
        out.index_copy_(0, rows, part)
    assert out is not None
    return out


def attend_valid_text(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: TokenLayout,
    length: int,
    scale: float | None,
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, TokenLayout], torch.Tensor],
) -> torch.Tensor:
    """Rows whose text has ``length`` valid tokens (valid first, then padding): ``attend`` on the valid tokens alone,
    laid out as an unpadded prompt of ``length`` tokens would be (text still before or after the visual tokens), and
    the padding text queries densely over the valid keys."""
    nv, nt = layout.num_visual, layout.num_text
    if not layout.text_first:
        n = nv + length
        sub = dataclasses.replace(layout, num_tokens=n, text=slice(nv, n) if length else None, text_lengths=None)
        part = attend(q[:, :, :n], k[:, :, :n], v[:, :, :n], sub)
        if n < q.shape[2]:
            part = torch.cat([part, sdpa(q[:, :, n:], k[:, :, :n], v[:, :, :n], scale=scale)], dim=2)
        return part
    if length == nt:
        return attend(q, k, v, dataclasses.replace(layout, text_lengths=None))
    keep = torch.cat([torch.arange(length, device=q.device), torch.arange(nt, nt + nv, device=q.device)])
    qv, kv, vv = (t.index_select(2, keep) for t in (q, k, v))
    sub = dataclasses.replace(layout, num_tokens=length + nv, text=slice(0, length) if length else None,
                              text_lengths=None)
    part = attend(qv, kv, vv, sub)
    padding = sdpa(q[:, :, length:nt], kv, vv, scale=scale)
    return torch.cat([part[:, :, :length], padding, part[:, :, length:]], dim=2)


def padded_mask_supported(name: str, attn_mask: torch.Tensor | None, layout: TokenLayout, batch: int) -> bool:
    """Whether a masked call is the text key-padding kind :func:`with_text_lengths` handles (else: warn, dense)."""
    lengths = layout.text_lengths
    if attn_mask is None:
        return True
    if lengths is None or len(lengths) != batch:
        warn_once(
            f"{name}-mask",
            f"{name}: an attention call with a mask other than a text key-padding mask (valid text first, "
            "layout.text_lengths set by the adapter) runs dense",
        )
        return False
    return True
