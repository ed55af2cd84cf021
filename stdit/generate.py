"""Generation from a trained run: its model and text encoder rebuilt from a checkpoint (or an exported checkpoint
directory), and conditioning clips for sample_videos. `stdit generate`: stdit/commands/generate.py."""
from __future__ import annotations

from pathlib import Path

import torch

from parallel import checkpoint
from stdit.config import load_config
from stdit.device import resolve_device
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


def condition_of(path: str | Path, frames: int, shape: tuple[int, int, int], patch_size, vae=None):
    """(clean video in the model's space, bool mask over token frames) for sample_videos: the first `frames`
    frames of the image / video at `path`, fitted to `shape` = (T, H, W) pixels. With an autoencoder the clip is
    encoded whole (later frames repeat the last given one); its causal encoder makes the first 1 + (frames-1)//4
    latent frames depend on the given frames only, and those are the ones given."""
    from stdit.data.shards import decode, fit_to_bucket
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    t, h, w = shape
    if not 1 <= frames < t:
        raise ValueError(f"--cond-frames={frames} must be in [1, --frames - 1 = {t - 1}]")
    try:
        clip, _ = decode(path.read_bytes(), path.suffix.lower().lstrip("."), frames)
    except Exception as e:
        raise ValueError(f"{path} cannot be decoded ({type(e).__name__}: {e})") from None
    if clip.shape[0] < frames:
        raise ValueError(f"{path} holds {clip.shape[0]} frames, fewer than --cond-frames={frames}")
    video = fit_to_bucket(clip, [(h, w)])  # [3, frames, h, w]
    video = torch.cat([video, video[:, -1:].expand(-1, t - frames, -1, -1)], dim=1)
    given = frames
    if vae is not None:
        video = vae.encode(video[None].to(next(vae.parameters()).device), tiled=True)[0].cpu()
        given = 1 + (frames - 1) // vae.time_factor
    pt = patch_size[0]
    if given % pt:
        raise ValueError(f"{given} given (latent) frames do not fill whole temporal patches of {pt}")
    mask = torch.zeros(video.shape[1] // pt, dtype=torch.bool)
    mask[:given // pt] = True
    return video, mask


def load_for_generation(run: str | Path, device: str = "auto", weights: str = "ema"):
    """(model, text encoder, config) rebuilt from a checkpoint's resolved config and weights."""
    ckpt = find_checkpoint(Path(run))
    cfg = load_config(ckpt / "config.yaml", [f"run.device={device}"])
    dev = resolve_device(cfg.run.device)
    text_encoder = TextEncoder.from_config(cfg.text).to(dev)
    model = build_model(cfg.model, text_encoder.dim)
    checkpoint.load_weights(model, ckpt, weights)
    return model.to(dev).eval(), text_encoder, cfg
