"""The compatibility matrix: every method x what diffusers users combine it with, on the tiny Wan transformer.

Each cell runs and is judged against an oracle: ``dense`` against the stock processors under the same feature,
every method against itself on the plain eager model (compile, copies, batching must not change its output), and
the method's own attention must have run (``call_counts``). A cell is ``pass``, ``refused: <error>`` (a clear
diffaccel or diffusers error), ``n/a: <why>`` (the feature cannot run here), or ``FAIL: <what>`` (a silent drop or
a wrong result, which the test forbids). ``benchmarks/compat_matrix.py`` writes the table into the README between
markers; ``tests/test_compat_matrix.py`` runs the matrix and checks the README table is current.

Cache hooks are covered by ``tests/test_cache_hooks.py`` (every diffusers cache config, pipelines), regional
compilation on 24 blocks by ``tests/test_compile.py``.
"""

from __future__ import annotations

import copy
import importlib.util
import io
from typing import Any, Callable

import torch

FEATURES = ("compile fullgraph", "regional compile", "fused QKV", "LoRA", "group offload", "deepcopy",
            "save/load", "batch 2 (CFG)")
MARK_BEGIN = "<!-- compat-matrix:begin -->"
MARK_END = "<!-- compat-matrix:end -->"


def method_kwargs(name: str, softpag_layer: str = "blocks.0.attn1") -> dict[str, Any]:
    """Keywords that make method ``name`` do its work on a tiny model from the first call: the reference backend,
    16-token blocks, no dense warm-up; SoftPAG perturbs ``softpag_layer``. Shared by the matrix and the compile
    tests."""
    from diffaccel.methods.base import method_parameters

    fields = {f[0] for f in method_parameters(name)}
    kw: dict[str, Any] = {}
    if "backend" in fields:
        kw["backend"] = "reference"
    if "block_size" in fields:
        kw["block_size"] = 16
    if "dense_steps" in fields:
        kw["dense_steps"] = 0
    if "dense_fraction" in fields:
        kw["dense_fraction"] = 0.0
    if name == "softpag":
        kw["layers"] = [softpag_layer]
    return kw


def build_method(name: str) -> Any:
    from diffaccel.methods.base import get_method

    method = get_method(name, **method_kwargs(name))
    if name == "paro":  # a plan of the tiny geometry: every block kept, identity orders (exact attention)
        method.set_plan(_paro_plan())
    return method


def _paro_plan() -> Any:
    from diffaccel.methods.paro_plan import ParoPlan, pack_bits

    nb = -(-48 // 16)
    keep = torch.ones(1, 2, 2, nb, nb, dtype=torch.bool)
    from diffaccel.pipelines.model_setup import model_config_hash, model_id

    model = tiny_wan()
    return ParoPlan(model=model_id(model), config_hash=model_config_hash(model), grid=(3, 4, 4), text_len=0, text_first=True, heads=2,
                    layers=("blocks.0.attn1", "blocks.1.attn1"), density=1.0, steps=1, num_buckets=1, block=16,
                    alpha=0.5, orders=torch.zeros(2, 2, dtype=torch.int8), masks=pack_bits(keep),
                    recall=torch.ones(2, 2), kept_density=torch.ones(2, 2), prompts=1, package_version="matrix")


def tiny_wan() -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    from diffaccel.pipelines.tiny import sharpen_attention

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                      in_channels=16, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64,
                                      num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                      rope_max_seq_len=32)
    sharpen_attention(model)
    return model.eval()


def inputs(batch: int = 1, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 16, 3, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(batch, 8, 32, generator=g),
                timestep=torch.full((batch,), 500.0), return_dict=False)


def _forward(model: Callable, kw: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model(**kw)[0]


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.isfinite(a).all()) and torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def _judge(processor: Any, out: torch.Tensor, oracle: tuple[torch.Tensor, bool], before: int | None) -> str:
    """``oracle``: the eager output and whether the method ran its own attention there."""
    if not _close(out, oracle[0]):
        return "FAIL: output differs from the oracle"
    counts = getattr(processor.method, "call_counts", None)
    if counts is not None and before is not None and (counts.method > before) != oracle[1]:
        return "FAIL: the method did not run (silent dense)" if oracle[1] else "FAIL: ran where eager ran dense"
    return "pass"


def _count(processor: Any) -> int | None:
    counts = getattr(processor.method, "call_counts", None)
    return None if counts is None else counts.method


def _eager(processor: Any, model: Callable, kw: dict[str, Any]) -> tuple[torch.Tensor, bool]:
    before = _count(processor)
    out = _forward(model, kw)
    return out, before is not None and _count(processor) > before


def _diffaccel_processors(model: torch.nn.Module) -> list[str]:
    """Class names of the processors that are not diffaccel's (a swap after apply)."""
    from diffaccel.pipelines.processor import DiffAccelAttnProcessor

    return sorted({type(m.processor).__name__ for m in model.modules()
                   if hasattr(m, "set_processor") and not isinstance(m.processor, DiffAccelAttnProcessor)})


