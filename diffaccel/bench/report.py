"""Reports of the kernel and locality benchmarks: environment capture, JSON write and merge, markdown, plot.

A result document is ``{"kind", "meta", "config", "shapes", "rows"}``; :func:`write_outputs` writes it as
``<out>/<date>-<device>-<kind>[-quick|-tiny].json`` with its markdown table beside it (and, for the kernel
benchmark, the speedup-vs-density plot). The schema is the one of the committed results in
``benchmarks/results/``, which :func:`merge_results` still reads.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import warnings
from pathlib import Path
from typing import Any

import torch

from diffaccel.errors import ConfigError

__all__ = [
    "BASELINES",
    "environment",
    "finite",
    "fmt",
    "kernel_path",
    "merge_results",
    "output_stem",
    "package_version",
    "render_kernels_markdown",
    "render_locality_markdown",
    "render_markdown",
    "render_plot",
    "write_outputs",
]

BASELINES = ("sdpa", "flex", "xformers", "sage", "ours-bf16")
"""Speedup columns of the kernel table: the best SDPA backend, the dense peers, FlexAttention at the same mask,
and (for the INT8 rows) our bf16 kernel at the same mask."""


# ------------------------------------------------------------------------------------------- provenance (JSON)


def package_version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, ``None`` when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def kernel_path(device: str) -> str:
    """Which implementation our kernel ran as: compiled Triton, Triton's interpreter, or the PyTorch reference."""
    if device.startswith("cuda"):
        return "triton"
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return "triton-interpreter" if interpreting else "reference (PyTorch, no Triton on CPU)"


def _driver_version() -> str | None:
    """The NVIDIA driver version from ``nvidia-smi``, ``None`` when it cannot be read."""
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        )  # fmt: skip
        return done.stdout.strip().splitlines()[0] or None
    except Exception:
        return None


