"""The Gradio page: two sides (dense versus a method, or two methods), their outputs on one slider, the speed,
the fidelity, and the key blocks each method kept.

:func:`build_app` returns the ``gr.Blocks``. The handlers are plain functions of :class:`DemoHandlers` (the unit
tests call them directly): :meth:`DemoHandlers.generate` for the button, :meth:`DemoHandlers.show_mask` for the
mask panel, :meth:`DemoHandlers.compare_api` for the JSON endpoint ``/compare`` that scripts and
``gradio_client`` call. Every event runs on one queue slot (``concurrency_id="device"``, limit 1), so two users
never run on the device at once. Bad input raises one ``gr.Error`` with the library's one-line message, and the
app goes on serving.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # never phone home (before gradio is imported)

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from diffaccel.demo.compare import DENSE, Comparer, CompareRequest, CompareResult, SideRequest  # noqa: E402
from diffaccel.demo.params import ParamSpec, param_specs, params_from_widgets  # noqa: E402
from diffaccel.demo.visuals import colormap, mask_image  # noqa: E402
from diffaccel.errors import DiffAccelError  # noqa: E402
from diffaccel.methods.base import get_method, list_methods  # noqa: E402
from diffaccel.pipelines.tiny import tiny_names, tiny_spec  # noqa: E402
from diffaccel.run import DEFAULT_TINY_MODEL, default_prompt  # noqa: E402

log = logging.getLogger(__name__)

DEFAULT_MODEL = DEFAULT_TINY_MODEL  # the trained tiny FLUX (issue 18): one place, diffaccel.run
DEFAULT_METHOD_B = "gna"
DEFAULT_PROMPT = default_prompt(DEFAULT_MODEL)
NO_MASK = "no block mask (dense/linear method)"
SIDES = ("A", "B")
IMAGE_HEIGHT = 360
"""Pixels of the output, heat-map and mask panels (small outputs are scaled up to it)."""


def _fmt_psnr(value: float) -> str:
    return "inf" if math.isinf(value) else ("n/a" if math.isnan(value) else f"{value:.2f}")


def _optional_int(name: str, value: Any) -> int | None:
    """A number box's value as an int (empty: ``None``, the model's default)."""
    if value is None or value == "":
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise gr.Error(f"{name} must be a whole number, got {value!r}")


@dataclass
class Widget:
    """Which side, method and field a generated widget stands for (and the widget)."""

    side: str
    method: str
    spec: ParamSpec
    component: Any = None


def summary(result: CompareResult) -> dict[str, Any]:
    """The numbers of a result, JSON-friendly (the ``/compare`` endpoint's answer)."""
    def side(s) -> dict[str, Any]:
        return {
            "method": s.request.method, "params": s.request.params, "seconds": s.total_s,
            "denoise_seconds": s.denoise_s, "timed_calls": len(s.samples), "reused": s.reused,
            "mask_layers": {k: float(v.mean()) for k, v in s.masks.items()},
        }
    return {
        "model": result.request.model, "pipeline": result.pipeline, "device": result.device, "dtype": result.dtype,
        "a": side(result.a), "b": side(result.b),
        "speedup": None if result.speedup is None else result.speedup.median,
        "psnr": None if math.isinf(result.fidelity.psnr) else result.fidelity.psnr,
        "psnr_identical": math.isinf(result.fidelity.psnr),
        "ssim": result.fidelity.ssim, "overheads_only": result.overheads_only, "notes": result.notes,
        "frame_psnr": result.frame_psnr,
    }


def timing_markdown(result: CompareResult) -> str:
    """Per-side latency (median, min-max), the denoiser share, and how it was measured."""
    unit = "video" if result.is_video else "image"
    lines = [f"| side | method | s / {unit} | denoiser s |", "|---|---|---|---|"]
    for name, s in (("A", result.a), ("B", result.b)):
        tag = " (reused)" if s.reused else ""
        lines.append(f"| {name} | {s.request.label}{tag} | {s.spread('total_s').format()} | "
                     f"{s.spread('denoise_s').format()} |")
    calls = len(result.b.samples)
    lines.append("")
    lines.append(f"{result.request.model} ({result.pipeline}), {result.steps} steps, {result.device} {result.dtype}; "
                 f"median (min-max) of {calls} timed call(s) per side after {result.request.warmup} warm-up call(s), "
                 "A and B alternating.")
    if result.overheads_only:
        lines.append("**CPU or tiny random model: these times measure overheads, not attention speed.**")
    for side in (result.a, result.b):
        if side.overhead:
            parts = ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in side.overhead.items())
            lines.append(f"overhead of {side.request.method}: {parts}")
    return "\n".join(lines)


