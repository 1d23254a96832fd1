"""Outputs of the end-to-end benchmark: the JSON document, its markdown table and a bar chart.

Files: ``<out>/<date>-<device>-e2e-<model>[-tiny].json`` with ``.md`` and ``.png`` beside it. The JSON holds
``kind`` (``e2e``), ``meta`` (date, command, versions, device, timer), ``config``, ``model`` (configuration,
geometry, guidance mode) and ``rows`` (one per method: status, step time median/min/max and every round, speedup
versus the stock processors, attention / method-call / rest split, peak memory, density kept, warnings);
:func:`check_document` validates that schema (the README generator and the tests read it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from diffaccel.bench.report import device_slug, finite, fmt
from diffaccel.errors import ConfigError

__all__ = ["ROW_KEYS", "check_document", "output_stem", "render_markdown", "render_plot", "write_outputs"]

ROW_KEYS = {
    "method": str, "status": str, "reason": str, "warnings": list, "params": dict, "step_ms": (float, type(None)),
    "step_ms_min": (float, type(None)), "step_ms_max": (float, type(None)), "step_ms_all": list,
    "speedup": (float, type(None)), "speedup_min": (float, type(None)), "speedup_max": (float, type(None)),
    "attention_ms": (float, type(None)), "method_ms": (float, type(None)), "rest_ms": (float, type(None)),
    "breakdown_step_ms": (float, type(None)), "attention_calls": (int, type(None)),
    "peak_memory_gib": (float, type(None)), "density_kept": (float, type(None)), "density_layers": int,
    "overhead": (dict, type(None)),
}  # fmt: skip
"""Every row's keys and their JSON types."""

STATUSES = ("ok", "refused", "oom", "error", "interrupted")
META_KEYS = ("date", "command", "device", "gpu", "torch", "triton", "diffusers", "cuda", "driver", "timer", "kernel_path")
MODEL_KEYS = ("name", "family", "class", "source", "scale", "constructor", "parameters", "geometry", "cfg", "batch",
              "calls_per_step")  # fmt: skip


def check_document(doc: dict) -> None:
    """Raise :class:`ConfigError` naming the first key of an e2e result document that is missing or mistyped."""

    def need(cond: bool, what: str) -> None:
        if not cond:
            raise ConfigError(f"not an e2e result document: {what}")

    need(doc.get("kind") == "e2e", f"kind is {doc.get('kind')!r}, not 'e2e'")
    for section, keys in (("meta", META_KEYS), ("model", MODEL_KEYS)):
        need(isinstance(doc.get(section), dict), f"no {section!r} object")
        for key in keys:
            need(key in doc[section], f"{section}.{key} is missing")
    need(isinstance(doc.get("rows"), list) and doc["rows"], "no rows")
    need(doc["rows"][0]["method"] == "stock", "the first row is not the stock baseline")
    for i, row in enumerate(doc["rows"]):
        for key, kind in ROW_KEYS.items():
            need(key in row, f"rows[{i}].{key} is missing")
            value = row[key]
            if isinstance(value, int) and not isinstance(value, bool) and float in (kind if isinstance(kind, tuple) else (kind,)):
                continue  # JSON writes 2.0 as 2
            need(isinstance(value, kind), f"rows[{i}].{key} = {value!r} is not {kind}")
        need(row["status"] in STATUSES, f"rows[{i}].status {row['status']!r} not in {STATUSES}")
        if row["status"] == "ok":
            need(row["step_ms"] is not None and row["step_ms"] > 0, f"rows[{i}] is ok without a step time")
        else:
            need(bool(row["reason"]), f"rows[{i}] is {row['status']} without a reason")


def output_stem(doc: dict) -> str:
    """``<date>-<device>-e2e-<model>`` (``-tiny`` appended at tiny scale)."""
    suffix = "-tiny" if doc["model"]["scale"] == "tiny" else ""
    return f"{doc['meta']['date'][:10]}-{device_slug(doc['meta'])}-e2e-{doc['model']['name']}{suffix}"


