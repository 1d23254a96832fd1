"""HeadHunter: greedy search for the attention heads whose perturbation best guides generation.

Ahn et al., "Fine-Grained Perturbation Guidance via Attention Head Selection" (arXiv 2506.10978, Alg. 1), code
``cvlab-kaist/HeadHunter``. Each round scores every remaining candidate head *added to the heads selected so
far* by the mean objective over prompt-seed pairs, sampling with SoftPAG guidance, and keeps the ``top_k``
best. Later rounds can therefore pick heads that only help together with the earlier ones (the paper's
"golden hour" composition, Fig. 8), which a one-shot ranking misses.

Defaults are those of the repository scripts (``run.sh``): 5 rounds of 3 heads, PAG scale 3.0, 20 steps,
``u = 1`` during the search (then lower ``u``, e.g. 0.5, for use: paper appendix B) and no CFG while searching.
The objective is any callable ``(images, prompts) -> scores`` (higher is better); built in: a CLIP score
(when CLIP weights are available locally or from the Hub) and model-free image statistics for tests and
quick looks. Scores are cached per (model, objective, settings, prompt, seed, head set), so an interrupted
search resumes where it stopped.

The result is a JSON head list that ``diffaccel.apply(pipe, "softpag", heads="heads.json")`` reads.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from diffaccel.errors import ConfigError, ModelLoadError
from diffaccel.methods.softpag import HEADS_FORMAT
from diffaccel.pipelines import hooks
from diffaccel.pipelines.guidance import disable_softpag, enable_softpag, perturbable_modules, resolve_selection

Head = tuple[str, int]
Scorer = Callable[[torch.Tensor, list[str]], Any]
"""``scorer(images, prompts)``: images ``(N, 3, H, W)`` in [0, 1], one prompt each; returns ``N`` scores."""

CACHE_FORMAT = "diffaccel.headhunt.cache/1"

# ---------------------------------------------------------------------------------------------- objectives

_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601


def _luma(images: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor(_LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1)


def brightness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Mean luma (BT.601)."""
    return _luma(images.float()).mean(dim=(1, 2))


def contrast(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """RMS contrast: standard deviation of the luma."""
    return _luma(images.float()).flatten(1).std(dim=1)


def saturation(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Mean HSV saturation ``(max - min) / max`` over pixels (0 where the pixel is black)."""
    images = images.float()
    high, low = images.amax(dim=1), images.amin(dim=1)
    return torch.where(high > 0, (high - low) / high.clamp_min(1e-8), torch.zeros_like(high)).mean(dim=(1, 2))


def sharpness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Variance of the 4-neighbour Laplacian of the luma (a standard focus measure)."""
    luma = _luma(images.float()).unsqueeze(1)
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], device=luma.device).view(1, 1, 3, 3)
    return F.conv2d(luma, kernel).flatten(1).var(dim=1)


IMAGE_STATISTICS: dict[str, Scorer] = {
    "brightness": brightness,
    "contrast": contrast,
    "saturation": saturation,
    "sharpness": sharpness,
}
"""Model-free objectives; prefix a name with ``-`` to minimise it (``-brightness`` finds darkening heads)."""

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_CLIP = "openai/clip-vit-large-patch14"


