"""Issue 14: the metrics of ``diffaccel eval`` against hand-computed values on synthetic data (no model, no
download): PSNR of a known noise level, SSIM against torchmetrics, cosine and relative L1, the confidence
interval, the Pareto front, the VBench-style video dimensions, FID/KID through clean-fid with an injected extractor
(identical sets ~0, shifted Gaussians against the closed form), LPIPS and CLIP/DINO code paths with tiny local
weights, and the skip reasons when weights are missing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffaccel.errors import ConfigError
from diffaccel.eval import metrics as M
from diffaccel.eval import video_metrics as V
from diffaccel.eval.report import pareto_front
from diffaccel.eval.stats import aggregate

needs_cleanfid = pytest.mark.skipif(not M.importable("cleanfid.fid"),
                                    reason="clean-fid (and torchvision) not importable in this venv")
needs_torchvision = pytest.mark.skipif(not M.importable("torchvision"), reason="torchvision not importable here")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ----------------------------------------------------------------------------------------------- fidelity


def test_psnr_of_a_known_noise_level_and_identity():
    g = torch.Generator().manual_seed(0)
    x = 0.2 + 0.6 * torch.rand(3, 32, 32, generator=g)
    sigma = 0.05
    signs = torch.randint(0, 2, x.shape, generator=g) * 2 - 1
    y = x + sigma * signs  # |noise| = sigma everywhere: MSE = sigma^2 exactly, no clipping
    p, s, impl = M.psnr_ssim(y, x)
    assert p == pytest.approx(10 * math.log10(1 / sigma**2), abs=1e-3)  # 26.02 dB
    assert 0 < s < 1
    p0, s0, _ = M.psnr_ssim(x, x)
    assert p0 == math.inf and s0 == pytest.approx(1.0, abs=1e-6)


def test_ssim_of_a_known_blur_matches_an_independent_implementation():
    """torchmetrics' SSIM (what eval reports) equals diffaccel's own Gaussian-window SSIM with reflect borders."""
    from diffaccel.eval.fidelity import ssim as own_ssim

    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 40, 40, generator=g)
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :]) / 16
    blurred = torch.nn.functional.conv2d(torch.nn.functional.pad(x.reshape(-1, 1, 40, 40), (1, 1, 1, 1), mode="replicate"),
                                         k[None, None]).reshape(2, 3, 40, 40)
    _, s, impl = M.psnr_ssim(blurred, x)
    assert impl == "torchmetrics"
    assert s == pytest.approx(own_ssim(blurred, x, border="reflect"), abs=1e-4)
    assert 0.3 < s < 0.95  # a real blur of noise: clearly below 1


def test_cosine_and_relative_l1_by_hand():
    a = torch.tensor([1.0, 0.0, 0.0, 0.0])
    b = torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert M.cosine(a, b) == pytest.approx(1 / math.sqrt(2))
    assert M.cosine(None, b) is None
    assert M.relative_l1(b, a) == pytest.approx(1.0)  # |0,1,0,0| / |1,0,0,0|
    assert M.relative_l1(a, a) == 0.0
    with pytest.raises(ValueError):
        M.cosine(a, torch.ones(3))


def test_confidence_interval_of_a_mean_by_hand():
    agg = aggregate([1.0, 2.0, 3.0, math.inf, None])
    half = 4.302653 * 1.0 / math.sqrt(3)  # t_{0.975, 2} * sd / sqrt(n)
    assert (agg.mean, agg.n, agg.n_inf) == (2.0, 3, 1)
    assert agg.low == pytest.approx(2 - half, abs=1e-4) and agg.high == pytest.approx(2 + half, abs=1e-4)
    assert aggregate([5.0]).low == 5.0 and aggregate([]).mean is None
    with pytest.raises(ValueError, match="NaN"):
        aggregate([1.0, float("nan")])


def test_pareto_front():
    pts = [("a", 1.0, 30.0), ("b", 2.0, 25.0), ("c", 1.5, 20.0), ("d", 3.0, 10.0), ("e", 2.0, 24.0)]
    assert pareto_front(pts) == ["a", "b", "d"]  # c is beaten by b, e by b
    low = [("x", 1.0, 0.1), ("y", 2.0, 0.3), ("z", 2.0, 0.2)]
    assert pareto_front(low, higher_is_better=False) == ["x", "z"]


# ----------------------------------------------------------------------------------------------- video


def test_video_dimensions_by_hand():
    static = torch.full((5, 3, 8, 8), 0.5)
    assert V.temporal_flickering(static) == 1.0 and V.motion_smoothness_proxy(static) == 1.0
    blink = torch.zeros(4, 3, 8, 8)
    blink[1::2] = 1.0
    assert V.temporal_flickering(blink) == 0.0  # every pixel jumps 255 each frame
    assert V.motion_smoothness_proxy(blink) == 0.0  # neighbours average 0, the frame is 255
    ramp = (torch.arange(5.0) * 60 / 255)[:, None, None, None].expand(5, 3, 4, 4)  # 0, 60, ..., 240
    assert V.temporal_flickering(ramp) == pytest.approx((255 - 60) / 255, abs=1e-6)
    assert V.motion_smoothness_proxy(ramp) == pytest.approx(1.0, abs=1e-6)  # linear motion is predicted exactly
    assert V.temporal_flickering(static[:1]) is None and V.motion_smoothness_proxy(static[:2]) is None
    f = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # t=1: (1 + 1)/2 = 1; t=2: (cos(f2, f0) + cos(f2, f1))/2 = 0 -> mean 0.5
    assert V.consistency(f) == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------- FID / KID


def _constant_images(folder, colours):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, c in enumerate(colours):
        Image.new("RGB", (32, 32), tuple(int(v) for v in c)).save(folder / f"{i:03d}.png")


def channel_means(batch: torch.Tensor) -> torch.Tensor:
    """An injected feature extractor (clean-fid's custom_feat_extractor contract): per-channel means / 255."""
    return batch.float().mean(dim=(2, 3)) / 255.0


@needs_cleanfid
def test_fid_of_identical_sets_is_zero_and_shifted_gaussians_match_the_closed_form(tmp_path):
    from diffaccel.eval.distribution import distance, folder_features

    rng = np.random.default_rng(0)
    n, shift, sd = 120, 40.0, 12.0
    a = np.clip(np.round(rng.normal(100, sd, (n, 3))), 0, 255)
    b = np.clip(np.round(rng.normal(100 + shift, sd, (n, 3))), 0, 255)
    _constant_images(tmp_path / "a", a)
    _constant_images(tmp_path / "b", b)
    fa = folder_features(tmp_path / "a", channel_means, torch.device("cpu"))
    fb = folder_features(tmp_path / "b", channel_means, torch.device("cpu"))
    np.testing.assert_allclose(fa, a / 255.0, atol=2e-3)  # the clean resize keeps a constant image constant
    same = distance(fa, fa.copy())
    assert abs(same.fid) < 1e-6 and abs(same.kid) < 1e-2 and same.n1 == n
    d = distance(fa, fb)
    # closed form for N(m1, s^2 I) and N(m2, s^2 I): |m1 - m2|^2 (the covariance term vanishes)
    population = 3 * (shift / 255) ** 2
    assert d.fid == pytest.approx(population, rel=0.2)
    # and exactly the Frechet distance of the sample statistics (the matrix square root by eigen-decomposition)
    m1, m2 = fa.mean(0), fb.mean(0)
    s1, s2 = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    w, v = np.linalg.eigh(s1)
    r1 = v @ np.diag(np.sqrt(w)) @ v.T
    w2 = np.linalg.eigvalsh(r1 @ s2 @ r1)
    closed = float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(w2, 0, None)).sum())
    assert d.fid == pytest.approx(closed, rel=1e-4)
    assert d.kid > 10 * abs(same.kid) and d.to_dict()["fid_reliable"] is False


