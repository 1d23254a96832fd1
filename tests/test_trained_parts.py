"""Parts of the trained tiny pipelines that need no trained weights: data, packers, tokenizer, weights file
validation, and a training smoke test (a few dozen steps lower the loss) so the training code cannot rot."""

from __future__ import annotations

import json

import pytest
import torch

from diffaccel.errors import ConfigError, ModelLoadError
from diffaccel.pipelines.trained import components as C
from diffaccel.pipelines.trained import data as D
from diffaccel.pipelines.trained.quality import classify_shape, neighbourhood_share, read_sample, uniform_share
from diffaccel.pipelines.trained.train import TrainConfig, Trainer, shift_times
from diffaccel.pipelines.trained.weights_io import load_pipeline_weights, read_header, save_pipeline_weights


def test_data_is_seeded_and_captions_name_what_is_drawn():
    a, ca = D.image_batch(6, torch.Generator().manual_seed(3))
    b, cb = D.image_batch(6, torch.Generator().manual_seed(3))
    c, _ = D.image_batch(6, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and ca == cb and not torch.equal(a, c)
    assert a.shape == (6, 3, 32, 32) and a.min() >= -1 and a.max() <= 1
    vocab = set(D.vocabulary())
    assert all(set(cap.split()) <= vocab for cap in ca)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        scene = D.random_scene(g, D.ImageDataConfig(count_weights=(1.0, 0.0, 0.0), two_tone=0.0))
        r = read_sample((D.render_scene(scene) + 1) / 2)
        assert (r.background, r.colour, r.shape) == (scene.background, scene.shapes[0].colour, scene.shapes[0].shape)
        assert scene.caption() == f"a {r.colour} {r.shape} on a {r.background} background"


def test_two_tone_and_several_shapes_captions():
    s = D.SceneSpec((D.ShapeSpec("circle", "red", 8, 8, 4), D.ShapeSpec("square", "blue", 20, 20, 4),
                     D.ShapeSpec("triangle", "green", 8, 24, 4)), "white", "black")
    assert s.caption() == "a red circle a blue square and a green triangle on a white and black background"
    img = D.render_scene(s)
    assert torch.allclose(img[:, 0, 31], D.palette_tensor()[D.COLOURS.index("white")])
    assert torch.allclose(img[:, 31, 31], D.palette_tensor()[D.COLOURS.index("black")])


def test_video_moves_the_way_the_caption_says():
    cfg = D.VideoDataConfig()
    for motion, axis, sign in (("left", 0, -1), ("right", 0, 1), ("up", 1, -1), ("down", 1, 1)):
        clip = D.ClipSpec("square", "red", motion, "blue", 16.0, 16.0, 5.0)
        track = D.clip_track(clip, cfg)
        assert sign * (track[-1][axis] - track[0][axis]) > 8
        assert clip.caption() == f"a red square moving {motion} on a blue background"
    grow = D.clip_track(D.ClipSpec("circle", "red", "growing", "blue", 16, 16, 6), cfg)
    assert grow[-1][2] > grow[0][2] * 2
    v, caps = D.video_batch(2, torch.Generator().manual_seed(0))
    assert v.shape == (2, 3, 9, 32, 32) and len(caps) == 2


def test_shape_templates_classify_clean_shapes():
    for shape in D.SHAPES:
        for half in (5.0, 9.0):
            m = (D.shape_mask(shape, 15.0, 17.0, half, 32) > 0.5).float()
            assert classify_shape(m)[0] == shape


def test_packers_are_lossless_on_random_input():
    x = torch.rand(2, 3, 9, 32, 32) * 2 - 1
    packer = C.CausalPixelPacker()
    z = packer.encode(x).latent_dist.sample()
    assert z.shape == (2, 24, 5, 16, 16)
    assert torch.equal(packer.decode(z).sample, x)
    # frame 0 alone in the first group; later latent frames hold 2 frames each (causal, like Wan's VAE)
    y = x.clone()
    y[:, :, 5] += 0.5
    changed = (packer.pack(y) != packer.pack(x)).any(dim=(0, 1, 3, 4))
    assert changed.tolist() == [False, False, False, True, False]  # frames 5-6 are latent frame 3
    with pytest.raises(ValueError, match="2k\\+1"):
        packer.pack(x[:, :, :8])
    img = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(C.PixelAutoencoder().decode(img).sample, img)


def test_word_tokenizer_has_one_token_per_caption_word_and_falls_back():
    tok = C.word_t5_tokenizer(24)
    assert tok.tokenize("a red circle on a blue background") == [
        "\u2581a", "\u2581red", "\u2581circle", "\u2581on", "\u2581a", "\u2581blue", "\u2581background"]
    assert "<unk>" not in tok.tokenize("a fox")  # any printable prompt tokenizes (characters)
    assert max(tok("a red fox zz").input_ids) < C.T5_VOCAB


def test_locality_measure_against_hand_computed_values():
    grid = (4, 4)
    probs = torch.zeros(1, 1, 16, 18)
    probs[..., 2:] = torch.eye(16)  # every query attends to itself only
    assert float(neighbourhood_share(probs, grid, (1, 1))[0]) == pytest.approx(1.0)
    probs = torch.zeros(1, 1, 16, 18)
    probs[..., 0] = 1.0  # all on a text key
    assert float(neighbourhood_share(probs, grid, (1, 1))[0]) == 0.0
    # uniform over 16 image + 2 text keys with a 3x3 window: mean window size on a 4x4 grid is 6.25 keys
    assert uniform_share(grid, (1, 1), 2) == pytest.approx(6.25 / 18)


def _tiny_cfg(model: str, **kw) -> TrainConfig:
    small = dict(num_layers=1, num_single_layers=1, num_attention_heads=2) if model == "tiny-flux-trained" else dict(
        num_layers=1, num_attention_heads=2, ffn_dim=64)
    return TrainConfig(model=model, minutes=0, max_steps=kw.pop("steps", 30), batch=8, lr=2e-3, warmup_steps=5,
                       transformer_config=small, **kw)


@pytest.mark.parametrize("model", ["tiny-flux-trained", "tiny-wan-trained"])
def test_a_few_dozen_training_steps_lower_the_loss(model):
    torch.manual_seed(0)
    tr = Trainer(_tiny_cfg(model))
    before = tr.eval_loss(n=8)
    for i in range(30):
        tr.train_step(i / 30)
    after = tr.eval_loss(n=8)
    assert after < 0.7 * before, (before, after)


def test_weights_round_trip_and_header_is_validated(tmp_path):
    torch.manual_seed(0)
    tr = Trainer(_tiny_cfg("tiny-flux-trained"))
    path = tmp_path / "tiny-flux-trained.safetensors"
    tr.save(path, {"device": "cpu", "steps": 0})
    head = read_header(path)
    assert head["model"] == "tiny-flux-trained" and head["training"]["steps"] == 0
    assert json.loads(path.with_suffix(".json").read_text()) == head
    other = C.flux_pipeline(head["transformer_config"])
    load_pipeline_weights(other, path, "tiny-flux-trained")
    for (k, a), b in zip(tr.ema.state_dict().items(), other.transformer.state_dict().values()):
        assert torch.equal(a.half().float(), b), k  # fp16 on disk, float32 loaded
    with pytest.raises(ModelLoadError, match="holds model"):
        load_pipeline_weights(other, path, "tiny-wan-trained")
    with pytest.raises(ModelLoadError, match="shape"):
        load_pipeline_weights(C.flux_pipeline(dict(head["transformer_config"], num_attention_heads=3)), path,
                              "tiny-flux-trained")
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"x": torch.zeros(1)}, str(bad), metadata={"diffaccel_trained": "{not json"})
    with pytest.raises(ModelLoadError, match="no valid"):
        read_header(bad)
    save_file({"x": torch.zeros(1)}, str(bad), metadata={"diffaccel_trained": json.dumps({"format": "x/0"})})
    with pytest.raises(ModelLoadError, match="format"):
        read_header(bad)
    with pytest.raises(ModelLoadError, match="not found"):
        read_header(tmp_path / "missing.safetensors")