def write_outputs(doc: dict, out_dir: Path | str, *, plot: bool = True) -> dict[str, Path]:
    """Write the JSON, the markdown and (with ``plot``) the bar chart under ``out_dir``; their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = output_stem(doc)
    paths = {"json": out_dir / f"{stem}.json", "markdown": out_dir / f"{stem}.md"}
    if plot:
        paths["plot"] = out_dir / f"{stem}.png"
    document = finite({**doc, "files": {k: p.name for k, p in paths.items()}})
    check_document(document)
    paths["json"].write_text(json.dumps(document, indent=2) + "\n")
    paths["markdown"].write_text(render_markdown(document))
    if plot:
        render_plot(document, paths["plot"])
    return paths


def _range(row: dict, key: str, spec: str, unit: str = "") -> str:
    mid = row.get(key)
    if mid is None:
        return "–"
    lo, hi = row.get(f"{key}_min"), row.get(f"{key}_max")
    text = f"{format(mid, spec)}{unit}"
    return text if lo is None or hi is None else f"{text} ({format(lo, spec)}-{format(hi, spec)}{unit})"


def _overhead_item(key: str, value: float | None) -> str:
    """One entry of a method's ``overhead()``: seconds (keys ending in ``_s``) as ms, counts and ratios as they are;
    a value JSON could not hold (an infinite ratio: nothing saved) as "–"."""
    if value is None or not math.isfinite(value):
        return f"{key} –"
    if key.endswith("_s"):
        return f"{key[:-2]} {1e3 * value:.2f} ms"
    return f"{key} {value:.3g}"


def render_markdown(doc: dict) -> str:
    """A header with the model, size and environment, then one table row per method."""
    meta, model, config = doc["meta"], doc["model"], doc["config"]
    geo = model["geometry"]
    grid = "x".join(str(g) for g in geo["grid"])
    cpu = not str(meta["device"]).startswith("cuda")
    lines = [
        f"# End-to-end step: {model['name']} ({model['scale']}) on {meta.get('gpu') or meta['device']} ({meta['date'][:10]})",
        "",
        f"- model: `{model['class']}` from {model['source']}, {model['parameters'] / 1e6:.1f} M parameters "
        f"({model['weights'] if 'weights' in model else 'random weights'}), {model['attention_modules'] if 'attention_modules' in model else '?'} attention modules",
        f"- size: {geo['height']}x{geo['width']}" + (f", {geo['frames']} frames" if geo["frames"] > 1 else "")
        + f" -> {geo['visual_tokens']} visual tokens ({grid}) + {geo['text_tokens']} text tokens; "
        f"step = {model['calls_per_step']} denoiser call(s) at batch {model['batch']} (guidance: {model['cfg']})",
        f"- methods see step {config['step']} of {config['num_steps']}; {config['warmup']} warm-up step(s), "
        f"{config['rounds']} timed rounds, methods alternated; dtype {config['dtype']}",
        f"- command: `{meta['command']}`",
        f"- torch {meta['torch']}, triton {meta['triton']}, diffusers {meta['diffusers']}, CUDA {meta['cuda']}, "
        f"driver {meta['driver']}; timer: {meta['timer']}; kernels ran as: {meta['kernel_path']}",
        "- attention = every attention module call (projections, norms, RoPE, output projection included), from one "
        "instrumented step; method = the method call inside it (q, k, v to output); rest = that step minus attention; "
        "density = mean fraction of key blocks kept over the layers the method reports",
        "",
    ]
    if cpu:
        lines += ["**CPU run: times measure Python and framework overheads, not GPU speed.**", ""]
    lines += [
        "| method | step ms (min-max) | speedup vs stock (min-max) | attention ms | method ms | rest ms | peak GiB "
        "| density kept | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        notes = [] if r["status"] == "ok" else [f"**{r['status']}**: {r['reason']}"]
        if r.get("overhead"):
            notes.append("overhead " + ", ".join(_overhead_item(k, v) for k, v in r["overhead"].items()))
        notes += r["warnings"][:2]
        density = "–" if r["density_kept"] is None else f"{r['density_kept']:.3f} ({r['density_layers']} layers)"
        lines.append(
            f"| {r['method']} | {_range(r, 'step_ms', '.2f')} | {_range(r, 'speedup', '.2f', 'x')} "
            f"| {fmt(r['attention_ms'], '.2f')} | {fmt(r['method_ms'], '.2f')} | {fmt(r['rest_ms'], '.2f')} "
            f"| {fmt(r['peak_memory_gib'], '.2f')} | {density} | {'; '.join(notes).replace('|', '/')} |"
        )
    return "\n".join(lines) + "\n"


def render_plot(doc: dict, path: Path | str) -> None:
    """Horizontal bars per method: attention and rest of the instrumented step, the median step time labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["rows"] if r["status"] == "ok" and r["attention_ms"] is not None]
    fig, ax = plt.subplots(figsize=(8, 0.5 * max(len(rows), 2) + 1.5))
    names = [r["method"] for r in rows][::-1]
    attention = [r["attention_ms"] for r in rows][::-1]
    rest = [max(r["rest_ms"], 0.0) for r in rows][::-1]
    ax.barh(names, attention, color="#d95f02", label="attention")
    ax.barh(names, rest, left=attention, color="#7570b3", label="rest of the step")
    for y, r in enumerate(rows[::-1]):
        speed = "" if r["speedup"] is None else f"  {r['speedup']:.2f}x"
        ax.text(r["breakdown_step_ms"], y, f" median {r['step_ms']:.1f} ms{speed}", va="center", fontsize=8)
    meta, model = doc["meta"], doc["model"]
    where = meta.get("gpu") or f"{meta['device']} (overheads only)"
    ax.set(xlabel="ms per denoising step", title=f"{model['name']} ({model['scale']}), one step on {where}")
    ax.set_xlim(0, max([r["breakdown_step_ms"] for r in rows] or [1]) * 1.35)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.6 / (len(rows) + 2)), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load(path: Path | str) -> dict[str, Any]:
    """A checked e2e result document from ``path``."""
    doc = json.loads(Path(path).read_text())
    check_document(doc)
    return doc
