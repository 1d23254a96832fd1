"""Training of the trained tiny pipelines: rectified flow on procedural data, CPU-friendly, resumable output.

Recipe (Liu et al. 2022, "Flow Straight and Fast"; Esser et al. 2024, "Scaling Rectified Flow Transformers" for
the logit-normal timestep density): ``x_t = (1 - t) x_0 + t e``, the denoiser predicts ``e - x_0`` (the
convention of FLUX's and Wan's flow-matching schedulers), ``t = sigmoid(n)``, ``n ~ N(0, 1)``. AdamW with a
short warm-up and a cosine decay over the wall-time budget, an EMA of the weights (what is saved), and null
caption dropout (the empty prompt, which FluxPipeline's ``negative_prompt=""`` and WanPipeline's default
negative prompt encode) so both pipelines can run classifier-free guidance.

The text encoders are trained with the denoiser (``--no-train-text``: frozen, random and seeded, with caption
embeddings computed once per distinct caption). Weights are written every ``checkpoint_seconds`` and at the end,
so an interrupted run still leaves a file. The shipped weights' commands: ``tools/train_trained.sh``.

    diffaccel train-tiny --model tiny-flux-trained --steps 6500 --jitter 4 --out weights/
"""

from __future__ import annotations

import contextlib
import copy
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from diffaccel.errors import ConfigError
from diffaccel.pipelines.trained import data as D
from diffaccel.pipelines.trained import components as C
from diffaccel.pipelines.trained.weights_io import save_pipeline_weights

TRAINABLE = ("tiny-flux-trained", "tiny-wan-trained")


@dataclass
class TrainConfig:
    """One training run. Defaults: the first CPU pilot's settings; the shipped models' runs set more options
    (``tools/train_trained.sh``, recorded in each weights file)."""

    model: str = "tiny-flux-trained"
    minutes: float = 25.0
    max_steps: int = 0  # 0: until the time budget is spent
    batch: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    ema_decay: float = 0.999
    null_prob: float = 0.1
    seed: int = 0
    checkpoint_seconds: float = 120.0
    log_every: int = 10
    train_text: bool = True
    resume: Optional[str] = None  # a weights file of the same model to start from (fine-tuning)
    time_shift: float = 1.0
    """Training times ``t`` are shifted like the sampler's sigmas, ``s t / (1 + (s - 1) t)`` (SD3's resolution
    shift, Esser et al. 2024, sec. 5.3.2). FluxPipeline samples 256 image tokens with ``mu = 0.5``, i.e.
    ``s = exp(0.5) = 1.65``: training at the same shift puts the steps where the sampler spends them (the high
    noise levels where colours and layout are decided). 1.0: no shift (the first shipped runs)."""
    single_shape: float = 0.7
    """Share of one-shape images (the rest: two or three shapes, 2:1); the eval captions have one shape."""
    two_tone: float = 0.2
    """Share of two-tone backgrounds."""
    half_range: tuple[float, float] = (6.0, 11.0)
    """Image shape half-size range in pixels (one-shape images; several shapes use the lower half of the range;
    videos keep :class:`~diffaccel.pipelines.trained.data.VideoDataConfig`'s)."""
    jitter: Optional[float] = None
    """One-shape images and videos: the shape's centre (a video: its trajectory's midpoint) within ``jitter``
    pixels of the image centre (None: anywhere)."""
    transformer_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model not in TRAINABLE:
            raise ConfigError(f"model={self.model!r}: trainable models are {', '.join(TRAINABLE)}")
        if self.minutes <= 0 and self.max_steps <= 0:
            raise ConfigError(f"minutes={self.minutes}, max_steps={self.max_steps}: one must be > 0")
        if self.batch < 1:
            raise ConfigError(f"batch={self.batch}: must be >= 1")
        if self.time_shift <= 0:
            raise ConfigError(f"time_shift={self.time_shift}: must be > 0 (1.0: no shift)")
        for name in ("single_shape", "two_tone"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}={getattr(self, name)}: must be in [0, 1]")
        lo, hi = self.half_range
        if not 1.0 <= lo <= hi <= 16.0:
            raise ConfigError(f"half_range={tuple(self.half_range)}: need 1 <= low <= high <= 16 (pixels at 32x32)")
        if self.jitter is not None and not 0.0 <= self.jitter <= 16.0:
            raise ConfigError(f"jitter={self.jitter}: must be in [0, 16] pixels (or unset: anywhere)")
        if self.model == "tiny-wan-trained":
            for name in ("single_shape", "two_tone", "half_range"):
                value, default = getattr(self, name), type(self).__dataclass_fields__[name].default
                differs = tuple(value) != tuple(default) if name == "half_range" else value != default
                if differs:
                    raise ConfigError(f"{name}={value}: an image-data option; tiny-wan-trained draws one shape per "
                                      "clip (VideoDataConfig), allowed only with tiny-flux-trained")

    def image_data(self) -> D.ImageDataConfig:
        """The data generator's settings of this run."""
        rest = 1.0 - self.single_shape
        return D.ImageDataConfig(count_weights=(self.single_shape, rest * 2 / 3, rest / 3), two_tone=self.two_tone,
                                 half_range=tuple(self.half_range), jitter=self.jitter)

    def video_data(self) -> D.VideoDataConfig:
        """The video generator's settings of this run."""
        return D.VideoDataConfig(jitter=self.jitter)