def test_train_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="model='tiny-sd'"):
        TrainConfig(model="tiny-sd")
    with pytest.raises(ConfigError, match="batch=0"):
        TrainConfig(batch=0)
    with pytest.raises(ConfigError, match="minutes=0"):
        TrainConfig(minutes=0, max_steps=0)
    with pytest.raises(ConfigError, match="time_shift=0"):
        TrainConfig(time_shift=0)
    with pytest.raises(ConfigError, match="single_shape=1.5"):
        TrainConfig(single_shape=1.5)
    with pytest.raises(ConfigError, match="two_tone=-0.1"):
        TrainConfig(two_tone=-0.1)
    with pytest.raises(ConfigError, match=r"half_range=\(9.0, 5.0\): need 1 <= low <= high <= 16"):
        TrainConfig(half_range=(9.0, 5.0))
    with pytest.raises(ConfigError, match="half_range=\\(0.5, 3.0\\)"):
        TrainConfig(half_range=(0.5, 3.0))
    with pytest.raises(ConfigError, match="jitter=-1.0: must be in"):
        TrainConfig(jitter=-1.0)
    for option in (dict(single_shape=0.9), dict(two_tone=0.0), dict(half_range=(7.0, 12.0))):
        name = next(iter(option))
        with pytest.raises(ConfigError, match=f"{name}=.*image-data option; tiny-wan-trained"):
            TrainConfig(model="tiny-wan-trained", **option)  # never silently ignored
    TrainConfig(model="tiny-wan-trained", jitter=3.0, half_range=[6.0, 11.0])  # the defaults and jitter pass


