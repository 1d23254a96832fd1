"""Every public option of every registered method is turned on by a test that checks its effect (issue 8, item 8).

``OPTIONS`` holds one row per ``(method, config field)``: a non-default value and the effect it must have on a
small random self/joint attention call (grids of odd sizes, 6 text tokens as a prefix and as a suffix):

- ``output``: the output differs from the defaults' by more than ``DIFFERS`` (over the given steps, at least once);
- ``dense``: the call runs dense (equals SDPA) where the defaults do not ("changes where it applies");
- ``same``: the output must not change (an implementation choice, such as the kernel block or backend);
- ``raises``: a value that does not fit the call is refused with a ConfigError naming the field (validation only);
- ``custom``: a check of its own (named in the row);
- ``covered``: tested elsewhere; the row names the file and test functions, which must exist.

A config field without a row fails :func:`test_every_option_has_a_row` ("no option test for method.field"), so a
new option comes with its test. Methods run with ``backend="reference"`` where they have one (fast, exact).
"""

from __future__ import annotations

import ast
import dataclasses
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F

import diffaccel
from diffaccel.context import RunContext
from diffaccel.errors import ConfigError
from diffaccel.layout import TokenLayout
from diffaccel.methods.base import get_method, list_methods, method_class

HEADS, DIM, BATCH, TEXT = 2, 16, 2, 6
DIFFERS = 1e-4
"""Smallest change that counts as an effect: 150x the float32 noise below (the dense and same guards of this file
measured min 0.54)."""
SAME = 2e-6
"""float32 reorderings (another kernel block, the Triton kernel against the PyTorch reference): measured max
6.6e-7 over this file."""
LAYER = "transformer_blocks.0.attn"
TESTS = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    """One attention call: visual grid, text placement, what the run context says."""

    grid: tuple[int, ...]
    text: str | None  # "prefix", "suffix" or None
    num_steps: int | None = 10
    hierarchical: bool = False  # a UNet level (the adapter says so through TokenLayout.hierarchical)

    def layout(self) -> TokenLayout:
        nv = math.prod(self.grid)
        nt = TEXT if self.text else 0
        text = None if not self.text else slice(0, nt) if self.text == "prefix" else slice(nv, nv + nt)
        return TokenLayout(nv + nt, self.grid, text=text, hierarchical=self.hierarchical)

    def ctx(self, step: int = 0) -> RunContext:
        return RunContext(grid=self.grid, text_len=TEXT if self.text else None, step=step, timestep=1000.0 - step,
                          num_steps=self.num_steps, layer=LAYER, denoiser_calls=step + 1)

    def inputs(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(zlib.crc32(repr(self).encode()))
        n = self.layout().num_tokens
        return tuple(torch.randn(BATCH, HEADS, n, DIM, generator=g).to(dtype) for _ in range(3))  # type: ignore


JOINT2D = "joint2d"  # (5, 7) + text, run with the text as a prefix and as a suffix
JOINT3D = "joint3d"  # (3, 5, 7) + text
WIDE2D = "wide2d"  # (9, 11) + text: windows of >= 4 tokens, so MSW's shifts move them
IMAGE2D = "image2d"  # (9, 11), no text: a UNet level (agentsd)
LONG3D = "long3d"  # (5, 3, 5) + text: enough frames that two global frames leave some frames local
SCENARIOS = {JOINT2D: ((5, 7), True), JOINT3D: ((3, 5, 7), True), WIDE2D: ((9, 11), True), IMAGE2D: ((9, 11), False),
             LONG3D: ((5, 3, 5), True)}


def scenarios(name: str) -> list[Scenario]:
    grid, joint = SCENARIOS[name]
    if joint:
        return [Scenario(grid, pos) for pos in ("prefix", "suffix")]
    return [Scenario(grid, None, hierarchical=name == IMAGE2D)]


# ----------------------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Option:
    value: Any
    effect: str
    reason: str
    scenario: str = JOINT2D
    base: dict[str, Any] = field(default_factory=dict)  # applied to the default run and the option run
    steps: tuple[int, ...] = (0,)
    check: Callable[[str, "Option"], None] | None = None  # effect "custom"
    tests: tuple[str, ...] = ()  # effect "covered": "file.py::test_name"


def locality_rows(method: str, *, scenario: str, base: dict[str, Any], override: tuple[str, Any]) -> dict:
    """The LocalityConfig fields every locality method shares (layer selection, warm-up, kernel choices)."""
    return {
        (method, "dense_steps"): Option(1, "dense", "step 0 of a 1-step dense warm-up runs exact attention",
                                        scenario, base),
        (method, "layers"): Option(("single_transformer_blocks.*",), "dense",
                                   "a layer outside the selection stays dense", scenario, base),
        (method, "exclude_layers"): Option(("transformer_blocks.0.*",), "dense", "an excluded layer stays dense",
                                           scenario, base),
        (method, "layer_overrides"): Option({"transformer_blocks.0.*": dict([override])}, "custom",
                                            f"the override ({override[0]}={override[1]!r}) reaches this layer and "
                                            "no other", scenario, base, check=check_layer_override),
        (method, "block_size"): Option(16, "same", "another kernel block, the same attention", scenario, base),
        (method, "backend"): Option("triton", "same", "the Triton kernel (interpreted on CPU) equals the reference",
                                    scenario, {**base, "block_size": 64}),
    }


def check_layer_override(method: str, opt: Option) -> None:
    ((pattern, values),) = opt.value.items()
    for sc in scenarios(opt.scenario):
        q, k, v = sc.inputs()
        overridden = call(method, {**opt.base, "layer_overrides": opt.value}, sc, q, k, v)
        direct = call(method, {**opt.base, **values}, sc, q, k, v)
        default = call(method, opt.base, sc, q, k, v)
        assert_close(overridden, direct, SAME)
        assert_differs(overridden, default)
        # a layer the pattern does not match keeps that layer's defaults (MSW's shifts depend on the layer name)
        other_layer = "transformer_blocks.1.attn"
        other = call(method, {**opt.base, "layer_overrides": opt.value}, sc, q, k, v, layer=other_layer)
        assert_close(other, call(method, opt.base, sc, q, k, v, layer=other_layer), SAME)


def check_two_levels(method: str, opt: Option) -> None:
    """UNet-like: the latent grid (10, 14) with attention at full size and at half size (5, 7), no text.

    ``max_downsample=None`` changes only the highest-resolution level it has seen; ``max_downsample=2`` also the
    half-size level.
    """
    latent, level = (10, 14), (5, 7)
    g = torch.Generator().manual_seed(7)
    full = tuple(torch.randn(BATCH, HEADS, 140, DIM, generator=g) for _ in range(3))
    half = tuple(torch.randn(BATCH, HEADS, 35, DIM, generator=g) for _ in range(3))
    ctx = RunContext(grid=latent, step=0, timestep=1000.0, num_steps=10, layer="down_blocks.0.attentions.0",
                     denoiser_calls=1)
    full_layout = TokenLayout(140, latent, downsample=1, hierarchical=True)
    half_layout = TokenLayout(35, level, downsample=2, hierarchical=True)
    outs = {}
    for name, config in (("default", opt.base), ("option", {**opt.base, "max_downsample": opt.value})):
        m = get_method(method, **config)
        top = m(*full, full_layout, ctx)
        assert_differs(top, F.scaled_dot_product_attention(*full))  # the top level changes in both runs
        ctx.layer = "down_blocks.1.attentions.0"
        outs[name] = m(*half, half_layout, ctx)
        ctx.layer = "down_blocks.0.attentions.0"
    dense = F.scaled_dot_product_attention(*half)
    assert_close(outs["default"], dense, SAME)
    assert_differs(outs["option"], dense)


def check_cyclic_shifts(method: str, opt: Option) -> None:
    """``cyclic``: the shift index is ``step mod 4``, so outputs repeat every 4 steps and steps 0-3 all differ (on
    windows of 5x6 tokens the 4 shifts move them by 0-3 tokens); the seeded random draw differs on some step."""
    for sc in scenarios(opt.scenario):
        q, k, v = sc.inputs()
        cyclic = [call(method, {**opt.base, "shift_policy": opt.value}, sc, q, k, v, step=s) for s in range(8)]
        drawn = [call(method, opt.base, sc, q, k, v, step=s) for s in range(8)]
        for s in range(4):
            assert_close(cyclic[s + 4], cyclic[s], SAME)
            for t in range(s):
                assert_differs(cyclic[s], cyclic[t])
        assert max((a - b).abs().max().item() for a, b in zip(cyclic, drawn)) > DIFFERS


def check_fp32_logits(method: str, opt: Option) -> None:
    """bfloat16 inputs: with the option the agent stages run in float32 (seen at SDPA) and the output stays
    bfloat16 and no less accurate. On the CPU, SDPA already accumulates bfloat16 in float32, so the outputs can be
    equal here; on a GPU they are not."""
    seen: list[torch.dtype] = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, *args, **kwargs):
        seen.append(q.dtype)
        return sdpa(q, *args, **kwargs)

    for sc in scenarios(opt.scenario):
        q, k, v = sc.inputs(torch.bfloat16)
        exact = call(method, opt.base, sc, q.float(), k.float(), v.float())
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(F, "scaled_dot_product_attention", spy)
            low = call(method, opt.base, sc, q, k, v)
            low_dtypes, seen[:] = set(seen), []
            high = call(method, {**opt.base, "fp32_logits": opt.value}, sc, q, k, v)
            high_dtypes, seen[:] = set(seen), []
        # the agent stages run in float32 with the option (text rows stay exact attention in the input dtype)
        assert low_dtypes == {torch.bfloat16} and torch.float32 in high_dtypes, (low_dtypes, high_dtypes)
        assert high.dtype == low.dtype == torch.bfloat16
        err_low = (low.float() - exact).abs().max().item()
        err_high = (high.float() - exact).abs().max().item()
        assert err_high <= err_low, (err_high, err_low)