class ClipScorer:
    """CLIP score ``100·cos(image, text)`` (Hessel et al., "CLIPScore", EMNLP 2021, without the 2.5 rescale).

    Args:
        model: a ``transformers.CLIPModel`` or a Hub id / folder to load one from.
        tokenizer: the matching tokenizer (loaded with the model when ``model`` is a name).
        template: prompt template, e.g. HeadHunter's ``"A photo depicts {prompt}"``.
        device: where to run CLIP; default: the model's device.
    """

    def __init__(self, model: Any = DEFAULT_CLIP, tokenizer: Any = None, *, template: str = "{prompt}", device: Any = None):
        if isinstance(model, str):
            model, tokenizer = load_clip(model)
        if tokenizer is None:
            raise ConfigError("ClipScorer needs the tokenizer that matches the CLIP model")
        if "{prompt}" not in template:
            raise ConfigError(f"template must contain '{{prompt}}', got {template!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = template
        if device is not None:
            self.model.to(device)
        self.image_size = int(model.config.vision_config.image_size)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP's preprocessing on tensors: shorter side to ``image_size`` (bicubic), center crop, normalize."""
        size = self.image_size
        h, w = images.shape[-2:]
        scale = size / min(h, w)
        resized = F.interpolate(
            images.float(), size=(max(size, round(h * scale)), max(size, round(w * scale))), mode="bicubic",
            align_corners=False, antialias=True,
        ).clamp(0, 1)
        top, left = (resized.shape[-2] - size) // 2, (resized.shape[-1] - size) // 2
        cropped = resized[..., top : top + size, left : left + size]
        mean = torch.tensor(OPENAI_CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(OPENAI_CLIP_STD, device=images.device).view(1, 3, 1, 1)
        return (cropped - mean) / std

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        pixels = self.preprocess(images.to(device)).to(next(self.model.parameters()).dtype)
        text = self.tokenizer(
            [self.template.format(prompt=p) for p in prompts], padding=True, truncation=True, return_tensors="pt"
        ).to(device)
        image_embeds = _features(self.model.get_image_features(pixel_values=pixels))
        text_embeds = _features(self.model.get_text_features(**text))
        cosine = F.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
        return 100.0 * cosine.clamp_min(0.0)


def _features(output: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor, or (newer transformers) an output holding ``pooler_output``."""
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


def load_clip(name: str) -> tuple[Any, Any]:
    """A CLIP model and tokenizer from a folder or the Hub (cache); :class:`ModelLoadError` when unavailable."""
    from transformers import AutoTokenizer, CLIPModel

    try:
        return CLIPModel.from_pretrained(name), AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot load CLIP weights {name!r} for the 'clip' objective ({' '.join(str(exc).split())[:200]}); "
            "download them, pass clip:<folder>, or use an image-statistics objective "
            f"({', '.join(IMAGE_STATISTICS)})"
        ) from exc


def resolve_objective(objective: str | Scorer) -> tuple[str, Scorer]:
    """``(name, scorer)`` from a callable, a built-in name, ``clip`` / ``clip:<model>``, or ``module:function``."""
    if callable(objective):
        name = f"{getattr(objective, '__module__', '?')}.{getattr(objective, '__qualname__', type(objective).__name__)}"
        return name, objective
    if not isinstance(objective, str) or not objective:
        raise ConfigError(f"objective must be a callable or a name, got {objective!r}")
    sign, base = (-1.0, objective[1:]) if objective.startswith("-") else (1.0, objective)
    if base in IMAGE_STATISTICS:
        stat = IMAGE_STATISTICS[base]
        return objective, stat if sign > 0 else (lambda images, prompts: -_as_scores(stat(images, prompts), len(prompts)))
    if base == "clip" or base.startswith("clip:"):
        scorer = ClipScorer(base.split(":", 1)[1] if ":" in base else DEFAULT_CLIP)
        return objective, scorer if sign > 0 else (lambda images, prompts: -_as_scores(scorer(images, prompts), len(prompts)))
    if ":" in objective:
        module_name, _, attr = objective.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"objective {objective!r}: cannot import {attr!r} from {module_name!r} ({exc})") from None
        if not callable(fn):
            raise ConfigError(f"objective {objective!r} is not callable")
        return objective, fn
    raise ConfigError(
        f"unknown objective {objective!r}; built in: clip, clip:<model>, {', '.join(IMAGE_STATISTICS)} (prefix '-' "
        "to minimise), or module:function"
    )


def _as_scores(scores: Any, count: int) -> torch.Tensor:
    scores = torch.as_tensor(scores, dtype=torch.float64).detach().cpu().reshape(-1)
    if scores.numel() != count:
        raise ConfigError(f"the objective returned {scores.numel()} scores for {count} images")
    if not torch.isfinite(scores).all():
        raise ConfigError(f"the objective returned non-finite scores: {scores.tolist()}")
    return scores


# ---------------------------------------------------------------------------------------------- the search


def greedy_head_search(
    candidates: Sequence[Head],
    evaluate: Callable[[list[Head]], float],
    *,
    rounds: int,
    top_k: int,
    progress: Callable[[Head], None] | None = None,
) -> tuple[list[Head], list[dict[Head, float]]]:
    """HeadHunter Algorithm 1 on an abstract objective.

    Args:
        candidates: the heads to choose from, in a fixed order (ties keep it).
        evaluate: score of a head set (higher is better).
        rounds, top_k: ``top_k`` heads are added per round, for ``rounds`` rounds (fewer if heads run out).
        progress: called after each candidate is scored.

    Returns:
        The selected heads in selection order, and each round's scores of the candidates it scored.
    """
    if rounds < 1 or top_k < 1:
        raise ConfigError(f"rounds and top_k must be >= 1, got rounds={rounds}, top_k={top_k}")
    if len(set(candidates)) != len(candidates):
        raise ConfigError("candidate heads must be distinct")
    selected: list[Head] = []
    pool = list(candidates)
    history: list[dict[Head, float]] = []
    for _ in range(rounds):
        if not pool:
            break
        scores: dict[Head, float] = {}
        for head in pool:
            scores[head] = float(evaluate(selected + [head]))
            if progress is not None:
                progress(head)
        history.append(scores)
        best = sorted(pool, key=lambda h: -scores[h])[:top_k]  # stable: ties keep the candidate order
        selected.extend(best)
        pool = [h for h in pool if h not in best]
    return selected, history


class ScoreCache:
    """Scores of (settings, prompt, seed, head set) samples in a JSON file, written after every new score."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = None if path is None else Path(path)
        self.scores: dict[str, float] = {}
        if self.path is not None and self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except json.JSONDecodeError as exc:
                raise ConfigError(f"score cache {str(self.path)!r} is not valid JSON: {exc}") from None
            if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
                raise ConfigError(f"{str(self.path)!r} is not a headhunt score cache (format {CACHE_FORMAT})")
            self.scores = {k: float(v) for k, v in data["scores"].items()}

    @staticmethod
    def key(**parts: Any) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def get(self, key: str) -> float | None:
        return self.scores.get(key)

    def put(self, key: str, score: float) -> None:
        self.scores[key] = float(score)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps({"format": CACHE_FORMAT, "scores": self.scores}))
            os.replace(tmp, self.path)


@dataclass
class HeadSearchResult:
    """Selected heads (in selection order), per-round candidate scores and the search settings."""

    selected: list[Head]
    rounds: list[dict[Head, float]]
    settings: dict[str, Any] = field(default_factory=dict)

    def heads(self) -> dict[str, list[int]]:
        """``{layer: [head, ...]}`` as ``softpag`` takes it."""
        out: dict[str, list[int]] = {}
        for layer, head in self.selected:
            out.setdefault(layer, []).append(head)
        return {layer: sorted(h) for layer, h in out.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "format": HEADS_FORMAT,
            "heads": self.heads(),
            "order": [[layer, head] for layer, head in self.selected],
            "rounds": [
                [{"layer": layer, "head": head, "score": score} for (layer, head), score in r.items()]
                for r in self.rounds
            ],
            "settings": self.settings,
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path


def candidate_heads(pipe_or_model: Any, layers: Iterable[str] | None = None) -> list[Head]:
    """Every (module, head) of the self/joint attention modules (of the first denoiser), or of ``layers``."""
    model = hooks.denoisers_of(pipe_or_model)[0]
    if layers is None:
        modules = perturbable_modules(model)
        return [(name, h) for name, module in modules.items() for h in range(int(module.heads))]
    resolved = resolve_selection([model], {name: None for name in layers})
    return [(name, h) for name, heads in resolved.items() for h in heads]


def model_fingerprint(pipe_or_model: Any) -> str:
    """Denoiser class, config and a checksum of its first and last parameters (cache key of a model)."""
    model = hooks.denoisers_of(pipe_or_model)[0]
    params = list(model.parameters())
    checksum = [float(p.detach().float().sum()) for p in (params[:1] + params[-1:])]
    config = dict(getattr(model, "config", {}) or {})
    return ScoreCache.key(cls=type(model).__name__, config=config, checksum=checksum)


def hunt_heads(
    pipe: Any,
    prompts: Sequence[str] | Sequence[tuple[str, int]],
    *,
    objective: str | Scorer = "clip",
    rounds: int = 5,
    top_k: int = 3,
    candidates: Sequence[Head] | None = None,
    layers: Iterable[str] | None = None,
    strength: float = 1.0,
    scale: float = 3.0,
    identity: str = "full",
    guidance_scale: float = 0.0,
    num_inference_steps: int = 20,
    batch_size: int = 4,
    call_kwargs: dict[str, Any] | None = None,
    cache: str | Path | None = None,
    model_key: str | None = None,
    progress: bool = True,
) -> HeadSearchResult:
    """Run HeadHunter on a diffusers pipeline.

    Args:
        pipe: the pipeline (image pipelines whose ``output_type="pt"`` gives ``(N, 3, H, W)`` in [0, 1]).
        prompts: prompts (seed = position, as HeadHunter does) or ``(prompt, seed)`` pairs.
        objective: a scorer callable, ``clip``, ``clip:<model>``, an image statistic or ``module:function``.
        rounds, top_k: heads added per round and number of rounds (paper scripts: 5 and 3).
        candidates / layers: the heads to search (default: every head of every self/joint attention module).
        strength, scale, identity: SoftPAG ``u``, guidance weight and identity used while sampling.
        guidance_scale: CFG scale while sampling (0: none, as the paper's searches).
        num_inference_steps, call_kwargs: further pipeline call settings (``height``, ``width``...).
        batch_size: prompt-seed pairs per pipeline call.
        cache: JSON file of scores, reused across runs; ``model_key`` names the model in it (default: a
            fingerprint of the denoiser).
        progress: show a progress bar.
    """
    from tqdm.auto import tqdm

    pairs = [(p, i) if isinstance(p, str) else (str(p[0]), int(p[1])) for i, p in enumerate(prompts)]
    if not pairs:
        raise ConfigError("hunt_heads needs at least one prompt")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    objective_name, scorer = resolve_objective(objective)
    if candidates is None:
        candidates = candidate_heads(pipe, layers)
    elif layers is not None:
        raise ConfigError("give candidates or layers, not both")
    candidates = [(str(layer), int(head)) for layer, head in candidates]
    resolve_selection(hooks.denoisers_of(pipe)[:1], {layer: (head,) for layer, head in candidates})

    call_kwargs = dict(call_kwargs or {})
    settings = {
        "objective": objective_name, "strength": strength, "scale": scale, "identity": identity,
        "guidance_scale": guidance_scale, "num_inference_steps": num_inference_steps,
        "call_kwargs": call_kwargs, "prompts": [list(p) for p in pairs], "rounds": rounds, "top_k": top_k,
    }
    score_cache = ScoreCache(cache)
    key_base = {
        "model": model_key or model_fingerprint(pipe), "objective": objective_name, "strength": strength,
        "scale": scale, "identity": identity, "guidance_scale": guidance_scale, "steps": num_inference_steps,
        "call": call_kwargs,
    }

    had_diffaccel = hooks.installed_processor(hooks.denoisers_of(pipe)[0]) is not None
    first = candidates[0]
    processor = enable_softpag(pipe, heads={first[0]: [first[1]]}, strength=strength, scale=scale, identity=identity)
    method = processor.method
    models = hooks.denoisers_of(pipe)

    def evaluate(heads: list[Head]) -> float:
        selection: dict[str, tuple[int, ...]] = {}
        for layer, head in heads:
            selection[layer] = tuple(sorted(set(selection.get(layer, ())) | {head}))
        head_key = sorted([layer, head] for layer, head in heads)
        keys = [ScoreCache.key(**key_base, heads=head_key, prompt=p, seed=s) for p, s in pairs]
        missing = [i for i, k in enumerate(keys) if score_cache.get(k) is None]
        if missing:
            method.set_heads(resolve_selection(models, selection))
            for start in range(0, len(missing), batch_size):
                chunk = missing[start : start + batch_size]
                chunk_prompts = [pairs[i][0] for i in chunk]
                images = sample_images(
                    pipe, chunk_prompts, [pairs[i][1] for i in chunk], guidance_scale=guidance_scale,
                    num_inference_steps=num_inference_steps, **call_kwargs,
                )
                for i, score in zip(chunk, _as_scores(scorer(images, chunk_prompts), len(chunk)).tolist()):
                    score_cache.put(keys[i], score)
        return float(sum(score_cache.get(k) for k in keys) / len(keys))

    total = sum(max(0, len(candidates) - r * top_k) for r in range(rounds))
    bar = tqdm(total=total, desc="headhunt", unit="head", disable=not progress)
    try:
        selected, history = greedy_head_search(
            candidates, evaluate, rounds=rounds, top_k=top_k, progress=lambda head: bar.update(1)
        )
    finally:
        bar.close()
        if had_diffaccel:
            disable_softpag(pipe)
        else:
            hooks.remove(pipe)
    return HeadSearchResult(selected=selected, rounds=history, settings=settings)


def sample_images(
    pipe: Any, prompts: list[str], seeds: list[int], *, guidance_scale: float, num_inference_steps: int, **kwargs: Any
) -> torch.Tensor:
    """``(N, 3, H, W)`` images in [0, 1], one per prompt, each from a CPU generator seeded with its seed."""
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    out = pipe(
        prompt=prompts, generator=generators, guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps, output_type="pt", **kwargs,
    )
    images = out.images if hasattr(out, "images") else out[0]
    images = torch.as_tensor(images)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ConfigError(f"headhunt scores images (N, 3, H, W); the pipeline returned shape {tuple(images.shape)}")
    return images


def read_prompts(path: str | Path) -> list[tuple[str, int]]:
    """Prompt-seed pairs from a text file: one prompt per line (seed = line index among prompts), or
    ``seed<TAB>prompt``; blank lines and lines starting with ``#`` are skipped."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"prompts file {str(path)!r} does not exist")
    pairs: list[tuple[str, int]] = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        seed_text, tab, prompt = line.partition("\t")
        if tab and seed_text.strip().lstrip("-").isdigit():
            pairs.append((prompt.strip(), int(seed_text)))
        else:
            pairs.append((line, len(pairs)))
    if not pairs:
        raise ConfigError(f"prompts file {str(path)!r} holds no prompt")
    return pairs


# ---------------------------------------------------------------------------------------------- CLI


def _option(*param_decls: str, help: str) -> Any:
    """A ``typer.Option`` for the annotations of :func:`headhunt_command`."""
    import typer

    return typer.Option(*param_decls, help=help)



def headhunt_command(
    model: Annotated[str, _option("--model", "-m", help="tiny pipeline name, Hub id or pipeline folder")],
    prompts: Annotated[Path, _option("--prompts", help="text file: one prompt per line, or seed<TAB>prompt")],
    objective: Annotated[str, _option(help="clip, clip:<model>, brightness, contrast, saturation, sharpness "
                                            "('-' prefix minimises), or module:function")] = "clip",
    rounds: Annotated[int, _option(help="greedy rounds (HeadHunter scripts: 5)")] = 5,
    top_k: Annotated[int, _option("--top-k", help="heads kept per round (HeadHunter scripts: 3)")] = 3,
    out: Annotated[Path, _option("--out", "-o", help="head-list JSON to write")] = Path("heads.json"),
    layers: Annotated[list[str] | None, _option("--layer", help="search only these modules (repeatable)")] = None,
    strength: Annotated[float, _option(help="SoftPAG u while searching (paper: 1.0, then lower)")] = 1.0,
    scale: Annotated[float, _option(help="PAG guidance weight while searching")] = 3.0,
    identity: Annotated[str, _option(help="'full' (paper) or 'image' (diffusers SD3 PAG)")] = "full",
    guidance_scale: Annotated[float, _option(help="CFG scale while searching (0: none, as the paper)")] = 0.0,
    steps: Annotated[int, _option(help="denoising steps per sample")] = 20,
    seeds_per_prompt: Annotated[int, _option(help="seeds per prompt line (seed, seed+1, ...)")] = 1,
    height: Annotated[int | None, _option(help="image height (default: the model's)")] = None,
    width: Annotated[int | None, _option(help="image width (default: the model's)")] = None,
    batch_size: Annotated[int, _option(help="prompt-seed pairs per pipeline call")] = 4,
    cache: Annotated[Path | None, _option(help="score cache JSON (default: <out>.cache.json)")] = None,
    device: Annotated[str, _option(help="auto, cpu, cuda, cuda:N")] = "auto",
    dtype: Annotated[str, _option(help="auto, float32, float16, bfloat16")] = "auto",
    progress: Annotated[bool, _option("--progress/--no-progress", help="show a progress bar")] = True,
) -> Path:
    """Search the attention heads whose SoftPAG perturbation maximises OBJECTIVE and write them as JSON."""
    from diffaccel.pipelines.loading import load_pipeline
    from diffaccel.pipelines.tiny import is_tiny, tiny_spec

    if seeds_per_prompt < 1:
        raise ConfigError(f"seeds_per_prompt must be >= 1, got {seeds_per_prompt}")
    pairs = [(p, s + j) for p, s in read_prompts(prompts) for j in range(seeds_per_prompt)]
    pipe = load_pipeline(model, dtype=dtype, device=device)
    call_kwargs: dict[str, Any] = {}
    if is_tiny(model):
        call_kwargs = tiny_spec(model).call_kwargs()
        for key in ("num_inference_steps", "guidance_scale"):
            call_kwargs.pop(key, None)
    if height is not None:
        call_kwargs["height"] = height
    if width is not None:
        call_kwargs["width"] = width
    pipe.set_progress_bar_config(disable=True)
    result = hunt_heads(
        pipe, pairs, objective=objective, rounds=rounds, top_k=top_k, layers=layers, strength=strength,
        scale=scale, identity=identity, guidance_scale=guidance_scale, num_inference_steps=steps,
        batch_size=batch_size, call_kwargs=call_kwargs,
        cache=cache if cache is not None else out.with_name(out.name + ".cache.json"),
        model_key=model if is_tiny(model) else None, progress=progress,
    )
    result.settings["model"] = model
    path = result.save(out)
    print(f"selected {len(result.selected)} heads: " + ", ".join(f"{l}:{h}" for l, h in result.selected))
    print(f"wrote {path}")
    return path
