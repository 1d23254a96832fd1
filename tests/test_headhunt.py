"""HeadHunter: the greedy rounds on a known objective, the search on a tiny SD3 against scores computed here,
the score cache, the JSON head list, the objectives and the CLI function."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

import diffaccel
from diffaccel.errors import ConfigError
from diffaccel.pipelines import hooks
from diffaccel.pipelines.guidance import enable_softpag
from diffaccel.pipelines.headhunt import (
    ClipScorer,
    HeadSearchResult,
    ScoreCache,
    candidate_heads,
    greedy_head_search,
    headhunt_command,
    hunt_heads,
    read_prompts,
    resolve_objective,
)
from diffaccel.pipelines.tiny import build_tiny, clip_tokenizer, tiny_spec

# ---------------------------------------------------------------------------------------------- greedy rounds


def test_greedy_rounds_follow_algorithm_1():
    """Additive head values plus a bonus for the pair {c, d}: round 1 takes the best single heads, round 2 the
    best addition to them; d is weak alone and only wins once c is selected (a one-shot ranking misses it)."""
    value = {"a": 5.0, "b": 4.0, "c": 3.0, "d": 0.5, "e": 1.0, "f": 0.8}
    heads = [(name, 0) for name in value]
    calls = []

    def evaluate(selected):
        calls.append(list(selected))
        names = {n for n, _ in selected}
        return sum(value[n] for n in names) + (10.0 if {"c", "d"} <= names else 0.0)

    selected, rounds = greedy_head_search(heads, evaluate, rounds=3, top_k=2)
    assert selected == [("a", 0), ("b", 0), ("c", 0), ("e", 0), ("d", 0), ("f", 0)]
    assert len(rounds) == 3 and len(rounds[0]) == 6 and len(rounds[1]) == 4 and len(rounds[2]) == 2
    assert rounds[1][("c", 0)] == 12.0 and rounds[2][("d", 0)] == 23.5
    assert calls[6] == [("a", 0), ("b", 0), ("c", 0)]  # candidates are scored added to the current set

    selected, _ = greedy_head_search(heads, evaluate, rounds=2, top_k=3)
    assert selected[:3] == [("a", 0), ("b", 0), ("c", 0)] and selected[3] == ("d", 0)  # d: 0.5 + bonus
    one_shot = sorted(value, key=lambda n: -value[n])[:4]
    assert "d" not in one_shot


def test_greedy_ties_keep_candidate_order_and_stop_when_empty():
    heads = [("x", h) for h in range(3)]
    selected, rounds = greedy_head_search(heads, lambda s: 1.0, rounds=5, top_k=2)
    assert selected == heads and len(rounds) == 2
    with pytest.raises(ConfigError, match="top_k"):
        greedy_head_search(heads, lambda s: 0.0, rounds=1, top_k=0)


# ---------------------------------------------------------------------------------------------- objectives


def test_image_statistics():
    gray = torch.full((1, 3, 8, 8), 0.25)
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1.0
    checker = ((torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2).float().expand(1, 3, 8, 8)
    _, brightness = resolve_objective("brightness")
    _, darkness = resolve_objective("-brightness")
    _, contrast = resolve_objective("contrast")
    _, saturation = resolve_objective("saturation")
    _, sharpness = resolve_objective("sharpness")
    images = torch.cat([gray, red, checker])
    torch.testing.assert_close(brightness(images, ["p"] * 3), torch.tensor([0.25, 0.299, 0.5]))
    torch.testing.assert_close(darkness(images, ["p"] * 3), -torch.tensor([0.25, 0.299, 0.5], dtype=torch.float64))
    torch.testing.assert_close(contrast(images, ["p"] * 3), torch.tensor([0.0, 0.0, 0.5 * (64 / 63) ** 0.5]))
    torch.testing.assert_close(saturation(images, ["p"] * 3), torch.tensor([0.0, 1.0, 0.0]))
    assert sharpness(images, ["p"] * 3)[2] > 1.0 and sharpness(images, ["p"] * 3)[0] == 0


def test_objective_by_import_path_and_errors(monkeypatch):
    module = types.ModuleType("my_objectives")
    module.redness = lambda images, prompts: images[:, 0].mean(dim=(1, 2))
    monkeypatch.setitem(sys.modules, "my_objectives", module)
    name, fn = resolve_objective("my_objectives:redness")
    assert name == "my_objectives:redness" and fn is module.redness
    with pytest.raises(ConfigError, match="unknown objective"):
        resolve_objective("beauty")
    with pytest.raises(ConfigError, match="cannot import"):
        resolve_objective("my_objectives:missing")


def test_clip_scorer_equals_clip_logits():
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    tokenizer = clip_tokenizer()
    scorer = ClipScorer(model, tokenizer, template="a photo of {prompt}")
    images = torch.rand(2, 3, 40, 48)
    prompts = ["a cat", "two dogs"]
    scores = scorer(images, prompts)
    pixels = scorer.preprocess(images)
    assert pixels.shape == (2, 3, 32, 32)
    text = tokenizer([f"a photo of {p}" for p in prompts], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=text.input_ids, attention_mask=text.attention_mask, pixel_values=pixels).logits_per_image
    expected = (100 * logits.diagonal() / model.logit_scale.exp()).clamp_min(0)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(scores).all()


def test_clip_without_weights_names_the_alternatives(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(diffaccel.ModelLoadError, match="image-statistics objective"):
        resolve_objective("clip:/nonexistent/clip-folder")


def test_read_prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# comment\na cat\n\n7\ta dog\na bird\n")
    assert read_prompts(path) == [("a cat", 0), ("a dog", 7), ("a bird", 2)]
    with pytest.raises(ConfigError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")


# ---------------------------------------------------------------------------------------------- the search


@pytest.fixture(scope="module")
def sd3():
    pipe = build_tiny("tiny-sd3")
    pipe.set_progress_bar_config(disable=True)
    return pipe


SEARCH = dict(num_inference_steps=2, strength=1.0, scale=20.0, guidance_scale=0.0)  # strong: heads differ clearly
CALL = dict(height=32, width=32, max_sequence_length=tiny_spec("tiny-sd3").extra["max_sequence_length"])
PAIRS = [("a red cube", 0), ("a blue sphere", 5)]


def mean_luma(images):
    return float((0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]).mean())


def brightness_with(pipe, heads):
    """The objective of a head set, computed here: one pipeline call per prompt with SoftPAG on those heads."""
    selection = {}
    for layer, head in heads:
        selection.setdefault(layer, []).append(head)
    enable_softpag(pipe, heads=selection, strength=SEARCH["strength"], scale=SEARCH["scale"])
    try:
        images = pipe([p for p, _ in PAIRS], generator=[torch.Generator().manual_seed(s) for _, s in PAIRS],
                      output_type="pt", num_inference_steps=SEARCH["num_inference_steps"], guidance_scale=0.0,
                      **CALL).images
    finally:
        diffaccel.remove(pipe)
    return sum(mean_luma(image[None]) for image in images) / len(images)


def test_search_on_tiny_sd3_picks_the_best_heads(sd3, tmp_path):
    candidates = candidate_heads(sd3)
    assert candidates == [(f"transformer_blocks.{b}.attn", h) for b in range(2) for h in range(2)]
    cache = tmp_path / "scores.json"
    result = hunt_heads(sd3, PAIRS, objective="brightness", rounds=2, top_k=1, call_kwargs=CALL, cache=cache,
                        model_key="tiny-sd3", progress=False, batch_size=2, **SEARCH)
    assert hooks.installed_processor(sd3.transformer) is None  # the pipeline is left as it was

    single = {h: brightness_with(sd3, [h]) for h in candidates}
    assert max(single.values()) - min(single.values()) > 1e-4  # heads differ: the search has something to find
    first = max(candidates, key=lambda h: single[h])
    pairs = {h: brightness_with(sd3, [first, h]) for h in candidates if h != first}
    second = max(pairs, key=lambda h: pairs[h])
    assert result.selected == [first, second]
    for h, score in result.rounds[0].items():
        assert score == pytest.approx(single[h], rel=1e-5, abs=1e-6)
    for h, score in result.rounds[1].items():
        assert score == pytest.approx(pairs[h], rel=1e-5, abs=1e-6)

    # cached: the same search runs no denoiser call
    calls = []
    handle = sd3.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        again = hunt_heads(sd3, PAIRS, objective="brightness", rounds=2, top_k=1, call_kwargs=CALL, cache=cache,
                           model_key="tiny-sd3", progress=False, **SEARCH)
    finally:
        handle.remove()
    assert calls == [] and again.selected == result.selected
    assert json.loads(cache.read_text())["format"] == "diffaccel.headhunt.cache/1"

    # the JSON head list is what softpag reads
    path = result.save(tmp_path / "heads.json")
    proc = diffaccel.pipelines.guidance.enable_softpag(sd3, heads=str(path))
    diffaccel.remove(sd3)
    assert proc.method.selection == {k: tuple(v) for k, v in result.heads().items()}


def test_search_keeps_an_applied_method(sd3):
    diffaccel.apply(sd3, "agent", mode="pooled", agent_grid=(2, 2))
    try:
        hunt_heads(sd3, PAIRS[:1], objective="contrast", rounds=1, top_k=1,
                   candidates=[("transformer_blocks.1.attn", 0)], call_kwargs=CALL, progress=False, **SEARCH)
        assert type(hooks.installed_processor(sd3.transformer).method).__name__ == "AgentMethod"
    finally:
        diffaccel.remove(sd3)


def test_result_json_round_trip(tmp_path):
    result = HeadSearchResult(selected=[("b.1.attn", 3), ("b.0.attn", 1), ("b.1.attn", 0)],
                              rounds=[{("b.1.attn", 3): 1.0}], settings={"objective": "x"})
    data = json.loads(result.save(tmp_path / "h.json").read_text())
    assert data["heads"] == {"b.1.attn": [0, 3], "b.0.attn": [1]}
    assert data["order"] == [["b.1.attn", 3], ["b.0.attn", 1], ["b.1.attn", 0]]
    assert ScoreCache.key(a=1, b=[1, 2]) == ScoreCache.key(b=[1, 2], a=1)


def test_headhunt_command(tmp_path):
    import typer
    from typer.testing import CliRunner

    app = typer.Typer()
    app.command("headhunt")(headhunt_command)
    app.command("noop")(lambda: None)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    out = tmp_path / "heads.json"
    args = ["headhunt", "--model", "tiny-sd3", "--prompts", str(prompts), "--objective", "saturation",
            "--rounds", "1", "--top-k", "1", "--steps", "2", "--height", "32", "--width", "32",
            "--layer", "transformer_blocks.0", "--out", str(out), "--no-progress", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert list(data["heads"]) == ["transformer_blocks.0.attn"] and len(data["order"]) == 1
    assert data["settings"]["model"] == "tiny-sd3" and (tmp_path / "heads.json.cache.json").exists()
