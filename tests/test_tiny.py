"""Tiny offline pipelines: they build without files or network, run, are deterministic, and diffaccel's dense
method reproduces their stock output exactly."""

from __future__ import annotations

import math

import pytest
import torch

import diffaccel
from diffaccel.errors import ModelLoadError, UnsupportedModelError
from diffaccel.methods.base import MethodBase, sdpa
from diffaccel.methods.dense import DenseConfig
from diffaccel.pipelines.hooks import attention_modules, denoisers_of
from diffaccel.pipelines.tiny import QK_GAIN, TINY_PIPELINES, build_tiny, tiny_spec

NAMES = list(TINY_PIPELINES)
PROMPT = "a small red house by a lake"


def run(pipe, name: str, seed: int = 0) -> torch.Tensor:
    out = pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(seed), output_type="pt", **tiny_spec(name).call_kwargs())
    return out.frames if hasattr(out, "frames") else out.images


def require_adapters(pipe) -> None:
    """Fail when the adapter of this pipeline's family is not registered (checks the registry, no guess)."""
    from diffaccel.pipelines.adapters.base import family_of, supported_processors

    supported = set(supported_processors())
    for model in denoisers_of(pipe):
        try:
            family_of(model)
        except UnsupportedModelError as exc:
            pytest.fail(f"adapter not registered: {exc}")
        missing = {type(m.processor).__name__ for m in attention_modules(model).values()} - supported
        if missing:
            pytest.fail(f"adapter not registered for processors {sorted(missing)}")


@pytest.fixture(scope="module")
def pipes():
    return {}


def get(pipes, name):
    if name not in pipes:
        pipe = build_tiny(name)
        pipe.set_progress_bar_config(disable=True)
        pipes[name] = pipe
    return pipes[name]


@pytest.mark.parametrize("name", NAMES)
def test_builds_and_runs(pipes, name):
    spec = tiny_spec(name)
    pipe = get(pipes, name)
    assert type(pipe).__name__ == spec.pipeline_class
    out = run(pipe, name)
    if spec.frames is None:
        assert out.shape == (1, 3, spec.height, spec.width)
    else:
        assert out.shape == (1, spec.frames, 3, spec.height, spec.width)
    assert torch.isfinite(out).all()
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    assert float(out.std()) > 0.01  # not a constant image


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_from_seeds(pipes, name):
    a = get(pipes, name)
    b = build_tiny(name, seed=0)
    b.set_progress_bar_config(disable=True)
    for comp in ("transformer", "unet", "vae", "text_encoder"):
        if getattr(a, comp, None) is None:
            continue
        sa, sb = getattr(a, comp).state_dict(), getattr(b, comp).state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), comp
    assert torch.equal(run(a, name, seed=3), run(b, name, seed=3))
    if tiny_spec(name).trained:  # shipped weights: every seed loads the same file
        return
    other = denoisers_of(build_tiny(name, seed=1))[0].state_dict()
    mine = denoisers_of(a)[0].state_dict()
    assert any(not torch.equal(mine[k], other[k]) for k in mine)  # another seed, other weights


@pytest.mark.parametrize("name", NAMES)
def test_dense_method_equals_stock_exactly(pipes, name):
    pipe = get(pipes, name)
    require_adapters(pipe)
    stock = run(pipe, name)
    diffaccel.apply(pipe, "dense")
    try:
        dense = run(pipe, name)
    finally:
        diffaccel.remove(pipe)
    assert torch.equal(dense, stock)
    assert torch.equal(run(pipe, name), stock)  # remove() restored the stock processors


class _EntropyProbe(MethodBase):
    """Dense attention that records the normalised entropy of each self-attention row distribution."""

    name = "_entropy_probe"
    config_class = DenseConfig

    def __init__(self):
        super().__init__()
        self.entropies: list[float] = []

    def attend(self, q, k, v, layout, ctx, *, attn_mask=None, scale=None):
        s = (q.float() @ k.float().transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
        p = s.softmax(-1)
        h = -(p * p.clamp_min(1e-30).log()).sum(-1).mean()
        self.entropies.append(float(h) / math.log(k.shape[-2]))
        return sdpa(q, k, v, attn_mask=attn_mask, scale=scale)


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-flux"])
def test_attention_is_selective(pipes, name):
    """QK_GAIN makes random attention peaked like trained models' (uniform attention has entropy 1)."""
    assert QK_GAIN > 1
    pipe = get(pipes, name)
    require_adapters(pipe)
    probe = _EntropyProbe()
    diffaccel.apply(pipe, probe)
    try:
        run(pipe, name)
    finally:
        diffaccel.remove(pipe)
    assert probe.entropies
    assert sum(probe.entropies) / len(probe.entropies) < 0.9


@pytest.mark.parametrize("name", NAMES)
def test_tokenizers_follow_the_pipeline_contract(pipes, name):
    """Padding to model_max_length, truncation, any unicode prompt, ids inside the text encoders' vocabularies."""
    pipe = get(pipes, name)
    pairs = [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"), ("tokenizer_3", "text_encoder_3")]
    checked = 0
    for tok_name, enc_name in pairs:
        tok, enc = getattr(pipe, tok_name, None), getattr(pipe, enc_name, None)
        if tok is None or enc is None:
            continue
        n = tok.model_max_length
        long_prompt = "température ✓ 猫 " * 50
        ids = tok(long_prompt, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
        assert ids.shape == (1, n)
        assert int(ids.max()) < enc.config.vocab_size
        short = tok("a cat", padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
        if type(tok).__name__ in ("CLIPTokenizer", "T5Tokenizer"):  # (Llama adds no EOS)
            assert enc.config.eos_token_id in short[0].tolist()  # CLIP pools at the first EOS; T5 ends with </s>
        assert tok.decode(short[0], skip_special_tokens=True).replace(" ", "") == "acat"
        checked += 1
    assert checked >= 1


def test_unknown_tiny_name():
    with pytest.raises(ModelLoadError, match="tiny-flux"):
        build_tiny("tiny-nope")