def run_matrix(methods: list[str] | None = None) -> dict[str, dict[str, str]]:
    """``{method: {feature: status}}`` for the registered methods (or ``methods``)."""
    import diffaccel
    from diffaccel.methods.base import list_methods

    names = list_methods() if methods is None else methods
    kw = inputs()
    results: dict[str, dict[str, str]] = {n: {} for n in names}

    # oracles: each method eagerly on the plain model, and the stock model
    stock_model = tiny_wan()
    stock_b2 = _forward(stock_model, inputs(batch=2, seed=1))
    model = tiny_wan()
    processor = diffaccel.apply(model, "dense")
    swapped: dict[str, tuple[torch.Tensor, bool]] = {}  # the method swapped into one processor, eagerly
    methods_by_name: dict[str, Any] = {}
    for name in names:
        processor.method = methods_by_name[name] = build_method(name)
        swapped[name] = _eager(processor, model, kw)
    applied: dict[str, tuple[torch.Tensor, bool]] = {}  # diffaccel.apply(fresh model, method), eagerly
    for name in names:
        m = tiny_wan()
        applied[name] = _eager(diffaccel.apply(m, build_method(name)), m, kw)

    def cell(name: str, feature: str, fn: Callable[[], str]) -> None:
        try:
            results[name][feature] = fn()
        except diffaccel.DiffAccelError as error:
            results[name][feature] = f"refused: {str(error).splitlines()[0][:90]}"
        except Exception as error:  # noqa: BLE001 - an unexpected error is a failing cell, with its message
            results[name][feature] = f"FAIL: {type(error).__name__}: {str(error).splitlines()[0][:80]}"

    compiled = torch.compile(model, fullgraph=True, backend="eager")
    for name in names:
        processor.method = methods_by_name[name] = build_method(name)
        before = _count(processor)
        cell(name, "compile fullgraph", lambda: _judge(processor, _forward(compiled, kw), swapped[name], before))
    torch._dynamo.reset()

    regional = tiny_wan()
    regional_proc = diffaccel.apply(regional, "dense")
    regional.compile_repeated_blocks(fullgraph=True, backend="eager")
    for name in names:
        regional_proc.method = build_method(name)
        before = _count(regional_proc)
        cell(name, "regional compile", lambda: _judge(regional_proc, _forward(regional, kw), swapped[name], before))
    torch._dynamo.reset()

    def fused(name: str) -> str:
        m = tiny_wan()
        p = diffaccel.apply(m, build_method(name) if name != "dense" else "dense")
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m.fuse_qkv_projections()
        swapped = _diffaccel_processors(m)
        if swapped:
            said = [str(w.message) for w in caught if any(s in str(w.message) for s in swapped)]
            return f"refused: warned that {swapped[0]} replaced it" if said else \
                f"FAIL: silently replaced by {', '.join(swapped)}"
        oracle_model = tiny_wan()
        oracle_model.fuse_qkv_projections()
        oracle = (_forward(oracle_model, kw), False) if name == "dense" else applied[name]
        before = _count(p)
        return _judge(p, _forward(m, kw), oracle, before)

    def lora(name: str) -> str:
        if importlib.util.find_spec("peft") is None:
            return "n/a: peft not installed"
        from peft import LoraConfig

        m = tiny_wan()
        m.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
        ref = _forward(m, kw)
        p = diffaccel.apply(m, build_method(name))
        out = _forward(m, kw)
        return "pass" if (name != "dense" and torch.isfinite(out).all()) or _close(out, ref) else "FAIL: LoRA output"

    def group_offload(name: str) -> str:
        m = tiny_wan()
        p = diffaccel.apply(m, build_method(name))
        m.enable_group_offload(onload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1)
        before = _count(p)
        return _judge(p, _forward(m, kw), applied[name], before)

    def deep_copy(name: str) -> str:
        m = tiny_wan()
        diffaccel.apply(m, build_method(name))
        clone = copy.deepcopy(m)
        from diffaccel.pipelines.hooks import installed_processor

        p = installed_processor(clone)
        before = _count(p)
        return _judge(p, _forward(clone, kw), applied[name], before)

    def save_load(name: str) -> str:
        m = tiny_wan()
        diffaccel.apply(m, build_method(name))
        buffer = io.BytesIO()
        torch.save(m, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        from diffaccel.pipelines.hooks import installed_processor

        p = installed_processor(loaded)
        before = _count(p)
        return _judge(p, _forward(loaded, kw), applied[name], before)

    def batch2(name: str) -> str:
        processor.method = build_method(name)
        both = inputs(batch=2, seed=1)
        out = _forward(model, both)
        if name == "dense":
            return "pass" if _close(out, stock_b2) else "FAIL: batch 2 differs from stock"
        rows = []
        for i in range(2):
            processor.method = build_method(name)
            rows.append(_forward(model, {k: (v[i:i + 1] if isinstance(v, torch.Tensor) else v)
                                         for k, v in both.items()}))
        return "pass" if _close(out, torch.cat(rows)) else "FAIL: batch rows differ from single runs"

    for name in names:
        for feature, fn in (("fused QKV", fused), ("LoRA", lora), ("group offload", group_offload),
                            ("deepcopy", deep_copy), ("save/load", save_load), ("batch 2 (CFG)", batch2)):
            cell(name, feature, lambda fn=fn: fn(name))
    return results


def render_table(results: dict[str, dict[str, str]]) -> str:
    """A markdown table: methods as rows, features as columns; refusals and n/a cells abbreviated, footnoted."""
    header = "| method | " + " | ".join(FEATURES) + " |"
    lines = [header, "|" + "---|" * (len(FEATURES) + 1)]
    notes: dict[str, int] = {}
    for name, cells in results.items():
        row = []
        for feature in FEATURES:
            status = cells.get(feature, "FAIL: not run")
            if status == "pass":
                row.append("pass")
                continue
            kind, _, why = status.partition(": ")
            number = notes.setdefault(f"{kind}: {why}", len(notes) + 1)
            row.append(f"{kind} [{number}]")
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    lines.append("")
    lines.extend(f"[{n}] {text}" for text, n in notes.items())
    return "\n".join(lines)


def readme_block(results: dict[str, dict[str, str]]) -> str:
    return f"{MARK_BEGIN}\n{render_table(results)}\n{MARK_END}"
