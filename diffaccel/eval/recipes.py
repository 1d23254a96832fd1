"""Recipes of ``diffaccel eval``: YAML files under ``configs/eval/`` naming a model, its size and steps, the
methods with their parameters, and the prompt set; command-line flags override them.

A recipe is a mapping with the keys of :data:`RECIPE_KEYS`. ``methods`` is a list whose entries are a method name
(``gna``), a one-key mapping ``{gna: {kernel_size: [9, 15, 15]}}``, or ``{label: gna-k5, method: gna, params:
{...}}`` to evaluate one method in several settings. Unknown keys, unknown methods and bad parameters are one
:class:`ConfigError` line naming the file (the CLI turns it into ``error: ...`` and exit code 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffaccel.errors import ConfigError, DiffAccelError

RECIPE_KEYS: dict[str, str] = {
    "description": "free text (what the recipe is for, the papers its settings come from)",
    "model": "tiny pipeline name, Hub id or local folder",
    "methods": "list of methods: name, {name: {params}}, or {label, method, params}",
    "prompts": "built-in set (coco, vbench) or a text file, one prompt a line",
    "num": "number of prompts",
    "seeds": "list of seeds",
    "height": "pixels", "width": "pixels", "frames": "video frames", "steps": "denoising steps",
    "out": "output folder", "reference_dir": "folder of reference images (FID/KID)",
    "fid_weights": "clean-fid's inception-2015-12-05.pt", "clip_model": "saved CLIP folder",
    "lpips_weights": "torchvision AlexNet state dict", "dino_model": "saved DINO folder",
    "dtype": "auto, float32, float16, bfloat16", "device": "auto, cpu, cuda, cuda:N",
    "warmup": "untimed calls per method", "grids": "samples per method drawn beside dense",
}
"""Every key a recipe may have, with what it holds."""


def parse_method_entry(entry: Any, where: str) -> tuple[str, str, dict[str, Any]]:
    """``(label, method, params)`` of one ``methods`` entry."""
    if isinstance(entry, str):
        return entry, entry, {}
    if isinstance(entry, dict) and len(entry) == 1 and not ({"label", "method", "params"} & set(entry)):
        (name, params), = entry.items()
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise ConfigError(f"{where}: parameters of method {name!r} must be a mapping, got {params!r}")
        return str(name), str(name), dict(params)
    if isinstance(entry, dict) and "method" in entry:
        extra = set(entry) - {"label", "method", "params"}
        if extra:
            raise ConfigError(f"{where}: unknown key {sorted(extra)[0]!r} in a methods entry (allowed: label, method, params)")
        params = entry.get("params") or {}
        if not isinstance(params, dict):
            raise ConfigError(f"{where}: params of {entry['method']!r} must be a mapping, got {params!r}")
        return str(entry.get("label", entry["method"])), str(entry["method"]), dict(params)
    raise ConfigError(f"{where}: a methods entry must be a name, {{name: {{params}}}} or {{label, method, params}}, "
                      f"got {entry!r}")


def load_recipe(path: str | Path) -> dict[str, Any]:
    """The recipe at ``path`` as a dict of :class:`~diffaccel.eval.runner.EvalOptions` fields (``methods`` as
    ``(label, method, params)`` triples), checked: keys, method names and parameters."""
    try:
        import yaml
    except ImportError:
        raise ConfigError("--config needs PyYAML: pip install pyyaml") from None
    from diffaccel.methods.base import get_method

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {str(path)!r} is not a file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{at}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of keys ({', '.join(RECIPE_KEYS)})")
    unknown = [k for k in data if k not in RECIPE_KEYS]
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; allowed keys: {', '.join(RECIPE_KEYS)}")
    recipe = {k: v for k, v in data.items() if k != "description"}
    if "methods" in recipe:
        if not isinstance(recipe["methods"], list) or not recipe["methods"]:
            raise ConfigError(f"{path}: methods must be a non-empty list")
        triples = [parse_method_entry(e, str(path)) for e in recipe["methods"]]
        for label, name, params in triples:
            if name == "dense" and label == "dense":
                continue
            try:
                get_method(name, **params)
            except DiffAccelError as exc:
                message = exc.args[0] if exc.args else str(exc)
                raise ConfigError(f"{path}: method {label!r}: {message}") from None
        recipe["methods"] = triples
    if "seeds" in recipe and not isinstance(recipe["seeds"], list):
        recipe["seeds"] = [recipe["seeds"]]
    return recipe