def test_fid_is_skipped_without_weights_when_downloads_are_off(monkeypatch, tmp_path):
    from diffaccel.eval import distribution

    monkeypatch.setattr(distribution, "CLEANFID_CACHE", tmp_path)  # no cached Inception file
    got = distribution.build_extractor(None, torch.device("cpu"))
    assert isinstance(got, M.Skipped) and got.metric == "FID/KID"
    assert "downloads off" in got.reason or "not installed" in got.reason or "does not import" in got.reason
    if M.importable("cleanfid.fid"):
        with pytest.raises(ConfigError, match="inception-2015-12-05.pt"):
            distribution.build_extractor(tmp_path / "wrong.pt", torch.device("cpu"))


# ----------------------------------------------------------------------------------------------- LPIPS, CLIP, DINO


def test_lpips_and_clip_are_skipped_with_a_reason_without_weights(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    lp = M.build_lpips(None)
    assert isinstance(lp, M.Skipped) and lp.metric == "LPIPS" and lp.reason
    clip = M.build_clip_score(None)
    assert isinstance(clip, M.Skipped) and "downloads off" in clip.reason
    dino = V.build_features("dino", None)
    assert isinstance(dino, M.Skipped) and "--dino-model" in dino.reason
    with pytest.raises(ConfigError, match="--clip-model"):
        M.build_clip_score(str(tmp_path / "missing"))


@needs_torchvision
def test_lpips_runs_from_a_local_alexnet_file(tmp_path):
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    features = torchvision.models.alexnet(weights=None).features.state_dict()
    path = tmp_path / "alexnet.safetensors"
    save_file({f"features.{k}": v.contiguous() for k, v in features.items()}, str(path))
    lpips = M.build_lpips(path)
    assert callable(lpips)
    x = torch.rand(3, 64, 64)
    y = (x + 0.2 * torch.randn(3, 64, 64)).clamp(0, 1)
    assert lpips(x, x) == pytest.approx(0.0, abs=1e-6)
    assert lpips(y, x) > 0
    bad = tmp_path / "bad.safetensors"
    save_file({"features.0.weight": torch.zeros(1)}, str(bad))
    with pytest.raises(ConfigError, match="lacks AlexNet"):
        M.build_lpips(bad)


def _tiny_clip(folder):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from diffaccel.pipelines.tiny import clip_tokenizer

    torch.manual_seed(0)
    tok = clip_tokenizer(77)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    model = CLIPModel(cfg)
    model.save_pretrained(folder)
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                         tokenizer=tok)
    proc.save_pretrained(folder)
    return model, proc