def shift_times(t: torch.Tensor, shift: float) -> torch.Tensor:
    """``shift * t / (1 + (shift - 1) * t)``: the scheduler's time shift (identity at 1.0; keeps 0 and 1 fixed)."""
    return shift * t / (1 + (shift - 1) * t)


class Trainer:
    """Holds the pipeline, the optimiser, the EMA and the caption-embedding cache of one run."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.video = cfg.model == "tiny-wan-trained"
        self.pipe = (C.wan_pipeline if self.video else C.flux_pipeline)(cfg.transformer_config)
        if cfg.resume:
            from diffaccel.pipelines.trained.weights_io import load_pipeline_weights

            self.resumed_from = load_pipeline_weights(self.pipe, Path(cfg.resume), cfg.model)["training"]
        names = ["transformer"] + ([n for n in ("text_encoder", "text_encoder_2") if getattr(self.pipe, n, None) is not None]
                                   if cfg.train_text else [])
        self.online = {n: getattr(self.pipe, n).train() for n in names}
        self.model = self.online["transformer"]
        self.ema_modules = {n: copy.deepcopy(m).eval().requires_grad_(False) for n, m in self.online.items()}
        self.ema = self.ema_modules["transformer"]
        params = [p for m in self.online.values() for p in m.parameters()]
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
        self.data_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.noise_gen = torch.Generator().manual_seed(cfg.seed + 2)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.step = 0
        if not self.video:
            from diffusers import FluxPipeline

            self._img_ids = FluxPipeline._prepare_latent_image_ids(1, 16, 16, "cpu", torch.float32)
            self._txt_ids = torch.zeros(C.FLUX_TEXT_LEN, 3)

    # -------------------------------------------------------------------------------------------- data

    @contextlib.contextmanager
    def using(self, which: str) -> Iterator[None]:
        """Run the pipeline with the ``"online"`` or the ``"ema"`` copies of the trained modules."""
        saved = {n: getattr(self.pipe, n) for n in self.online}
        for n in self.online:
            setattr(self.pipe, n, (self.online if which == "online" else self.ema_modules)[n])
        try:
            yield
        finally:
            for n, m in saved.items():
                setattr(self.pipe, n, m)

    def _embed_batch(self, caps: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Caption embeddings: through the (trained) text encoders, or from the cache when they are frozen."""
        if not self.cfg.train_text:
            embeds = [self._embed(c) for c in caps]
            pe = torch.stack([e[0] for e in embeds])
            return pe, None if self.video else torch.stack([e[1] for e in embeds])
        if self.video:
            pe, _ = self.pipe.encode_prompt(caps, do_classifier_free_guidance=False, max_sequence_length=C.WAN_TEXT_LEN)
            return pe, None
        pe, pooled, _ = self.pipe.encode_prompt(caps, prompt_2=None, max_sequence_length=C.FLUX_TEXT_LEN)
        return pe, pooled

    @torch.no_grad()
    def _embed(self, caption: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if caption not in self._cache:
            if self.video:
                pe, _ = self.pipe.encode_prompt(caption, do_classifier_free_guidance=False, max_sequence_length=C.WAN_TEXT_LEN)
                self._cache[caption] = (pe[0], None)
            else:
                pe, pooled, _ = self.pipe.encode_prompt(caption, prompt_2=None, max_sequence_length=C.FLUX_TEXT_LEN)
                self._cache[caption] = (pe[0], pooled[0])
        return self._cache[caption]

    def batch(self, n: int, gen: torch.Generator, null_prob: float) -> tuple[torch.Tensor, list[str]]:
        """Clean latents (packed tokens for FLUX, packer latents for Wan) and captions (some nulled)."""
        if self.video:
            x, caps = D.video_batch(n, gen, self.cfg.video_data())
            x0 = self.pipe.vae.pack(x)
        else:
            x, caps = D.image_batch(n, gen, self.cfg.image_data())
            from diffusers import FluxPipeline

            x0 = FluxPipeline._pack_latents(x, n, 3, 32, 32)
        drop = torch.rand(n, generator=gen) < null_prob
        caps = ["" if d else c for c, d in zip(caps, drop.tolist())]
        return x0, caps

    def predict(self, model: torch.nn.Module, xt: torch.Tensor, t: torch.Tensor, caps: list[str]) -> torch.Tensor:
        pe, pooled = self._embed_batch(caps)
        if self.video:
            return model(hidden_states=xt, timestep=t * 1000.0, encoder_hidden_states=pe, return_dict=False)[0]
        return model(
            hidden_states=xt, timestep=t, encoder_hidden_states=pe, pooled_projections=pooled,
            txt_ids=self._txt_ids, img_ids=self._img_ids, return_dict=False,
        )[0]

    def loss(self, model: torch.nn.Module, x0: torch.Tensor, caps: list[str], gen: torch.Generator) -> torch.Tensor:
        t = shift_times(torch.sigmoid(torch.randn(x0.shape[0], generator=gen)), self.cfg.time_shift)
        e = torch.randn(x0.shape, generator=gen)
        tb = t.view(-1, *([1] * (x0.dim() - 1)))
        xt = (1 - tb) * x0 + tb * e
        return torch.nn.functional.mse_loss(self.predict(model, xt, t, caps), e - x0)

    @torch.no_grad()
    def eval_loss(self, model: torch.nn.Module | None = None, n: int = 32, seed: int = 1234) -> float:
        """Loss on a fixed batch (fixed data, times and noise): comparable across steps."""
        which = "ema" if model is self.ema else "online"
        model = model or self.model
        was = model.training
        model.eval()
        g = torch.Generator().manual_seed(seed)
        x0, caps = self.batch(n, g, 0.0)
        with self.using(which):
            out = float(self.loss(model, x0, caps, g))
        model.train(was)
        return out

    # -------------------------------------------------------------------------------------------- step

    def lr_at(self, step: int, frac: float) -> float:
        warm = min(1.0, (step + 1) / max(self.cfg.warmup_steps, 1))
        return self.cfg.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))

    def train_step(self, frac: float) -> float:
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step, frac)
        x0, caps = self.batch(self.cfg.batch, self.data_gen, self.cfg.null_prob)
        loss = self.loss(self.model, x0, caps, self.noise_gen)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.step += 1
        decay = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for n, online in self.online.items():
                for pe, pm in zip(self.ema_modules[n].parameters(), online.parameters()):
                    pe.lerp_(pm, 1 - decay)
        return float(loss.detach())

    def save(self, path: Path, training: dict[str, Any]) -> None:
        with self.using("ema"):
            header = {
                "model": self.cfg.model,
                "transformer_config": dict(C.WAN_TRANSFORMER if self.video else C.FLUX_TRANSFORMER, **self.cfg.transformer_config),
                "training": training,
            }
            save_pipeline_weights(self.pipe, path, header)