def _clear_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(p.shape, generator=g) * 0.05
        for name, p in model.named_parameters()
        if any(t in name for t in (".attn.to_q.", ".attn.to_k.", ".attn.to_v.", ".attn.to_out."))
    }


def check_clear_weights(method: str, opt: Option, tmp_path: Path) -> None:
    """``weights`` installs the distilled projections when applied; ``weights_file`` picks the file."""
    from safetensors.torch import save_file

    from image_models import tiny_flux

    folder = tmp_path / "clear"
    folder.mkdir()
    by_radius, custom = _clear_state(tiny_flux(), 1), _clear_state(tiny_flux(), 2)
    save_file(by_radius, str(folder / "clear_local_2.safetensors"))
    save_file(custom, str(folder / "custom.safetensors"))
    cases = {"weights": ({"weights": str(folder)}, by_radius),
             "weights_file": ({"weights": str(folder), "weights_file": "custom.safetensors"}, custom)}
    config, expected = cases[opt.value]
    model = tiny_flux()
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    diffaccel.apply(model, method, radius=2.0, backend="reference", **config)
    try:
        params = dict(model.named_parameters())
        assert expected and all(torch.equal(params[k], t) for k, t in expected.items())
        assert all(torch.equal(p, before[k]) for k, p in params.items() if k not in expected)
    finally:
        diffaccel.remove(model)
    untouched = tiny_flux()
    original = {k: p.detach().clone() for k, p in untouched.named_parameters()}
    diffaccel.apply(untouched, method, radius=2.0, backend="reference")  # default: weights=None changes nothing
    try:
        assert all(torch.equal(p, original[k]) for k, p in untouched.named_parameters())
    finally:
        diffaccel.remove(untouched)


