"""Sampling to video files with the EMA weights of a run (or an exported checkpoint directory)."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from parallel import checkpoint
from stdit.config import load_config
from stdit.data.video import to_uint8, write_video
from stdit.diffusion.sampler import sample_videos
from stdit.models.stdit import build_model
from stdit.models.text import TextEncoder
from stdit.train import resolve_device


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


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(prog="stdit generate", description=__doc__)
    ap.add_argument("--run", required=True, help="run directory (uses its latest checkpoint) or checkpoint directory")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--height", type=int, default=24)
    ap.add_argument("--width", type=int, default=24)
    ap.add_argument("--fps", type=float, default=8.0)
    ap.add_argument("--steps", type=int, default=None, help="Euler steps (default: diffusion.sample_steps)")
    ap.add_argument("--cfg-scale", type=float, default=None, help="guidance scale (default: diffusion.cfg_scale)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", choices=["ema", "model"], default="ema")
    ap.add_argument("--upscale", type=int, default=4, help="nearest-neighbour upscaling of the written video")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", required=True, help="output file: .mp4 (H.264 via PyAV) or .gif")
    ap.add_argument("--condition", help="image or video whose first --cond-frames frames start the clip "
                    "(image-to-video, continuation); resized and centre-cropped to --height x --width")
    ap.add_argument("--cond-frames", type=int, default=1, help="frames of --condition given (default 1)")
    args = ap.parse_args(argv)

    model, text_encoder, cfg = load_for_generation(args.run, args.device, args.weights)
    shape = (args.frames, args.height, args.width)
    vae = None
    if cfg.model.vae is not None:  # the DiT denoises latents: sample the latent shape, then decode
        from stdit.autoencoder import load_vae
        vae = load_vae(cfg.model.vae, next(model.parameters()).device)
        try:
            shape = vae.latent_shape(*shape)
        except ValueError as e:
            ap.error(f"--frames/--height/--width: {e}")
    pt, ph, pw = cfg.model.patch_size
    if shape[0] % pt or shape[1] % ph or shape[2] % pw:
        ap.error(f"--frames/--height/--width must be divisible by the patch size {cfg.model.patch_size}"
                 + (" after the autoencoder's compression" if vae is not None else ""))
    condition = None
    if args.condition is not None:
        try:
            condition = condition_of(args.condition, args.cond_frames, (args.frames, args.height, args.width),
                                     cfg.model.patch_size, vae)
        except ValueError as e:
            ap.error(f"--condition: {e}")
    steps = args.steps or cfg.diffusion.sample_steps
    with tqdm(total=steps, desc="sample", mininterval=1.0) as bar:
        (video,) = sample_videos(model, text_encoder, [args.prompt], [shape], cfg.model, cfg.diffusion,
                                 seed=args.seed, fps=args.fps, steps=steps, cfg_scale=args.cfg_scale, progress=bar,
                                 conditions=[condition])
    if vae is not None:
        video = vae.decode(video[None].to(next(vae.parameters()).device), tiled=True)[0].cpu()
    out = write_video(args.out, to_uint8(video), fps=args.fps, upscale=args.upscale)
    print(f"wrote {out} ({args.frames} frames, {args.height}x{args.width}, x{args.upscale} upscaled)")
    return out


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
