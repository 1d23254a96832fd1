"""VMoBA fast path vs per-query reference on tiny pipelines: attention-output error per call, and final output."""
import torch, diffaccel
from diffaccel.methods.vmoba import VMoBAMethod, vmoba_reference
from diffaccel.pipelines.tiny import build_tiny, tiny_spec

for name in ("tiny-wan", "tiny-flux", "tiny-cogvideox"):
    pipe = build_tiny(name); pipe.set_progress_bar_config(disable=True)
    kw = tiny_spec(name).call_kwargs()
    for bsel in ("mean", "union"):
        errs, dens = [], []
        class Probe(VMoBAMethod):
            def _sparse(self, q, k, v, layout, part, layer, scale):
                out = super()._sparse(q, k, v, layout, part, layer, scale)
                ref = vmoba_reference(q, k, v, layout, part, select=self.config.select, threshold=self.config.threshold, scale=scale)
                errs.append(((out.float() - ref.float()).norm() / ref.float().norm()).item())
                dens.append(self._kept[layer].float().mean().item())
                return out
        m = Probe(block_size=16, backend="reference", block_select=bsel)
        outs = {}
        for label, meth in (("fast", m), ("ref", VMoBAMethod(path="reference"))):
            diffaccel.apply(pipe, meth)
            o = pipe("a red house", generator=torch.Generator().manual_seed(0), output_type="pt", **kw)
            diffaccel.remove(pipe)
            outs[label] = (o.frames if hasattr(o, "frames") else o.images).float()
        fin = ((outs["fast"] - outs["ref"]).norm() / outs["ref"].norm()).item()
        print(f"{name} block_select={bsel}: per-call rel L2 err vs per-query reference max {max(errs):.3f} mean {sum(errs)/len(errs):.3f} (block density mean {sum(dens)/len(dens):.2f}, {len(errs)} calls); final output rel err {fin:.4f}")