ADASPA, VMOBA = "test_adaspa.py", "test_vmoba.py"


def _covered(method: str, rows: dict[str, tuple[str, ...]], file: str) -> dict:
    """Rows of a stateful method whose options are tested over whole step schedules in its own test file."""
    return {(method, f): Option(None, "covered", f"see {file}", tests=tuple(f"{file}::{t}" for t in tests))
            for f, tests in rows.items()}


SOFTPAG = "test_softpag.py"
PARO, PARO_PLAN, PARO_PIPES = "test_paro_method.py", "test_paro_plan.py", "test_paro_pipelines.py"
OPTIONS: dict[tuple[str, str], Option] = {
    # --- gna (defaults on (5, 7): the image preset scaled to a (2, 2) window) --------------------------------------
    **locality_rows("gna", scenario=JOINT2D, base={"backend": "reference"}, override=("kernel_size", 3)),
    ("gna", "kernel_size"): Option(3, "output", "a 3x3 window instead of the preset's 2x2", base={"backend": "reference"}),
    ("gna", "stride"): Option(2, "output", "stride 2 on the preset window: blocked", base={"backend": "reference"}),
    ("gna", "dilation"): Option(2, "output", "dilated windows", base={"backend": "reference"}),
    ("gna", "is_causal"): Option(True, "output", "causal in both dimensions", base={"backend": "reference"}),
    ("gna", "preset"): Option("video", "raises", "the video preset is 3-D: refused on a 2-D grid",
                              base={"backend": "reference"}),
    # --- clear (radius 2 on (5, 7): sparse; the default 16 covers the grid) --------------------------------------
    **locality_rows("clear", scenario=JOINT2D, base={"backend": "reference", "radius": 2.0},
                    override=("radius", 3.0)),
    ("clear", "radius"): Option(2.0, "output", "radius 2 instead of 16 (which covers the whole 5x7 grid)",
                                base={"backend": "reference"}),
    ("clear", "video"): Option("ball", "output", "3-D ball instead of per-frame circles", JOINT3D,
                               {"backend": "reference", "radius": 2.0}),
    ("clear", "train_tokens"): Option(64, "output", "another training token count changes the proportional scale",
                                      base={"backend": "reference", "radius": 2.0, "proportional_attention": True}),
    ("clear", "proportional_attention"): Option(True, "output", "CLEAR's resolution-dependent softmax scale",
                                                base={"backend": "reference", "radius": 2.0}),
    ("clear", "weights"): Option("weights", "custom", "the distilled projections are installed on apply",
                                 check=check_clear_weights),
    ("clear", "weights_file"): Option("weights_file", "custom", "the named file is installed, not the radius's",
                                      check=check_clear_weights),
    # --- msw ((9, 11): windows 5x6, so shifts of 1 token move them) --------------------------------------------------
    **locality_rows("msw", scenario=WIDE2D, base={"backend": "reference"}, override=("window", 3)),
    ("msw", "window"): Option(3, "output", "3x3 windows instead of HiDiffusion's 2x2 grid of windows", WIDE2D,
                              {"backend": "reference"}),
    ("msw", "shift_policy"): Option("cyclic", "custom", "shift index = step mod 4", WIDE2D, {"backend": "reference"},
                                    check=check_cyclic_shifts),
    ("msw", "seed"): Option(1, "output", "other random shifts on some step", WIDE2D, {"backend": "reference"},
                            steps=tuple(range(8))),
    ("msw", "max_downsample"): Option(2, "custom", "windows the half-size UNet level too",
                                      base={"backend": "reference"}, check=check_two_levels),
    # --- tile ((3, 5, 7): one global frame by default) ---------------------------------------------------------------
    **locality_rows("tile", scenario=JOINT3D, base={"backend": "reference"}, override=("global_frames", 2)),
    ("tile", "global_frames"): Option(2, "output", "two global frames instead of round(3 / 4) = 1", JOINT3D,
                                      {"backend": "reference"}),
    ("tile", "placement"): Option("uniform", "output", "global frames (0, 4) instead of (0, 1) of 5 frames", LONG3D,
                                  {"backend": "reference", "global_frames": 2}),
    # --- agent: pooled (joint DiT calls) --------------------------------------------------------------------------
    ("agent", "mode"): Option("pooled", "output", "pooled agents instead of agentsd on a UNet-like call", IMAGE2D),
    ("agent", "stage2_power"): Option(0.5, "output", "another stage-2 logit scale", WIDE2D),
    ("agent", "shortcut"): Option(0.2, "output", "another weight of the +c*V term", WIDE2D),
    ("agent", "agent_grid"): Option((2, 3), "output", "6 agents instead of 7x7 = 49", WIDE2D),
    ("agent", "fp32_logits"): Option(True, "custom", "float32 logits on bfloat16 inputs are more accurate", WIDE2D,
                                     check=check_fp32_logits),
    # --- agent: agentsd (UNet-like call, no text; 10 steps, so step 0 is an agent step) ---------------------------
    ("agent", "agent_fraction"): Option(0.0, "output", "no agent steps: ToMe only from step 0", IMAGE2D,
                                        {"mode": "agentsd"}),
    ("agent", "ratio"): Option(0.2, "output", "fewer tokens merged for attention", IMAGE2D, {"mode": "agentsd"}),
    ("agent", "agent_ratio"): Option(0.8, "output", "more agents", IMAGE2D, {"mode": "agentsd"}),
    ("agent", "stride"): Option((2, 2), "output", "smaller ToMe cells during the agent steps", IMAGE2D,
                                {"mode": "agentsd"}),
    ("agent", "late_stride"): Option((3, 3), "output", "other ToMe cells after the agent steps", IMAGE2D,
                                     {"mode": "agentsd", "agent_fraction": 0.0}),
    ("agent", "late_tome"): Option(False, "dense", "exact attention after the agent steps", IMAGE2D,
                                   {"mode": "agentsd", "agent_fraction": 0.0}),
    ("agent", "max_downsample"): Option(2, "custom", "agent attention on the half-size UNet level too",
                                        base={"mode": "agentsd"}, check=check_two_levels),
    ("agent", "metric"): Option("queries", "output", "tokens matched by query similarity", IMAGE2D,
                                {"mode": "agentsd"}),
    ("agent", "use_rand"): Option(False, "output", "fixed destinations instead of random ones", IMAGE2D,
                                  {"mode": "agentsd"}),
    ("agent", "seed"): Option(1, "output", "other random destinations", IMAGE2D, {"mode": "agentsd"}),
    # --- paro: needs a calibrated plan (built in its own tests), so every row names the tests that turn it on -----
    ("paro", "plan"): Option(None, "covered", "the plan's orders and bucket masks are what runs", tests=(
        f"{PARO}::test_method_equals_the_explicit_reference_with_per_head_orders_and_bucket_masks",
        f"{PARO_PIPES}::test_generate_calibrates_on_the_fly_once_then_reuses_the_plan")),
    ("paro", "density"): Option(None, "covered", "calibration density; refused when it differs from the plan's",
                                tests=(f"{PARO_PIPES}::test_calibration_hits_the_density_within_one_block_per_row",
                                       f"{PARO_PLAN}::test_mismatched_plans_are_refused_with_what_differs")),
    ("paro", "block_size"): Option(None, "covered", "mask block of calibration; refused against another plan's",
                                   tests=(f"{PARO_PIPES}::test_calibrate_cli_writes_plan_summary_and_heatmap",
                                          f"{PARO_PLAN}::test_mismatched_plans_are_refused_with_what_differs")),
    ("paro", "alpha"): Option(None, "covered", "weights the order metrics", tests=(
        f"{PARO_PLAN}::test_order_choice_prefers_sparse_and_coherent_orders",
        f"{PARO}::test_calibration_options_reach_the_measurement")),
    ("paro", "num_buckets"): Option(None, "covered", "mask buckets of the plan", tests=(
        f"{PARO}::test_calibration_options_reach_the_measurement",
        f"{PARO_PLAN}::test_buckets_per_step_first_half_one_shared_second_half")),
    ("paro", "search_steps"): Option(None, "covered", "steps that choose the orders", tests=(
        f"{PARO}::test_calibration_options_reach_the_measurement",)),
    ("paro", "sample_blocks"): Option(None, "covered", "query blocks sampled for the order metrics", tests=(
        f"{PARO}::test_calibration_options_reach_the_measurement",)),
    ("paro", "qk_int8"): Option(None, "covered", "INT8 Q.K: bounded, unbiased", tests=(
        f"{PARO}::test_int8_paths_bounded_and_unbiased", f"{PARO}::test_fp16_at_the_range_edges_stays_finite")),
    ("paro", "pv_int8"): Option(None, "covered", "INT8 P.V: bounded, unbiased", tests=(
        f"{PARO}::test_int8_paths_bounded_and_unbiased", f"{PARO}::test_fp16_at_the_range_edges_stays_finite")),
    ("paro", "backend"): Option(None, "covered", "Triton kernel equals the reference", tests=(
        f"{PARO}::test_density_one_equals_dense", f"{PARO}::test_triton_kernel_runs_the_plan_like_the_reference")),
    # --- softpag: a guidance method, applied to pipelines (it needs perturbed batch rows) -------------------------
    ("softpag", "heads"): Option(None, "covered", "head selection of the perturbed branch", tests=(
        f"{SOFTPAG}::test_method_blends_selected_heads_of_perturbed_rows_only", f"{SOFTPAG}::test_heads_json_file")),
    ("softpag", "layers"): Option(None, "covered", "layer-level PAG against diffusers' PAG pipelines", tests=(
        f"{SOFTPAG}::test_full_strength_equals_diffusers_sd3_pag_pipeline",
        f"{SOFTPAG}::test_layer_names_match_whole_components")),
    ("softpag", "strength"): Option(None, "covered", "u=0 equals no guidance, u in (0, 1) blends", tests=(
        f"{SOFTPAG}::test_zero_strength_equals_no_guidance",
        f"{SOFTPAG}::test_method_blends_selected_heads_of_perturbed_rows_only")),
    ("softpag", "scale"): Option(None, "covered", "diffusers' pag_scale formula and pipeline", tests=(
        f"{SOFTPAG}::test_combination_equals_diffusers_pag_formula",
        f"{SOFTPAG}::test_full_strength_equals_diffusers_sd3_pag_pipeline")),
    ("softpag", "adaptive_scale"): Option(None, "covered", "diffusers' pag_adaptive_scale formula and pipeline",
                                          tests=(f"{SOFTPAG}::test_combination_equals_diffusers_pag_formula",
                                                 f"{SOFTPAG}::test_full_strength_equals_diffusers_sd3_pag_pipeline")),
    ("softpag", "identity"): Option(None, "covered", "'image' identity equals diffusers' masked attention", tests=(
        f"{SOFTPAG}::test_image_identity_equals_masked_attention",)),
    ("softpag", "method"): Option(None, "covered", "SoftPAG over another method", tests=(
        f"{SOFTPAG}::test_composes_with_another_method",)),
    ("softpag", "method_config"): Option(None, "covered", "the inner method's parameters", tests=(
        f"{SOFTPAG}::test_composes_with_another_method",)),
    # --- adaspa / vmoba: online methods, options checked over step schedules in their own files (issue 10) ------
    **_covered("adaspa", {
        "sparsity": ("test_option_sparsity_sets_the_kept_fraction", "test_sparsity_zero_equals_dense"),
        "block_size": ("test_option_block_size_changes_the_block_grid",),
        "search_at": ("test_option_search_at_schedule_follows_the_run_length",),
        "recall_threshold": ("test_option_head_adaptive_and_recall_threshold",),
        "head_adaptive": ("test_option_head_adaptive_and_recall_threshold",),
        "min_recall": ("test_option_min_recall_keeps_more_blocks_for_diffuse_heads",),
        "backend": ("test_option_backend_triton_equals_reference",),
    }, ADASPA),
    **_covered("vmoba", {
        "topk": ("test_option_changes_the_output", "test_keeping_everything_equals_dense"),
        "temporal_size": ("test_option_changes_the_output",),
        "spatial_size": ("test_option_changes_the_output",),
        "cube_size": ("test_option_changes_the_output",),
        "select": ("test_option_changes_the_output", "test_reference_equals_brute_force_per_query"),
        "threshold": ("test_option_changes_the_output",),
        "dense_fraction": ("test_dense_warmup_follows_the_run_length",),
        "path": ("test_option_path_and_block_size_and_kept_blocks", "test_fast_path_error_stays_below_the_documented_bound"),
        "block_select": ("test_option_block_select_union_is_a_superset_of_each_query",),
        "block_size": ("test_option_path_and_block_size_and_kept_blocks",),
        "min_mass": ("test_option_min_mass_adds_blocks", "test_keeping_everything_equals_dense"),
        "backend": ("test_fast_path_triton_kernels_equal_reference_backend",),
    }, VMOBA),
}


