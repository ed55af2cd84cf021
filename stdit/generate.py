"""Generation from a trained run: its model and text encoder rebuilt from a checkpoint (or an exported checkpoint
directory), and `generate(...)`, one video in any mode (stdit/conditioning.py); long videos: stdit/longvideo.py.
`stdit generate`: stdit/commands/generate.py.

    model, text_encoder, cfg = load_for_generation("runs/tiny")
    video = generate(model, text_encoder, cfg, "a red square moving left on a blue background", (8, 24, 24))
    video = generate(..., mode="extend_backward", clip=read_clip("end.mp4", (24, 24)), k=2)
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from parallel import checkpoint
from stdit.conditioning import Given, condition_for, mode_givens
from stdit.config import load_config
from stdit.device import resolve_device
from stdit.diffusion.sampler import sample_videos
from stdit.grid import latent_shape
from stdit.models.stdit import build_model
from stdit.models.text import TextEncoder


def find_checkpoint(path: Path) -> Path:
    """A run directory (its latest checkpoint), a checkpoint directory, or an exported one (`stdit ckpt export`)."""
    if (path / "ema.safetensors").is_file() or (path / "manifest.json").is_file():
        return path
    found = checkpoint.latest(path)
    if found is None:
        raise FileNotFoundError(f"{path} holds no checkpoint (no complete checkpoints/step_* and no exported "
                                "ema.safetensors); train first or pass a checkpoint directory")
    return found


def read_clip(path: str | Path, hw: tuple[int, int], max_frames: int = 100_000) -> torch.Tensor:
    """An image or video file as [3, n, H, W] in [-1, 1] (up to max_frames frames), resized to cover (H, W) and
    centre-cropped; ValueError names a file that is missing or does not decode."""
    from stdit.data.shards import decode, fit_to_bucket
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    try:
        clip, _ = decode(path.read_bytes(), path.suffix.lower().lstrip("."), max_frames)
    except Exception as e:
        raise ValueError(f"{path} cannot be decoded ({type(e).__name__}: {e})") from None
    return fit_to_bucket(clip, [tuple(hw)])


def condition_of(path: str | Path, frames: int, shape: tuple[int, int, int], patch_size, vae=None):
    """(clean video in the model's space, bool mask over token frames) for sample_videos: the first `frames`
    frames of the image / video at `path` start a clip of `shape` = (T, H, W) pixels (stdit/conditioning.py
    says how given pixel frames map to latent frames)."""
    t, h, w = shape
    if not 1 <= frames < t:
        raise ValueError(f"--cond-frames={frames} must be in [1, --frames - 1 = {t - 1}]")
    clip = read_clip(path, (h, w), frames)
    if clip.shape[1] < frames:
        raise ValueError(f"{path} holds {clip.shape[1]} frames, fewer than --cond-frames={frames}")
    return condition_for([Given(clip[:, :frames], 0)], shape, patch_size, vae)


@torch.no_grad()
def generate(model, text_encoder, cfg, prompt: str, shape: tuple[int, int, int], mode: str = "t2v", vae=None,
             image=None, clip=None, clip_b=None, k: int = 1, keyframes=None, strength: float = 0.7, seed: int = 0,
             fps: float = 8.0, steps: int | None = None, cfg_scale: float | None = None, progress=None) -> torch.Tensor:
    """One video [3, T, H, W] in [-1, 1] pixels of `shape` = (T, H, W) in any mode of stdit/conditioning.py.

    image [3, 1, H, W]; clip, clip_b [3, n, H, W] (pixels, [-1, 1]); k: frames of a clip given; keyframes:
    [(image, frame)]; strength: noise level an edited clip starts from (edit). With model.vae the model samples
    latents and the result is decoded."""
    ft, fs = (vae.time_factor, vae.space_factor) if vae is not None else (1, 1)
    if mode == "loop" and image is None:  # the clip closes on a first frame of its own
        image = generate(model, text_encoder, cfg, prompt, (1, *shape[1:]), "t2v", vae, seed=seed, fps=fps,
                         steps=steps, cfg_scale=cfg_scale)
    givens, frames = mode_givens(mode, shape[0], ft, image, clip, clip_b, k, keyframes)
    sampled = (frames, *shape[1:])
    condition = condition_for(givens, sampled, cfg.model.patch_size, vae)
    if condition is not None and cfg.model.temporal_causal:
        given = condition[1]
        if given[int((~given).nonzero()[0]):].any():
            raise ValueError(f"mode {mode} gives frames after generated ones, but this model is causal in time "
                             "(model.temporal_causal=true): its frames never see later ones; use a "
                             "bidirectional model, or a mode that gives only the first frames")
    edit = None
    if mode == "edit":
        if clip is None or tuple(clip.shape[1:]) != tuple(shape):
            raise ValueError(f"edit needs a clip of {shape} (frames, height, width) frames, got "
                             f"{None if clip is None else tuple(clip.shape[1:])}")
        edit = clip if vae is None else vae.encode(clip[None].to(next(vae.parameters()).device), tiled=True)[0].cpu()
    (video,) = sample_videos(model, text_encoder, [prompt], [latent_shape(sampled, (ft, fs))], cfg.model,
                             cfg.diffusion, seed=seed, fps=fps, steps=steps, cfg_scale=cfg_scale, progress=progress,
                             conditions=[condition],
                             edits=[edit], strength=strength)
    if vae is not None:
        video = vae.decode(video[None].to(next(vae.parameters()).device), tiled=True)[0].cpu()
    return video[:, :shape[0]]


def check_memory(cfg, shape: tuple[int, int, int], device, factors=(1, 1), upscale: int = 1, cfg_scale=None,
                 window: int | None = None, lower: str = "--frames, --height, --width") -> None:
    """Refuse, before sampling, a request that will not fit in memory (stdit/estimate.py: sampling_bytes): a
    ValueError naming the estimate, the memory free and the arguments to lower. `window`: the frames one call
    samples in latent frames (a stage of --length), else all of `shape` = (frames, height, width) pixels."""
    from stdit.estimate import GIB, HEADROOM, available_bytes, sampling_bytes
    t, h, w = shape
    (ft, fs), patch = factors, cfg.model.patch_size
    latent = (min(window or t, 1 + (t - 1) // ft), h // fs, w // fs)
    guided = (cfg.diffusion.cfg_scale if cfg_scale is None else cfg_scale) != 1.0
    tokens = math.prod(-(-n // p) for n, p in zip(latent, patch)) * (2 if guided else 1)
    device = torch.device(device)
    parts = sampling_bytes(cfg, tokens, t, h, w, upscale, device.type)
    device_free, host_free = available_bytes(device)
    on_device = parts["latents"] + parts["activations"] + (0 if device.type == "cuda" else parts["video"])
    checks = [(on_device, device_free, str(device))] + ([(parts["video"], host_free, "host memory")]
                                                        if device.type == "cuda" else [])
    for need, free, where in checks:
        if need > HEADROOM * free:
            detail = ", ".join(f"{k} {v / GIB:.3g}" for k, v in parts.items())
            raise ValueError(
                f"sampling {t}x{h}x{w} (frames x height x width, {tokens:,} tokens per model call"
                f"{' with guidance' if guided else ''}) needs about {need / GIB:.3g} GiB ({detail} GiB) but {where} "
                f"has {free / GIB:.3g} GiB free; lower {lower} or --upscale")


def sampling_overrides(args) -> list[str]:
    """The config overrides a command's --cfg-scale-given asks for."""
    return [] if args.cfg_scale_given is None else [f"diffusion.cfg_scale_given={args.cfg_scale_given}"]


def load_for_generation(run: str | Path, device: str = "auto", weights: str = "ema", overrides=()):
    """(model, text encoder, config) rebuilt from a checkpoint's resolved config and weights; `overrides`
    (key=value) change sampling settings, e.g. diffusion.cfg_scale_given=1."""
    ckpt = find_checkpoint(Path(run))
    cfg = load_config(ckpt / "config.yaml", [f"run.device={device}", *overrides])
    dev = resolve_device(cfg.run.device)
    text_encoder = TextEncoder.from_config(cfg.text).to(dev)
    model = build_model(cfg.model, text_encoder.dim)
    checkpoint.load_weights(model, ckpt, weights)
    return model.to(dev).eval(), text_encoder, cfg
