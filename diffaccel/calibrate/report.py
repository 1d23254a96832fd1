"""What a PARO calibration wrote, for people: a summary table (markdown) and a heatmap (PNG) next to the plan."""

from __future__ import annotations

from pathlib import Path

from diffaccel.methods.paro_plan import ParoPlan


def summary_markdown(plan: ParoPlan, *, calibration_s: float | None = None, dense_s: float | None = None,
                     title: str | None = None) -> str:
    """One row per (layer, head): chosen order, kept density and recall at calibration; timings on top."""
    grid = "x".join(map(str, plan.grid))
    lines = [f"# {title or 'PARO plan'}", "",
             f"model `{plan.model}` (config hash {plan.config_hash}), grid {grid}, {plan.text_len} text tokens"
             f"{' (prefix)' if plan.text_first and plan.text_len else ' (suffix)' if plan.text_len else ''}, "
             f"{plan.heads} heads, {len(plan.layers)} layers, {plan.steps} steps in {plan.num_buckets} mask buckets, "
             f"{plan.block}-token blocks, target density {plan.density}, alpha {plan.alpha}, {plan.prompts} prompt(s).",
             ""]
    if calibration_s is not None:
        timing = f"calibration wall time {calibration_s:.2f} s"
        if dense_s:
            timing += f"; dense generation of the same prompts {dense_s:.2f} s (ratio {calibration_s / dense_s:.2f}x)"
        lines += [timing + ".", ""]
    counts = {}
    for o in plan.orders.flatten().tolist():
        counts[plan.order_names[o]] = counts.get(plan.order_names[o], 0) + 1
    lines += ["orders chosen: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())), "",
              f"mean recall {plan.recall.mean():.4f} (min {plan.recall.min():.4f}), "
              f"mean kept density {plan.kept_density.mean():.4f}", "",
              "| layer | head | order | density | recall |", "|---|---|---|---|---|"]
    for li, name in enumerate(plan.layers):
        for h in range(plan.heads):
            lines.append(f"| {name} | {h} | {plan.order_names[int(plan.orders[li, h])]} | "
                         f"{float(plan.kept_density[li, h]):.4f} | {float(plan.recall[li, h]):.4f} |")
    return "\n".join(lines) + "\n"


def heatmap(plan: ParoPlan, path: str | Path, *, title: str | None = None) -> Path:
    """Three panels over layers x heads: the chosen order, the kept density and the recall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm, ListedColormap

    path = Path(path)
    names = plan.order_names
    n_layers, heads = plan.orders.shape
    fig_h = max(2.5, 0.22 * n_layers + 1.5)
    fig, axes = plt.subplots(1, 3, figsize=(max(9.0, 0.35 * heads * 3 + 3), fig_h), constrained_layout=True)
    cmap = ListedColormap(plt.get_cmap("tab10").colors[: len(names)])
    im = axes[0].imshow(plan.orders.numpy(), cmap=cmap, norm=BoundaryNorm(list(range(len(names) + 1)), len(names)),
                        aspect="auto", interpolation="nearest")
    bar = fig.colorbar(im, ax=axes[0], ticks=[i + 0.5 for i in range(len(names))])
    bar.ax.set_yticklabels(names)
    axes[0].set_title("axis order (outermost first)")
    for ax, values, label in ((axes[1], plan.kept_density, "kept density"), (axes[2], plan.recall, "recall")):
        im = ax.imshow(values.numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
        fig.colorbar(im, ax=ax)
        ax.set_title(label)
    for ax in axes:
        if heads <= 48:
            ax.set_xticks(range(0, heads, max(1, heads // 12)))
        if n_layers <= 60:
            ax.set_yticks(range(0, n_layers, max(1, n_layers // 20)))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
    fig.suptitle(title or f"PARO plan: {plan.model}, grid {'x'.join(map(str, plan.grid))}, density {plan.density}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(plan: ParoPlan, plan_path: str | Path, *, calibration_s: float | None = None,
                 dense_s: float | None = None, title: str | None = None) -> tuple[Path, Path]:
    """``<plan>.summary.md`` and ``<plan>.png`` beside the plan file."""
    plan_path = Path(plan_path)
    stem = plan_path.with_suffix("")
    md = Path(f"{stem}.summary.md")
    md.write_text(summary_markdown(plan, calibration_s=calibration_s, dense_s=dense_s, title=title), encoding="utf-8")
    png = heatmap(plan, f"{stem}.png", title=title)
    return md, png