def train(cfg: TrainConfig, out: Path, *, command: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run ``cfg``; write ``out/<model>.safetensors`` (+ ``.json``) regularly and at the end; return the record."""
    trainer = Trainer(cfg)
    path = Path(out) / f"{cfg.model}.safetensors"
    budget = cfg.minutes * 60.0 if cfg.minutes > 0 else float("inf")
    start = time.perf_counter()
    last_ckpt = start
    losses: list[float] = []
    initial = trainer.eval_loss()

    def record(final: bool) -> dict[str, Any]:
        tail = losses[-50:]
        return {
            "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
            "threads": torch.get_num_threads(),
            "steps": trainer.step,
            "batch": cfg.batch,
            "seconds": round(time.perf_counter() - start, 1),
            "final_loss": round(sum(tail) / max(len(tail), 1), 5),
            "eval_loss_initial": round(initial, 5),
            "eval_loss_final": round(trainer.eval_loss(trainer.ema), 5) if final else None,
            "complete": final,
            "command": command or "diffaccel train-tiny " + shlex.join(sys.argv[2:]),
            "config": {k: v for k, v in asdict(cfg).items()},
            "torch": torch.__version__,
            "resumed_from": getattr(trainer, "resumed_from", None),
        }

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps or None, desc=cfg.model, unit="step")
    while True:
        elapsed = time.perf_counter() - start
        if (cfg.max_steps and trainer.step >= cfg.max_steps) or elapsed >= budget:
            break
        frac = trainer.step / cfg.max_steps if cfg.max_steps else elapsed / budget
        losses.append(trainer.train_step(frac))
        if bar is not None:
            bar.update(1)
            if trainer.step % cfg.log_every == 0:
                bar.set_postfix(loss=f"{sum(losses[-cfg.log_every:]) / cfg.log_every:.4f}", lr=f"{trainer.lr_at(trainer.step, frac):.2e}")
        if time.perf_counter() - last_ckpt > cfg.checkpoint_seconds:
            trainer.save(path, record(final=False))
            last_ckpt = time.perf_counter()
    if bar is not None:
        bar.close()
    rec = record(final=True)
    trainer.save(path, rec)
    return rec


def train_tiny_command(
    model: str = "tiny-flux-trained",
    minutes: float = 25.0,
    out: Path = Path("."),
    steps: int = 0,
    batch: int = 0,
    lr: float = 2e-3,
    seed: int = 0,
    threads: Optional[int] = None,
    resume: Optional[Path] = None,
    train_text: bool = True,
    time_shift: float = 1.0,
    single_shape: float = 0.7,
    two_tone: float = 0.2,
    half_range: tuple[float, float] = (6.0, 11.0),
    jitter: Optional[float] = None,
) -> None:
    """Train a trained tiny pipeline (tiny-flux-trained, tiny-wan-trained) from SEED; write OUT/<model>.safetensors.

    Shipped weights: ``--out diffaccel/pipelines/trained/weights``. ``--batch 0``: 16 images or 8 videos.
    ``--threads``: torch CPU threads (default: torch's). ``--resume FILE``: fine-tune from a weights file.
    ``--no-train-text``: keep the random text encoders frozen. ``--time-shift S``: train at the sampler's
    shifted times (1.65: FluxPipeline at 32x32). ``--single-shape P`` / ``--two-tone P``: share of one-shape
    images / of two-tone backgrounds. ``--half-range LO HI``: shape half-size in pixels. ``--jitter PX``: one-shape
    images keep the shape's centre within PX pixels of the image centre (default: anywhere). ``--steps N`` makes the run reproducible (the learning-rate schedule
    follows the steps; ``--minutes`` is then a cap).
    """
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"threads={threads}: must be >= 1")
        torch.set_num_threads(threads)
    if batch == 0:
        batch = 8 if model == "tiny-wan-trained" else 16
    cfg = TrainConfig(model=model, minutes=minutes, max_steps=steps, batch=batch, lr=lr, seed=seed,
                      resume=str(resume) if resume else None, train_text=train_text, time_shift=time_shift,
                      single_shape=single_shape, two_tone=two_tone, half_range=tuple(half_range), jitter=jitter)
    rec = train(cfg, out)
    print(f"{model}: {rec['steps']} steps in {rec['seconds']} s, final loss {rec['final_loss']}, "
          f"eval loss {rec['eval_loss_initial']} -> {rec['eval_loss_final']}; wrote {Path(out) / (model + '.safetensors')}")