def test_clip_score_and_background_consistency_from_a_local_folder(tmp_path):
    model, proc = _tiny_clip(tmp_path / "clip")
    score = M.build_clip_score(str(tmp_path / "clip"))
    assert callable(score), score
    image = torch.rand(3, 48, 48, generator=torch.Generator().manual_seed(2))
    got = score(image, "a red fox")
    # by hand: 100 * max(cos(image embedding, text embedding), 0), the cosine read off CLIP's logits
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    inputs = proc(text=["a red fox"], images=[pixels.permute(1, 2, 0).numpy()], return_tensors="pt", padding=True)
    with torch.no_grad():  # CLIP's logits are logit_scale * cos(image, text)
        out = model(**inputs)
        expected = 100 * max(float(out.logits_per_image[0, 0] / model.logit_scale.exp()), 0.0)
    assert got == pytest.approx(expected, abs=1e-3)
    features = V.build_features("clip", str(tmp_path / "clip"))
    assert callable(features), features
    static = image[None].expand(4, -1, -1, -1)
    assert V.consistency(features(static)) == pytest.approx(1.0, abs=1e-6)
    moving = torch.rand(4, 3, 48, 48, generator=torch.Generator().manual_seed(3))
    assert V.consistency(features(moving)) < 1.0


def test_subject_consistency_from_a_local_dino_folder(tmp_path):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)).save_pretrained(tmp_path / "dino")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "dino")
    features = V.build_features("dino", str(tmp_path / "dino"))
    assert callable(features), features
    video = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(4))
    f = features(video)
    assert f.shape == (3, 32)
    assert V.consistency(features(video[:1].expand(3, -1, -1, -1))) == pytest.approx(1.0, abs=1e-6)
    assert V.consistency(f) < 1.0


# ----------------------------------------------------------------------------------------------- order, aggregates


def test_side_order_puts_dense_first_and_rotates_the_methods():
    from diffaccel.eval.runner import samples_of, side_order

    labels = ["dense", "a", "b", "c"]
    orders = [side_order(labels, i) for i in range(4)]
    assert orders[:3] == [["dense", "a", "b", "c"], ["dense", "b", "c", "a"], ["dense", "c", "a", "b"]]
    assert orders[3] == orders[0]
    assert [o.index(m) for o in orders[:3] for m in ["a"]] == [1, 3, 2]  # each position in turn
    s = samples_of(["p", "q"], [0, 7])
    assert [(x.index, x.prompt, x.seed, x.id) for x in s] == [
        (0, "p", 0, "0000_seed0"), (1, "p", 7, "0001_seed7"), (2, "q", 0, "0002_seed0"), (3, "q", 7, "0003_seed7")]


def _record(sample, label, total, psnr=None):
    return {"sample": sample, "label": label, "method": label, "params": {}, "total_s": total, "denoise_s": total / 2,
            "attention_s": total / 4, "density": 1.0 if label == "dense" else 0.5, "note": None,
            "metrics": {} if psnr is None else {"psnr": psnr}}


def test_aggregates_pair_samples_and_average_the_ratios():
    from diffaccel.eval.report import aggregates, comparable

    records = [_record("s0", "dense", 2.0), _record("s0", "m", 1.0, 30.0),
               _record("s1", "dense", 3.0), _record("s1", "m", 3.0, math.inf),
               _record("s2", "m", 0.5, 10.0)]  # s2 has no dense: not paired, left out
    aggr = aggregates(records, ["dense", "m"])
    m = aggr["m"]
    assert m["n"] == 2 and m["speedup_total"]["mean"] == pytest.approx((2.0 + 1.0) / 2)  # mean of 2x and 1x
    assert m["speedup_denoise"]["mean"] == pytest.approx(1.5) and m["total_s"]["mean"] == pytest.approx(2.0)
    assert m["metrics"]["psnr"]["mean"] == 30.0 and m["metrics"]["psnr"]["n_inf"] == 1
    assert m["density"]["mean"] == 0.5 and aggr["dense"]["n"] == 2
    result = {"samples": records, "aggregates": aggr, "distribution": {}, "skipped": [],
              "options": {"out": "x", "command": ["a"], "num": 2}}
    slower = {**result, "samples": [{**r, "total_s": 9.0} for r in records],
              "options": {"out": "y", "command": ["b"], "num": 2}}
    assert comparable(result)["samples"] == comparable(slower)["samples"]
    assert comparable(result)["options"] == comparable(slower)["options"]
    changed = {**result, "samples": [{**records[0], "metrics": {"psnr": 31.0}}, *records[1:]]}
    assert comparable(result) != comparable(changed)