def test_time_shift_is_the_schedulers_shift():
    """Training times shifted like FlowMatchEulerDiscreteScheduler shifts its sigmas (FluxPipeline at 256 image
    tokens: mu = 0.5, exponential shift exp(mu) = 1.65), so training and sampling see the same noise levels."""
    import math

    from diffusers import FlowMatchEulerDiscreteScheduler

    t = torch.rand(64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(shift_times(t, 1.0), t)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    assert torch.allclose(shift_times(t, math.exp(0.5)), sched.time_shift(0.5, 1.0, t), atol=1e-6)
    s = shift_times(t, 1.65)
    assert (s > t).all() and (s < 1).all()  # more noise, same range
    assert shift_times(torch.tensor([0.0, 1.0]), 3.0).tolist() == [0.0, 1.0]


def test_loss_draws_shifted_times():
    """The trainer's loss uses the configured shift: with the same noise stream, the noised input equals the
    one built from the shifted time (checked through the model input)."""
    torch.manual_seed(0)
    tr = Trainer(_tiny_cfg("tiny-flux-trained", time_shift=3.0))
    x0, caps = tr.batch(4, torch.Generator().manual_seed(0), 0.0)
    seen = {}
    tr.predict = lambda model, xt, t, c: seen.update(xt=xt, t=t) or torch.zeros_like(xt)
    tr.loss(tr.model, x0, caps, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    t = shift_times(torch.sigmoid(torch.randn(4, generator=g)), 3.0)
    e = torch.randn(x0.shape, generator=g)
    assert torch.allclose(seen["t"], t)
    assert torch.allclose(seen["xt"], (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * e)


def test_image_data_mix_follows_the_config():
    g = torch.Generator().manual_seed(0)
    one = TrainConfig(single_shape=1.0, two_tone=0.0).image_data()
    scenes = [D.random_scene(g, one) for _ in range(40)]
    assert all(len(s.shapes) == 1 and s.background_2 is None for s in scenes)
    many = TrainConfig(single_shape=0.0, two_tone=1.0).image_data()
    scenes = [D.random_scene(g, many) for _ in range(60)]
    counts = [len(s.shapes) for s in scenes]
    assert all(s.background_2 is not None for s in scenes) and 1 not in counts
    assert counts.count(2) > counts.count(3) > 0  # two shapes twice as often as three
    tr = Trainer(_tiny_cfg("tiny-flux-trained", single_shape=1.0, two_tone=0.0))
    _, caps = tr.batch(16, torch.Generator().manual_seed(1), 0.0)
    assert all(" and " not in c for c in caps)  # the trainer draws from its config


def test_train_tiny_command_passes_every_option_to_the_config(monkeypatch, tmp_path):
    from diffaccel.pipelines.trained import train as T

    seen = {}

    def fake_train(cfg, out):
        seen["cfg"] = cfg
        return {"steps": 0, "seconds": 0.0, "final_loss": 0.0, "eval_loss_initial": 0.0, "eval_loss_final": 0.0}

    monkeypatch.setattr(T, "train", fake_train)
    T.train_tiny_command(model="tiny-flux-trained", minutes=3, out=tmp_path, steps=7, lr=1e-3, seed=4,
                         time_shift=1.65, single_shape=0.9, two_tone=0.05, train_text=False, half_range=(7.0, 12.0),
                         jitter=4.0)
    cfg = seen["cfg"]
    assert (cfg.max_steps, cfg.minutes, cfg.lr, cfg.seed, cfg.batch) == (7, 3, 1e-3, 4, 16)
    assert (cfg.time_shift, cfg.single_shape, cfg.two_tone, cfg.train_text) == (1.65, 0.9, 0.05, False)
    assert (cfg.half_range, cfg.jitter) == ((7.0, 12.0), 4.0)
    assert (cfg.image_data().half_range, cfg.image_data().jitter, cfg.video_data().jitter) == ((7.0, 12.0), 4.0, 4.0)
    T.train_tiny_command(model="tiny-wan-trained", out=tmp_path, steps=1)
    assert seen["cfg"].batch == 8 and seen["cfg"].jitter is None and seen["cfg"].video_data().jitter is None


def test_jitter_keeps_one_shape_near_the_centre_and_half_range_sets_its_size():
    """``jitter``: a one-shape scene's centre within jitter pixels of the image centre on both axes; scenes of
    several shapes and the default (``None``) place shapes anywhere. ``half_range`` bounds the size."""
    g = torch.Generator().manual_seed(0)
    near = TrainConfig(single_shape=1.0, two_tone=0.0, half_range=(7.0, 12.0), jitter=2.0).image_data()
    scenes = [D.random_scene(g, near) for _ in range(60)]
    assert all(abs(s.shapes[0].cx - 16) <= 2 and abs(s.shapes[0].cy - 16) <= 2 for s in scenes)
    halves = [s.shapes[0].half for s in scenes]
    assert min(halves) >= 7 and max(halves) <= 12 and max(halves) - min(halves) > 3
    r = read_sample((D.render_scene(scenes[0]) + 1) / 2)  # still drawn where the spec says (reading matches)
    assert (r.colour, r.shape) == (scenes[0].shapes[0].colour, scenes[0].shapes[0].shape)
    anywhere = [D.random_scene(g, TrainConfig(single_shape=1.0).image_data()) for _ in range(60)]
    assert max(abs(s.shapes[0].cx - 16) for s in anywhere) > 6
    several = [D.random_scene(g, TrainConfig(single_shape=0.0, jitter=0.0).image_data()) for _ in range(30)]
    assert max(abs(sh.cx - 16) for s in several for sh in s.shapes) > 6  # jitter is for one-shape scenes only
    big = TrainConfig(single_shape=1.0, jitter=16.0, half_range=(15.0, 16.0)).image_data()
    for s in (D.random_scene(g, big) for _ in range(20)):  # clamped: the shape always fits in the frame
        sh = s.shapes[0]
        assert sh.half <= sh.cx <= 32 - sh.half and sh.half <= sh.cy <= 32 - sh.half


def test_video_jitter_centres_the_trajectory_and_the_trainer_uses_it():
    g = torch.Generator().manual_seed(0)
    clips = [D.random_clip(g, D.VideoDataConfig(jitter=1.5)) for _ in range(40)]
    assert all(abs(c.cx - 16) <= 1.5 and abs(c.cy - 16) <= 1.5 for c in clips)
    assert max(abs(c.cx - 16) for c in (D.random_clip(g) for _ in range(40))) > 4
    torch.manual_seed(0)
    tr = Trainer(_tiny_cfg("tiny-wan-trained", jitter=0.0))
    x0, caps = tr.batch(4, torch.Generator().manual_seed(2), 0.0)
    video = tr.pipe.vae.unpack(x0)  # (B, 3, F, H, W)
    for v, cap in zip(video, caps):
        mid = v[:, v.shape[1] // 2]  # the middle frame: the shape sits on the centre (jitter 0)
        fg = (mid - mid[:, 0, 0].view(3, 1, 1)).abs().sum(0) > 0.5
        ys, xs = torch.nonzero(fg, as_tuple=True)
        box_x, box_y = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2  # bounding-box centre
        assert abs(float(box_x) - 16) <= 1 and abs(float(box_y) - 16) <= 1, cap


def test_clip_reader_scores_ground_truth_clips_right_and_wrong_captions_wrong():
    """The video scorer on rendered clips of its own eval cases: every colour and motion read right; the same
    clips scored against shifted cases are read wrong (the scorer compares, it does not count)."""
    from diffaccel.pipelines.trained.quality import VIDEO_EVAL_CASES, score_clips

    cfg = D.VideoDataConfig()
    clips = []
    for colour, shape, motion, bg in VIDEO_EVAL_CASES:
        video = D.render_clip(D.ClipSpec(shape, colour, motion, bg, 16.0, 16.0, 6.0), cfg)  # (3, F, H, W)
        clips.append(((video + 1) / 2).permute(1, 0, 2, 3))  # the pipeline's (F, 3, H, W) in [0, 1]
    frames = torch.stack(clips)
    s = score_clips(frames, list(VIDEO_EVAL_CASES))
    assert (s.colour, s.motion, s.n) == (1.0, 1.0, 12)
    shifted = list(VIDEO_EVAL_CASES[1:] + VIDEO_EVAL_CASES[:1])
    w = score_clips(frames, shifted)
    assert w.colour == 0.0 and w.motion == 0.0
