"""The sparse layer: attention plans built from kernel mask specs, model- and method-agnostic.

Between the kernels (:mod:`diffaccel.kernels`) and the functional API / methods: plans (token order + block mask
+ text placement, cached; :mod:`.plans`), token permutations (:mod:`.permutations`), LSE merging (:mod:`.merge`),
CLEAR's per-frame plan (:mod:`.per_frame`), the analytic GNA bounds (:mod:`.analysis`), text placement
(:mod:`.text`) and the argument checkers shared by the layers above (:mod:`.checks`). It imports only kernels,
layout, context, errors and warn.
"""

from diffaccel.sparse.merge import merge_by_lse
from diffaccel.sparse.plans import AttentionPlan, classify_in_order, dense_block_mask, plan_for
from diffaccel.sparse.run import run_plan, run_spec
from diffaccel.sparse.text import layout_text_spec, text_spec_for

__all__ = [
    "AttentionPlan",
    "classify_in_order",
    "dense_block_mask",
    "layout_text_spec",
    "merge_by_lse",
    "plan_for",
    "run_plan",
    "run_spec",
    "text_spec_for",
]
