"""The report of ``diffaccel eval``: aggregates, ``results.json``, ``report.md`` and the Pareto plots.

Aggregates are over the samples that both the method and dense completed: the mean of each per-sample value with
its 95 % interval (:mod:`diffaccel.eval.stats`); the speedup is the mean of the per-sample ratios
``dense time / method time`` (each pair ran back to back on the same process), with its interval. A Pareto front
marks the methods that no other method beats on both speedup and the fidelity metric of the panel.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffaccel.eval.stats import aggregate

TIME_FIELDS = ("total_s", "denoise_s", "attention_s")
"""Per-sample timing fields: everything else in a record depends on the sample only (not on the process)."""

METRICS: dict[str, tuple[str, bool, str]] = {
    "psnr": ("PSNR dB", True, ".2f"),
    "ssim": ("SSIM", True, ".4f"),
    "latent_cosine": ("latent cos", True, ".4f"),
    "rel_l1": ("rel. L1", False, ".4f"),
    "lpips": ("LPIPS", False, ".4f"),
    "clip_score": ("CLIP score", True, ".2f"),
    "temporal_flickering": ("flickering", True, ".4f"),
    "motion_smoothness": ("motion smooth. (proxy)", True, ".4f"),
    "subject_consistency": ("subject cons.", True, ".4f"),
    "background_consistency": ("background cons.", True, ".4f"),
}
"""Per-sample metric -> (column, higher is better, format)."""

FIDELITY = ("psnr", "ssim", "latent_cosine", "rel_l1", "lpips")
"""Metrics against dense: the Pareto panels (with FID and KID to dense)."""


def aggregates(records: list[dict[str, Any]], labels: list[str]) -> dict[str, dict[str, Any]]:
    """Per label: sample count, density, times, speedups and every metric, aggregated over paired samples."""
    by = {(r["sample"], r["label"]): r for r in records}
    dense = {r["sample"]: r for r in records if r["label"] == "dense"}
    out: dict[str, dict[str, Any]] = {}
    for label in labels:
        rows = [by[(s, label)] for s in sorted(dense) if (s, label) in by]
        if not rows:
            continue
        entry: dict[str, Any] = {"n": len(rows), "method": rows[0]["method"], "params": rows[0]["params"]}
        entry["density"] = aggregate([r["density"] for r in rows]).to_dict()
        for f in TIME_FIELDS:
            entry[f] = aggregate([r[f] for r in rows]).to_dict()
            ratios = [dense[r["sample"]][f] / r[f] if r[f] > 0 and dense[r["sample"]][f] > 0 else None for r in rows]
            entry["speedup_" + f.removesuffix("_s")] = aggregate(ratios).to_dict()
        entry["metrics"] = {}
        for key in METRICS:
            values = [r["metrics"].get(key) for r in rows]
            if any(v is not None for v in values):
                entry["metrics"][key] = aggregate(values).to_dict()
        notes = sorted({r["note"] for r in rows if r.get("note")})
        entry["notes"] = notes
        out[label] = entry
    return out


def pareto_front(points: Sequence[tuple[str, float, float]], higher_is_better: bool = True) -> list[str]:
    """Labels of the points ``(label, speedup, metric)`` that no other point dominates (at least as fast and at
    least as good, and strictly better in one), sorted by speedup."""
    sign = 1.0 if higher_is_better else -1.0
    front = []
    for label, x, y in points:
        dominated = any(
            (x2 >= x and sign * y2 >= sign * y) and (x2 > x or sign * y2 > sign * y)
            for other, x2, y2 in points if other != label
        )
        if not dominated:
            front.append((x, label))
    return [label for _, label in sorted(front)]


def comparable(result: dict[str, Any]) -> dict[str, Any]:
    """``results.json`` without what depends on the run rather than on the samples (times, speedups, the
    environment, the process count): two runs of the same prompts and seeds must agree on the rest."""
    samples = [{k: v for k, v in r.items() if k not in TIME_FIELDS} for r in result["samples"]]
    aggr = {
        label: {k: v for k, v in entry.items() if k not in TIME_FIELDS and not k.startswith("speedup")}
        for label, entry in result["aggregates"].items()
    }
    return {"samples": samples, "aggregates": aggr, "distribution": result["distribution"],
            "skipped": result["skipped"], "options": {k: v for k, v in result["options"].items() if k not in ("command", "out")}}


# ----------------------------------------------------------------------------------------------- markdown


def _fmt(entry: dict[str, Any] | None, spec: str, suffix: str = "") -> str:
    if entry is None:
        return "-"
    if entry["mean"] is None:
        return "inf" if entry.get("n_inf") else "-"
    text = f"{format(entry['mean'], spec)}{suffix}"
    if entry["n"] > 1 and entry["low"] != entry["high"]:
        text += f" [{format(entry['low'], spec)}, {format(entry['high'], spec)}]"
    if entry.get("n_inf"):
        text += f" (+{entry['n_inf']} inf)"
    return text


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in params.items()) or "defaults"


def markdown(result: dict[str, Any]) -> str:
    """``report.md``: the setting, one row per method (density, latency, speedups, every metric that ran), the
    distances, what was skipped and why, the pictures."""
    env, run = result["environment"], result["run"]
    lines = [f"# diffaccel eval: {run['model']} ({run['pipeline']})", ""]
    if result.get("partial"):
        lines += [f"**Partial report**: interrupted after {result['completed_samples']} of {run['num_samples']} "
                  "samples; the aggregates cover the completed samples only.", ""]
    lines += [
        f"- size {run['size']}, {run['steps']} steps, {run['num_samples']} samples ({run['num_prompts']} prompts "
        f"from `{run['prompts']}` x seeds {run['seeds']}), {run['num_processes']} process(es)",
        f"- device {env['device']}, torch {env['torch']}, diffusers {env['diffusers']}, {env['date']}",
        f"- command: `{' '.join(env['command'])}`",
    ]
    if run.get("overheads_note"):
        lines.append(f"- **{run['overheads_note']}**")
    lines.append("")
    aggr = result["aggregates"]
    shown = [k for k in METRICS if any(k in e["metrics"] for e in aggr.values())]
    head = ["method", "setting", "n", "density kept", "s / sample", "speedup", "denoiser speedup", "attention s"]
    head += [METRICS[k][0] for k in shown]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, e in aggr.items():
        row = [label, _params(e["params"]) if label != "dense" else "stock processors (SDPA)", str(e["n"]),
               _fmt(e["density"], ".3f") if e["density"]["mean"] is not None else "-",
               _fmt(e["total_s"], ".3f"), "1 (reference)" if label == "dense" else _fmt(e["speedup_total"], ".2f", "x"),
               "-" if label == "dense" else _fmt(e["speedup_denoise"], ".2f", "x"), _fmt(e["attention_s"], ".3f")]
        row += [_fmt(e["metrics"].get(k), METRICS[k][2]) for k in shown]
        if e["notes"]:
            row[0] += " (" + "; ".join(e["notes"]) + ")"
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Mean [95 % interval] over samples; speedup = mean of per-sample dense/method ratios; fidelity "
              "metrics are against dense on the same prompt and seed. Latent cos: cosine of the final latents; "
              "rel. L1: sum|out - dense| / sum|dense| of the decoded outputs.", ""]
    dist = result["distribution"]
    if dist:
        lines += ["| method | against | FID | KID | images |", "|---|---|---|---|---|"]
        for label, against in dist.items():
            for name, d in against.items():
                fid = "-" if d["fid"] is None else f"{d['fid']:.3f}" + ("" if d["fid_reliable"] else " (small set)")
                kid = "-" if d["kid"] is None else f"{d['kid']:.5f}"
                lines.append(f"| {label} | {name} | {fid} | {kid} | {d['n1']} vs {d['n2']} |")
        lines += ["", "clean-fid, mode=\"clean\". Below 2048 images per set FID is biased: read KID.", ""]
    if result["skipped"]:
        lines += ["Skipped:", ""] + [f"- {s['metric']}: {s['reason']}" for s in result["skipped"]] + [""]
    ran = sorted({k for e in aggr.values() for k in e["metrics"]})
    lines += [f"Metrics that ran: {', '.join(ran) or 'none'}.", ""]
    for plot in result.get("plots", []):
        lines += [f"![{Path(plot).stem}]({plot})", ""]
    grids = sorted({r["grid"] for r in result["samples"] if r.get("grid")})
    if grids:
        lines += ["Samples beside dense (dense | method | |difference|):", ""] + [f"- [{g}]({g})" for g in grids] + [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- plots


def pareto_plot(result: dict[str, Any], path: Path) -> Path | None:
    """Speedup (x) against each fidelity metric (y) that ran, one panel each, the Pareto front marked; ``None``
    without matplotlib or without a method other than dense."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    aggr = {k: v for k, v in result["aggregates"].items() if k != "dense" and v["speedup_total"]["mean"] is not None}
    panels: list[tuple[str, bool, dict[str, tuple[float, float, float, float, float]]]] = []
    for key in FIDELITY:
        pts = {label: _point(e["speedup_total"], e["metrics"].get(key)) for label, e in aggr.items()}
        pts = {k: v for k, v in pts.items() if v is not None}
        if pts:
            panels.append((METRICS[key][0], METRICS[key][1], pts))
    for name in ("FID", "KID"):
        pts = {}
        for label, e in aggr.items():
            d = result["distribution"].get(label, {}).get("dense")
            value = None if d is None else d[name.lower()]
            if value is not None:
                s = e["speedup_total"]
                pts[label] = (s["mean"], s["low"], s["high"], value, value)
        if pts:
            panels.append((f"{name} to dense", False, pts))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
    for ax, (title, higher, pts) in zip(axes[0], panels):
        front = pareto_front([(k, v[0], v[3]) for k, v in pts.items()], higher_is_better=higher)
        for label, (x, xlo, xhi, y, _) in pts.items():
            on = label in front
            ax.errorbar([x], [y], xerr=[[x - xlo], [xhi - x]], fmt="o", color="tab:red" if on else "tab:gray")
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        fx = [pts[k][0] for k in front]
        fy = [pts[k][3] for k in front]
        ax.plot(fx, fy, "--", color="tab:red", lw=1, label="Pareto front")
        ax.axvline(1.0, color="k", lw=0.5)
        ax.set_xlabel("speedup vs dense (x)")
        ax.set_ylabel(title + (" (higher better)" if higher else " (lower better)"))
        ax.legend(fontsize=7, loc="best")
    run = result["run"]
    fig.suptitle(f"{run['model']} | {run['size']} | {result['environment']['device']}"
                 + (f" | {run['overheads_note']}" if run.get("overheads_note") else ""), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _point(speed: dict[str, Any], metric: dict[str, Any] | None) -> tuple[float, float, float, float, float] | None:
    if metric is None or metric["mean"] is None or not math.isfinite(metric["mean"]):
        return None
    return speed["mean"], speed["low"], speed["high"], metric["mean"], metric["mean"]


def _jsonable(value: Any) -> Any:
    """Strict JSON: an infinite float (the PSNR of identical outputs) becomes the string ``"inf"``."""
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write(result: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write the plots, ``results.json`` and ``report.md`` under ``out``; return their paths."""
    out = Path(out)
    paths: dict[str, Path] = {}
    plot = pareto_plot(result, out / "plots" / "pareto.png")
    result["plots"] = [] if plot is None else [str(plot.relative_to(out))]
    if plot is not None:
        paths["pareto"] = plot
    paths["json"] = out / "results.json"
    paths["json"].write_text(json.dumps(_jsonable(result), indent=1, allow_nan=False) + "\n")
    paths["markdown"] = out / "report.md"
    paths["markdown"].write_text(markdown(result))
    return paths


def summary_table(result: dict[str, Any]):
    """The console's rich table: one row per method, the columns of ``report.md`` that fit a terminal."""
    from rich.markup import escape
    from rich.table import Table

    run = result["run"]
    aggr = result["aggregates"]
    shown = [k for k in ("psnr", "ssim", "latent_cosine", "lpips", "clip_score", "temporal_flickering")
             if any(k in e["metrics"] for e in aggr.values())]
    table = Table(title=escape(f"diffaccel eval | {run['model']} | {run['size']} | {run['steps']} steps | "
                               f"{result['environment']['device']}"))
    for column in ("method", "n", "density", "s / sample", "speedup", *(METRICS[k][0] for k in shown)):
        table.add_column(column, justify="left" if column == "method" else "right")
    for label, e in aggr.items():
        density = "-" if e["density"]["mean"] is None else f"{e['density']['mean']:.3f}"
        speed = "1" if label == "dense" else _fmt(e["speedup_total"], ".2f", "x")
        cells = [_fmt(e["metrics"].get(k), METRICS[k][2]) for k in shown]
        table.add_row(escape(label), str(e["n"]), density, _fmt(e["total_s"], ".3f"), speed, *cells)
    dist = result["distribution"]
    caption = "mean [95 % interval] over samples; fidelity against dense."
    if dist:
        caption += " KID to dense: " + ", ".join(
            f"{k} {v['dense']['kid']:.4g} (n={v['dense']['n1']})" for k, v in dist.items() if "dense" in v and v["dense"]["kid"] is not None)
    if run.get("overheads_note"):
        caption = run["overheads_note"] + ". " + caption
    table.caption = escape(caption)
    return table