def speedup_text(result: CompareResult) -> str:
    """``1.23x`` (with the per-round range when several rounds ran), or ``n/a`` without a positive time."""
    if result.speedup is None:
        return "n/a"
    return result.speedup.format(".2f", "x")


def fidelity_markdown(result: CompareResult) -> str:
    f = result.fidelity
    ssim = "n/a" if math.isnan(f.ssim) else f"{f.ssim:.4f}"
    text = f"**PSNR** {_fmt_psnr(f.psnr)} dB · **SSIM** {ssim} (B against A) · peak |A-B| {result.heat_peak:.3f}"
    return text


HEAT_MIN_SIDE = 256
"""Small heat maps are enlarged by a whole factor (nearest neighbour, no smoothing) to at least this many pixels."""


def heat_image(result: CompareResult) -> np.ndarray:
    """The heat map as uint8 RGB, 0..peak over the colormap, enlarged by whole pixels when small."""
    scaled = result.heat_map / result.heat_peak if result.heat_peak > 0 else np.zeros_like(result.heat_map)
    rgb = colormap(scaled)
    factor = max(1, -(-HEAT_MIN_SIDE // max(rgb.shape[:2])))
    return np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)


def mask_state(result: CompareResult) -> dict[str, dict[str, np.ndarray]]:
    return {"A": result.a.masks, "B": result.b.masks}


class DemoHandlers:
    """The page's callbacks around one :class:`Comparer` and the generated parameter widgets."""

    def __init__(self, comparer: Comparer, widgets: list[Widget]) -> None:
        self.comparer = comparer
        self.widgets = widgets

    # -- requests ---------------------------------------------------------------------------------------------
    def side_params(self, side: str, method: str, values: list[Any]) -> dict[str, Any]:
        """Method keywords of ``side`` from the widget values (only ``method``'s widgets, non-default values)."""
        chosen = {w.spec.name: v for w, v in zip(self.widgets, values) if w.side == side and w.method == method}
        return params_from_widgets(method, chosen)

    def request(self, model, prompt, seed, steps, height, width, frames, method_a, method_b, warmup, repeats,
                *values) -> CompareRequest:
        if len(values) != len(self.widgets):
            raise gr.Error(f"expected {len(self.widgets)} parameter values, got {len(values)}")
        return CompareRequest(
            model=(model or "").strip(), prompt=prompt or "",
            a=SideRequest(method_a, self.side_params("A", method_a, list(values))),
            b=SideRequest(method_b, self.side_params("B", method_b, list(values))),
            seed=_optional_int("seed", seed) or 0, steps=_optional_int("steps", steps),
            height=_optional_int("height", height), width=_optional_int("width", width),
            frames=_optional_int("frames", frames), warmup=_optional_int("warmup", warmup) or 0,
            repeats=_optional_int("repeats", repeats) or 1,
        )

    def run(self, req: CompareRequest, progress: Any = None) -> CompareResult:
        """Run ``req``; a library error becomes one ``gr.Error`` line (the app keeps serving)."""
        report = None if progress is None else (lambda frac, desc: progress(frac, desc=desc))
        try:
            return self.comparer.run(req, report)
        except DiffAccelError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except gr.Error:
            raise
        except Exception as exc:  # noqa: BLE001 - diffusers/torch errors still get one readable line
            log.exception("demo request failed")
            raise gr.Error(f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}", print_exception=False) from None

    # -- events -----------------------------------------------------------------------------------------------
    def generate(self, model, prompt, seed, steps, height, width, frames, method_a, method_b, warmup, repeats,
                 *values, progress=gr.Progress(track_tqdm=True)):  # noqa: B008 - gradio's progress idiom
        """The button: both sides run (or A is reused), every output panel is filled."""
        try:
            req = self.request(model, prompt, seed, steps, height, width, frames, method_a, method_b, warmup,
                               repeats, *values)
        except DiffAccelError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        result = self.run(req, progress)
        for note in result.notes:
            gr.Warning(note)
        masks = mask_state(result)
        side = "B" if masks["B"] or not masks["A"] else "A"
        layers = list(masks[side])
        layer = layers[0] if layers else None
        heads = masks[side][layer].shape[0] if layer else 1
        image, density = self.show_mask(masks, side, layer, 0)
        # mp4 plays in the video player; a GIF (no mp4 writer installed) is shown as an animated image.
        clip = result.clip
        video = clip.path.as_posix() if clip is not None and clip.format == "mp4" else None
        gif = clip.path.as_posix() if clip is not None and clip.format == "gif" else None
        plot = None
        if result.frame_psnr is not None:
            plot = pd.DataFrame({"frame": list(range(len(result.frame_psnr))),
                                 "PSNR dB": [min(p, 99.0) for p in result.frame_psnr]})
        return (
            (result.image("a"), result.image("b")),
            heat_image(result),
            timing_markdown(result),
            speedup_text(result),
            fidelity_markdown(result),
            gr.update(value=video, visible=video is not None),
            gr.update(value=gif, visible=gif is not None),
            gr.update(value=plot, visible=plot is not None),
            "\n".join(f"- {n}" for n in result.notes),
            masks,
            gr.update(value=side),
            gr.update(choices=layers, value=layer),
            gr.update(maximum=max(heads - 1, 0), value=0),
            image,
            density,
        )

    @staticmethod
    def show_mask(masks: dict[str, dict[str, np.ndarray]] | None, side: str, layer: str | None, head: Any):
        """The kept key blocks of ``side``'s method at ``layer`` and ``head`` (image, density line)."""
        chosen = (masks or {}).get(side or "B") or {}
        if not chosen or layer not in chosen:
            return None, NO_MASK if not chosen else f"layer {layer!r} has no block mask (it ran dense)"
        keep = chosen[layer]
        h = int(head or 0)
        if not 0 <= h < keep.shape[0]:
            h = 0  # one mask for every head (heads = 1) or an index out of range
        shared = " (one mask for every head)" if keep.shape[0] == 1 else ""
        matrix = keep[h]
        text = (f"**density kept {matrix.mean():.1%}** ({int(matrix.sum())} of {matrix.size} blocks, "
                f"{matrix.shape[0]} query x {matrix.shape[1]} key blocks), layer `{layer}`, head {h}{shared}; "
                f"all heads: {keep.mean():.1%}")
        return np.asarray(mask_image(matrix)), text

    def compare_api(
        self, model: str = DEFAULT_MODEL, prompt: str = DEFAULT_PROMPT, method_a: str = DENSE, params_a: str = "{}",
        method_b: str = DEFAULT_METHOD_B, params_b: str = "{}", seed: int = 0, steps: int | None = None,
        height: int | None = None, width: int | None = None, frames: int | None = None, warmup: int = 1,
        repeats: int = 1,
    ) -> dict:
        """JSON in, JSON out: the two sides' method names and parameters as JSON objects; returns
        :func:`summary` (speedup, PSNR, SSIM, latencies, kept-mask densities per layer)."""
        sides = []
        for name, text in (("params_a", params_a), ("params_b", params_b)):
            try:
                value = json.loads(text or "{}")
            except ValueError:
                raise gr.Error(f"{name} must be a JSON object of method parameters, got {text!r}") from None
            if not isinstance(value, dict):
                raise gr.Error(f"{name} must be a JSON object of method parameters, got {text!r}")
            sides.append(value)
        req = CompareRequest(
            model=(model or "").strip(), prompt=prompt or "", a=SideRequest(method_a, sides[0]),
            b=SideRequest(method_b, sides[1]), seed=seed, steps=steps, height=height, width=width, frames=frames,
            warmup=warmup, repeats=repeats,
        )
        return summary(self.run(req))


# ----------------------------------------------------------------------------------------------- the page


def _widget(spec: ParamSpec, side: str, method: str) -> gr.components.Component:
    common = dict(label=spec.label, info=spec.help or None, elem_id=f"param-{side}-{method}-{spec.name}")
    if spec.kind == "bool":
        return gr.Checkbox(value=bool(spec.default), **common)
    if spec.kind == "int":
        return gr.Number(value=spec.default, precision=0, **common)
    if spec.kind == "float":
        return gr.Number(value=spec.default, **common)
    if spec.kind == "choice":
        return gr.Dropdown(choices=list(spec.choices), value=spec.default, **common)
    if spec.kind == "text":
        return gr.Textbox(value=spec.default, **common)
    return gr.Textbox(value=spec.widget_default, placeholder="JSON, e.g. [8, 8]; empty: None", **common)


def _method_panels(side: str, methods: list[str], selected: str, widgets: list[Widget],
                   initial: dict[str, Any]) -> dict[str, gr.Group]:
    """One group of generated widgets per method; only the selected method's group is visible; the selected
    method's widgets start at ``initial`` where given."""
    groups = {}
    for method in methods:
        with gr.Group(visible=method == selected) as group:
            specs = param_specs(method)
            if not specs:
                gr.Markdown(f"`{method}` has no parameters.")
            for spec in specs:
                if method == selected and spec.name in initial:
                    spec = dataclasses.replace(spec, default=initial[spec.name])
                widgets.append(Widget(side, method, spec, _widget(spec, side, method)))
        groups[method] = group
    return groups


def _model_defaults(model: str) -> tuple[Any, Any, Any, Any]:
    """(steps, height, width, frames) of a tiny model; empty (the model's own defaults) for others."""
    try:
        spec = tiny_spec(model)
    except DiffAccelError:
        return None, None, None, None
    return spec.steps, spec.height, spec.width, spec.frames


def build_app(
    model: str = DEFAULT_MODEL,
    *,
    method_a: str = DENSE,
    method_b: str = DEFAULT_METHOD_B,
    params_a: dict[str, Any] | None = None,
    params_b: dict[str, Any] | None = None,
    device: str = "auto",
    dtype: str = "auto",
    max_pipelines: int = 1,
    comparer: Comparer | None = None,
) -> gr.Blocks:
    """The demo page. ``model`` is preselected (tiny names are offered, any Hub id or folder can be typed);
    ``method_a``/``method_b`` are the sides' initial methods (every registered method is offered) and
    ``params_a``/``params_b`` their initial parameter values (validated by the method now)."""
    methods = list_methods()
    for name, value in (("method_a", method_a), ("method_b", method_b)):
        if value not in methods:
            raise DiffAccelError(f"{name} {value!r} is not a registered method; registered: {', '.join(methods)}")
    initial = {"A": dict(params_a or {}), "B": dict(params_b or {})}
    for (side, method) in (("A", method_a), ("B", method_b)):
        get_method(method, **initial[side])  # unknown names and bad values fail here, with the method's message
    comparer = comparer or Comparer(device=device, dtype=dtype, max_pipelines=max_pipelines)
    widgets: list[Widget] = []
    steps0, height0, width0, frames0 = _model_defaults(model)
    models = list(dict.fromkeys([model, *tiny_names()]))

    with gr.Blocks(title="diffaccel side by side") as demo:
        gr.Markdown(
            "# diffaccel: dense versus a method, side by side\n"
            "Same prompt and seed on both sides; side A is the reference for the speedup and PSNR/SSIM. "
            "Tiny models are random-weight pipelines that run offline: their pictures are noise-like and their "
            "times measure overheads."
        )
        with gr.Row():
            model_box = gr.Dropdown(models, value=model, allow_custom_value=True, label="model",
                                    info="tiny pipeline, Hub id or local folder", elem_id="model")
            prompt_box = gr.Textbox(DEFAULT_PROMPT, label="prompt", elem_id="prompt", scale=3)
        with gr.Row():
            seed_box = gr.Number(0, precision=0, label="seed", elem_id="seed")
            steps_box = gr.Number(steps0, precision=0, label="steps", info="empty: the model's default",
                                  elem_id="steps")
            height_box = gr.Number(height0, precision=0, label="height", elem_id="height")
            width_box = gr.Number(width0, precision=0, label="width", elem_id="width")
            frames_box = gr.Number(frames0, precision=0, label="frames", info="video models only",
                                   visible=frames0 is not None, elem_id="frames")
        with gr.Row():
            with gr.Column():
                method_a_box = gr.Dropdown(methods, value=method_a, label="side A method", elem_id="method-a")
                with gr.Accordion("side A parameters", open=False):
                    groups_a = _method_panels("A", methods, method_a, widgets, initial["A"])
            with gr.Column():
                method_b_box = gr.Dropdown(methods, value=method_b, label="side B method", elem_id="method-b")
                with gr.Accordion("side B parameters", open=False):
                    groups_b = _method_panels("B", methods, method_b, widgets, initial["B"])
        with gr.Accordion("timing", open=False):
            with gr.Row():
                warmup_box = gr.Number(1, precision=0, label="warm-up calls per side", elem_id="warmup")
                repeats_box = gr.Number(1, precision=0, label="timed calls per side (alternating)",
                                        elem_id="repeats")
        button = gr.Button("generate", variant="primary", elem_id="generate")

        with gr.Row():
            slider = gr.ImageSlider(label="A | B (drag to compare)", format="png", type="numpy",
                                    elem_id="slider", interactive=False, height=IMAGE_HEIGHT)
            heat = gr.Image(label="|A - B| heat map (scaled to its peak)", format="png", type="numpy",
                            elem_id="heat", interactive=False, height=IMAGE_HEIGHT)
        with gr.Row():
            speedup = gr.Textbox(label="speedup of B over A (A time / B time)", elem_id="speedup",
                                 interactive=False)
            fidelity = gr.Markdown(elem_id="fidelity")
        timing = gr.Markdown(elem_id="timing")
        with gr.Row():
            clip = gr.Video(label="side by side (server-rendered, in sync)", visible=False, elem_id="clip")
            clip_gif = gr.Image(label="side by side (server-rendered GIF, in sync)", type="filepath",
                                visible=False, elem_id="clip-gif", interactive=False)
        frame_plot = gr.LinePlot(x="frame", y="PSNR dB", label="per-frame PSNR (B against A)", visible=False,
                                 elem_id="frame-psnr")
        notes = gr.Markdown(elem_id="notes")

        gr.Markdown("## attention mask: the key blocks the method kept (most recent step)")
        masks = gr.State({})
        with gr.Row():
            with gr.Column(scale=1):
                mask_side = gr.Radio(list(SIDES), value="B", label="side", elem_id="mask-side")
                mask_layer = gr.Dropdown([], label="layer", elem_id="mask-layer")
                mask_head = gr.Number(0, precision=0, minimum=0, label="head", info="0 .. heads-1",
                                      elem_id="mask-head")
                mask_density = gr.Markdown(NO_MASK, elem_id="mask-density")
            mask_img = gr.Image(label="kept key blocks (rows: query blocks, columns: key blocks; white = kept)",
                                format="png", type="numpy", elem_id="mask", interactive=False, scale=2,
                                height=IMAGE_HEIGHT)

        handlers = DemoHandlers(comparer, widgets)
        demo.handlers = handlers  # type: ignore[attr-defined]  # for tests and scripts
        components = [w.component for w in widgets]

        def toggle(groups: dict[str, gr.Group]):
            def show(method: str):
                return [gr.update(visible=m == method) for m in groups]
            return show

        method_a_box.change(toggle(groups_a), method_a_box, list(groups_a.values()), api_visibility="private")
        method_b_box.change(toggle(groups_b), method_b_box, list(groups_b.values()), api_visibility="private")

        def model_changed(name: str):
            steps_, h, w, f = _model_defaults(name or "")
            if steps_ is None:
                return gr.update(), gr.update(), gr.update(), gr.update(visible=True)
            return steps_, h, w, gr.update(value=f, visible=f is not None)

        model_box.change(model_changed, model_box, [steps_box, height_box, width_box, frames_box],
                         api_visibility="private")

        def side_changed(state, side):
            layers = list((state or {}).get(side) or {})
            layer = layers[0] if layers else None
            heads = state[side][layer].shape[0] if layer else 1
            image, text = handlers.show_mask(state, side, layer, 0)
            return gr.update(choices=layers, value=layer), gr.update(maximum=max(heads - 1, 0), value=0), image, text

        mask_side.change(side_changed, [masks, mask_side], [mask_layer, mask_head, mask_img, mask_density],
                         api_visibility="private")
        mask_layer.change(handlers.show_mask, [masks, mask_side, mask_layer, mask_head], [mask_img, mask_density],
                          api_visibility="private")
        mask_head.change(handlers.show_mask, [masks, mask_side, mask_layer, mask_head], [mask_img, mask_density],
                         api_visibility="private")

        button.click(
            handlers.generate,
            [model_box, prompt_box, seed_box, steps_box, height_box, width_box, frames_box, method_a_box,
             method_b_box, warmup_box, repeats_box, *components],
            [slider, heat, timing, speedup, fidelity, clip, clip_gif, frame_plot, notes, masks, mask_side, mask_layer,
             mask_head, mask_img, mask_density],
            api_name="generate", concurrency_id="device", concurrency_limit=1,
        )
        gr.api(handlers.compare_api, api_name="compare", concurrency_id="device", concurrency_limit=1)
    demo.queue(default_concurrency_limit=1)
    return demo


__all__ = ["DemoHandlers", "NO_MASK", "build_app", "fidelity_markdown", "speedup_text", "summary", "timing_markdown"]