# ----------------------------------------------------------------------------------------------- running


def call(method: str, config: dict[str, Any], sc: Scenario, q, k, v, *, step: int = 0, layer: str = LAYER):
    m = get_method(method, **config)
    ctx = sc.ctx(step)
    ctx.layer = layer
    out = m(q, k, v, sc.layout(), ctx)
    assert out.shape == q.shape and torch.isfinite(out.float()).all()
    return out


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    err = (a.double() - b.double()).abs().max().item()
    assert err <= tol, f"max |diff| {err:.3g} > {tol:g}"


def assert_differs(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    err = (a.double() - b.double()).abs().max().item()
    assert err > DIFFERS, f"max |diff| {err:.3g} <= {DIFFERS:g}: the option changed nothing"


def config_fields(method: str) -> list[str]:
    return [f.name for f in dataclasses.fields(method_class(method).config_class)]


def test_every_option_has_a_row():
    missing = [f"no option test for {m}.{f}" for m in list_methods() for f in config_fields(m) if (m, f) not in OPTIONS]
    stale = [f"option row {m}.{f} names no config field" for m, f in OPTIONS
             if m not in list_methods() or f not in config_fields(m)]
    assert not missing + stale, "\n".join(missing + stale)


def test_the_table_uses_non_default_values():
    for (method, name), opt in OPTIONS.items():
        if opt.effect in ("covered", "custom"):
            continue
        f = next(f for f in dataclasses.fields(method_class(method).config_class) if f.name == name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        assert opt.value != default, f"{method}.{name}: the table's value is the default"


@pytest.mark.filterwarnings("ignore:clear. running training-free")
@pytest.mark.parametrize("key", sorted(OPTIONS), ids=lambda key: f"{key[0]}.{key[1]}")
def test_option_has_its_effect(key, tmp_path):
    method, name = key
    opt = OPTIONS[key]
    if opt.effect == "covered":
        for ref in opt.tests:
            file, test = ref.split("::")
            tree = ast.parse((TESTS / file).read_text())
            names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
            assert test in names, f"{method}.{name}: {ref} does not exist"
        return
    if opt.effect == "custom":
        assert opt.check is not None
        if "tmp_path" in opt.check.__code__.co_varnames[: opt.check.__code__.co_argcount]:
            opt.check(method, opt, tmp_path)
        else:
            opt.check(method, opt)
        return
    if opt.effect == "raises":
        sc = scenarios(opt.scenario)[0]
        with pytest.raises(ConfigError, match=name):
            call(method, {**opt.base, name: opt.value}, sc, *sc.inputs())
        return
    # the Triton backend runs interpreted on CPU tensors (TRITON_INTERPRET=1) and compiled on a CUDA machine
    device = "cuda" if opt.value == "triton" and torch.cuda.is_available() else "cpu"
    for sc in scenarios(opt.scenario):
        q, k, v = (t.to(device) for t in sc.inputs())
        dense = F.scaled_dot_product_attention(q, k, v)
        diffs = []
        for step in opt.steps:
            default = call(method, opt.base, sc, q, k, v, step=step)
            changed = call(method, {**opt.base, name: opt.value}, sc, q, k, v, step=step)
            if opt.effect == "output":
                diffs.append((changed.double() - default.double()).abs().max().item())
            elif opt.effect == "dense":
                assert_differs(default, dense)
                assert_close(changed, dense, SAME)
            elif opt.effect == "same":
                assert_differs(default, dense)  # a comparison between two dense runs would prove nothing
                assert_close(changed, default, SAME)
            else:
                raise AssertionError(f"unknown effect {opt.effect!r}")
        if opt.effect == "output":
            assert max(diffs) > DIFFERS, f"{method}.{name}={opt.value!r} changed nothing ({sc}): max |diff| {diffs}"