def _git_commit() -> str | None:
    """The checkout's commit (this package's repository), ``None`` outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        done = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
        return done.stdout.strip() or None
    except Exception:
        return None


def environment(device: str, flex_compile: bool, command: str) -> dict:
    """The run's provenance: date, command, versions, device (GPU properties or CPU threads), timer, kernel path."""
    cuda = device.startswith("cuda")
    meta: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "diffaccel": package_version("diffaccel"),
        "git_commit": _git_commit(),
        "xformers": package_version("xformers"),
        "sageattention": package_version("sageattention"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "driver": _driver_version() if cuda else None,
        "device": device,
        "gpu": None,
        "timer": "triton.testing.do_bench, median (ms)" if cuda else "time.perf_counter, median (ms)",
        "kernel_path": kernel_path(device),
        "flex": "torch.compile(flex_attention)" if flex_compile else "flex_attention (eager)",
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "error_reference": "float32 attention (TF32 off) on a fixed random subset of query rows of every head",
    }
    if cuda:
        props = torch.cuda.get_device_properties(torch.device(device))
        meta["gpu"] = props.name
        meta["gpu_capability"] = f"{props.major}.{props.minor}"
        meta["gpu_sms"] = props.multi_processor_count
        meta["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        meta["gpu_l2_bytes"] = getattr(props, "L2_cache_size", None)
    else:
        meta["cpu"] = platform.processor() or platform.machine()
        meta["cpu_threads"] = torch.get_num_threads()
    return meta



# ---------------------------------------------------------------------------------------------------- outputs


def device_slug(meta: dict) -> str:
    """``h100-80gb-hbm3`` for an "NVIDIA H100 80GB HBM3", ``cpu`` without a GPU (the file-name device)."""
    name = meta.get("gpu") or "cpu"
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    slug = "-".join(part for part in slug.split("-") if part and part != "nvidia")
    return slug or "device"


def output_stem(result: dict) -> str:
    """``<date>-<device>-<kind>`` (``kind``: ``kernels``, ``locality``; ``-quick``/``-tiny`` appended for short
    runs, so they never replace a full one)."""
    date = result["meta"]["date"][:10]
    suffix = "-tiny" if result["config"]["tiny"] else ("-quick" if result["config"]["quick"] else "")
    return f"{date}-{device_slug(result['meta'])}-{result['kind']}{suffix}"


def write_outputs(result: dict, out_dir: Path | str, *, plot: bool = True, merge: bool = False) -> dict[str, Path]:
    """Write the JSON document, its markdown table and (with ``plot``, kernel results) the speedup-vs-density PNG.

    With ``merge``, shapes of an existing result file of the same name (same day, device and versions) that this
    run did not measure are kept: a long benchmark can be run as several shorter commands. Speedups stay valid
    because each shape's rows and baselines always come from one run (each shape records its command).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = output_stem(result)
    if merge and (out_dir / f"{stem}.json").exists():
        try:
            result = merge_results(json.loads((out_dir / f"{stem}.json").read_text()), result)
        except (ConfigError, ValueError, KeyError) as err:  # never lose a finished run over a merge
            stem += "-" + result["meta"]["date"][11:19].replace(":", "")
            warnings.warn(f"not merged ({err}); writing {stem}.json instead", stacklevel=2)
    paths = {"json": out_dir / f"{stem}.json", "markdown": out_dir / f"{stem}.md"}
    if plot:
        paths["plot"] = out_dir / f"{stem}.png"
    document = {**result, "files": {k: p.name for k, p in paths.items()}}
    paths["json"].write_text(json.dumps(finite(document), indent=2) + "\n")
    paths["markdown"].write_text(render_markdown(document))
    if plot:
        render_plot(document, paths["plot"])
    return paths


_SAME_SETUP = ("device", "gpu", "torch", "triton", "cuda", "driver", "kernel_path", "flex")


def merge_results(previous: dict, current: dict) -> dict:
    """``current`` plus the shapes of ``previous`` that it did not re-measure (same device and versions only)."""
    differ = [k for k in _SAME_SETUP if previous.get("meta", {}).get(k) != current["meta"].get(k)]
    if previous.get("kind") != "kernels" or differ:
        raise ConfigError(
            f"cannot merge into the existing result file: it was measured with a different setup ({differ or 'kind'}); "
            "use another --out folder or drop --merge"
        )
    kept = [name for name in previous["shapes"] if name not in current["shapes"]]
    merged = dict(current)
    merged["shapes"] = {**{n: previous["shapes"][n] for n in kept}, **current["shapes"]}
    merged["rows"] = [r for r in previous["rows"] if r["shape"] in kept] + current["rows"]
    config = dict(current["config"])
    config["shapes"] = list(merged["shapes"])
    config["densities"] = sorted({*previous["config"]["densities"], *config["densities"]}, reverse=True)
    merged["config"] = config
    merged["meta"] = {**current["meta"], "merged_commands": [
        *previous["meta"].get("merged_commands", [previous["meta"]["command"]]), current["meta"]["command"],
    ]}  # fmt: skip
    return merged


def finite(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def fmt(value: float | None, spec: str) -> str:
    """``value`` formatted with ``spec``; an en dash for a missing value."""
    return "–" if value is None else format(value, spec)



def render_markdown(result: dict) -> str:
    """The markdown table of a result document of either kind (``kernels`` or ``locality``)."""
    if result.get("kind") == "locality":
        return render_locality_markdown(result)
    return render_kernels_markdown(result)


# ----------------------------------------------------------------------------------------------- kernel table


def render_kernels_markdown(result: dict) -> str:
    """One table per shape: time, throughput, density, error and speedups; then the targets and the failures."""
    meta = result["meta"]
    lines = [
        f"# Kernel benchmark: {meta.get('gpu') or meta['device']} ({meta['date'][:10]})",
        "",
        f"- command: `{meta['command']}`",
        f"- torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, driver {meta['driver']}, "
        f"cuDNN {meta['cudnn']}; xformers {meta['xformers']}, sageattention {meta['sageattention']}",
        f"- timer: {meta['timer']}; our kernel ran as: {meta['kernel_path']}; FlexAttention: {meta['flex']}",
        f"- error: relative L2 vs {meta['error_reference']}; 'masked' = same block mask as the kernel",
        "- TFLOP/s: dense-equivalent = 4·B·H·N²·d / time; kept = 4·d·(query, key pairs in kept blocks) / time",
        "",
    ]
    header = (
        "| method | density (target / kept) | ms | TFLOP/s dense-eq | TFLOP/s kept | rel. L2 vs dense fp32 "
        "| rel. L2 vs masked fp32 | ×SDPA | ×Flex | ×xformers | ×Sage | ×ours-bf16 | notes |"
    )
    for name, info in result["shapes"].items():
        grid = "x".join(str(g) for g in info["grid"])
        lines += [
            f"## {name}: {info['model']}",
            "",
            f"B={info['batch']} H={info['heads']} N={info['tokens']} ({info['text_tokens']} text + {grid}) "
            f"d={info['head_dim']}, block {info['block_size']}, best SDPA backend: {info.get('sdpa_best') or 'none'}",
            "",
            header,
            "|" + "---|" * 13,
        ]
        for r in (r for r in result["rows"] if r["shape"] == name):
            sp = r.get("speedup", {})
            notes = r["reason"] if r["status"] != "ok" else ""
            if r["status"] != "ok":
                notes = f"**{r['status']}**: {notes}"
            lines.append(
                "| "
                + " | ".join(
                    [
                        r["method"],
                        f"{r['density_target']:g} / {fmt(r['density_kept'], '.3f')}",
                        fmt(r["ms"], ".3f"),
                        fmt(r["tflops_dense_equiv"], ".4g"),
                        fmt(r["tflops_kept"], ".4g"),
                        fmt(r["rel_l2_vs_dense_fp32"], ".2e"),
                        fmt(r["rel_l2_vs_masked_fp32"], ".2e"),
                        *(fmt(sp.get(b), ".2f") for b in BASELINES),
                        notes.replace("|", "\\|"),
                    ]
                )
                + " |"
            )
        lines.append("")
    targets = [(r, t) for r in result["rows"] for t in r.get("targets", [])]
    if targets:
        lines += [
            "## Targets (benchmark protocol, H100 bf16)",
            "",
            "| shape | method | density | check | value | target | met |",
            "|---|---|---|---|---|---|---|",
        ]
        for r, t in targets:
            lines.append(
                f"| {r['shape']} | {r['method']} | {r['density_target']:g} | {t['name']} | {t['value']:.3g} "
                f"| {t['target']:.3g} | {'yes' if t['met'] else 'no'} |"
            )
        lines.append("")
    return "\n".join(lines)



# --------------------------------------------------------------------------------------------- locality table


def _params_text(params: dict | None) -> str:
    """A method's parameters as ``kernel_size 2x2, stride 1x1`` (block size left out: it is in the header)."""
    if not params:
        return ""
    parts = []
    for k, v in params.items():
        if v is None or k == "block_size":
            continue
        text = "x".join(map(str, v)) if isinstance(v, list) and all(isinstance(x, int) for x in v) else str(v)
        parts.append(f"{k} {text}")
    return ", ".join(parts)


def render_locality_markdown(result: dict) -> str:
    """One table per shape: each method (as the processor runs it), its Flex row, the SDPA backends."""
    meta = result["meta"]
    lines = [
        f"# Locality benchmark: {meta.get('gpu') or meta['device']} ({meta['date'][:10]})",
        "",
        f"- command: `{meta['command']}`",
        f"- torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, driver {meta['driver']}, "
        f"cuDNN {meta['cudnn']}",
        f"- timer: {meta['timer']}; our kernel ran as: {meta['kernel_path']}; FlexAttention: {meta['flex']}",
        "- methods timed as the attention processor calls them (token permutation gathers included), default "
        "configuration for the grid",
        f"- Flex with the same mask: {meta['flex_same_mask']}",
        f"- error: relative L2 vs {meta['error_reference']}; 'masked' = the method's element mask",
        "- density kept: (query, key) pairs the mask keeps / all pairs; blocks: key blocks the kernel visits / all",
        "",
    ]
    header = (
        "| method | plan | parameters | density kept | blocks visited | ms | TFLOP/s dense-eq | TFLOP/s kept "
        "| ×SDPA | ×Flex | rel. L2 vs masked fp32 | rel. L2 vs dense fp32 | notes |"
    )
    for name, info in result["shapes"].items():
        grid = "x".join(str(g) for g in info["grid"])
        text = f"{info['text_tokens']} text ({info['text_position']})" if info["text_tokens"] else "no text"
        lines += [
            f"## {name}: {info['model']}",
            "",
            f"B={info['batch']} H={info['heads']} N={info['tokens']} ({text} + {grid}) d={info['head_dim']}, "
            f"best SDPA backend: {info.get('sdpa_best') or 'none'}",
            "",
            header,
            "|" + "---|" * 13,
        ]
        for r in (r for r in result["rows"] if r["shape"] == name):
            sp = r.get("speedup", {})
            label = r["method"] if r["method"] != "flex" else f"flex ({r['for_method']})"
            notes = list(r.get("notes") or [])
            if r.get("flex_mode"):
                notes.insert(0, r["flex_mode"])
            if r["status"] != "ok":
                notes.insert(0, f"**{r['status']}**: {r['reason']}")
            lines.append(
                "| "
                + " | ".join(
                    [
                        label,
                        r.get("plan") or "",
                        _params_text(r.get("params")),
                        fmt(r["density_kept"], ".3f"),
                        fmt(r["density_blocks"], ".3f"),
                        fmt(r["ms"], ".3f"),
                        fmt(r["tflops_dense_equiv"], ".4g"),
                        fmt(r["tflops_kept"], ".4g"),
                        fmt(sp.get("sdpa"), ".2f"),
                        fmt(sp.get("flex"), ".2f"),
                        fmt(r["rel_l2_vs_masked_fp32"], ".2e"),
                        fmt(r["rel_l2_vs_dense_fp32"], ".2e"),
                        "; ".join(notes).replace("|", "\\|"),
                    ]
                )
                + " |"
            )
        lines.append("")
    return "\n".join(lines)



# ------------------------------------------------------------------------------------------------------- plot


def render_plot(result: dict, path: Path | str) -> None:
    """Speedup over the best SDPA backend versus kept density, one panel per shape, log-log, with 1/d and 0.85/d."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = list(result["shapes"])
    cols = min(3, max(1, len(names)))
    nrows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.8 * nrows), squeeze=False)
    styles = {"ours-bf16": "o-", "ours-int8": "s--", "ours-int8-pv": "^:", "flex": "x-."}
    for ax, name in zip(axes.flat, names, strict=False):
        rows = [r for r in result["rows"] if r["shape"] == name and r["status"] == "ok"]
        densities = sorted({r["density_kept"] for r in rows if r["method"] in styles})
        if densities:
            grid = [min(densities) * (1.0 / min(densities)) ** (i / 50) for i in range(51)]
            ax.plot(grid, [1 / d for d in grid], color="0.7", lw=1, label="1/d (ideal)")
            ax.plot(grid, [0.85 / d for d in grid], color="0.7", lw=1, ls="--", label="0.85/d (target)")
        for method, style in styles.items():
            pts = sorted(
                (r["density_kept"], r["speedup"]["sdpa"]) for r in rows if r["method"] == method and "sdpa" in r["speedup"]
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=method)
        best = result["shapes"][name].get("sdpa_best") or "no SDPA"
        ax.set(title=f"{name} (vs {best})", xlabel="density kept", ylabel="speedup vs best SDPA")
        ax.set_xscale("log")
        ax.set_yscale("log")
        if densities:  # label the measured densities in plain numbers, not powers of ten
            ax.set_xticks(densities, [f"{d:.2g}" for d in densities])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    meta = result["meta"]
    fig.suptitle(f"block-sparse attention, {meta.get('gpu') or meta['device']}, {meta['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

