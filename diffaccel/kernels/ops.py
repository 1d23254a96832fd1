"""The Triton statistics kernels as ``torch.library`` custom ops, so dynamo keeps them opaque under compile.

Dynamo cannot trace a Triton launch in the interpreter or the host-side argument handling of a launch; a custom op
with a fake implementation (output shapes and dtypes only) lets ``torch.compile(fullgraph=True)`` and
``torch.export`` put the kernel in the graph as one node. :mod:`diffaccel.kernels.stats` routes its Triton path
through these ops (defined beside the kernels there, re-exported here) while dynamo traces (``torch.compiler.is_compiling()``); eagerly it calls the kernels directly
(no dispatcher overhead). The PyTorch references stay traceable and are traced as they are.

Block-sparse attention with a method's block mask runs inside the method, which the processor wraps in the
``diffaccel::attend`` op (diffaccel/pipelines/compile_ops.py): a block mask is a plan object, not a graph value.
"""

from __future__ import annotations

from diffaccel.kernels.stats import attention_with_lse_op, block_attention_mass_op

__all__ = ["attention_with_lse_op", "block_attention_mass_op"]
