"""Using a trained autoencoder: load it, measure its latent statistics, reconstruct a video file.

`stdit vae reconstruct --run RUN_DIR IN_VIDEO OUT_VIDEO`; `stdit vae stats --run RUN_DIR`.
Python: `vae = load_vae(RUN_DIR)`; `latents = vae.encode(video)`; `video = vae.decode(latents)` (videos
[B, 3, T, H, W] in [-1, 1], T = 1 + 4k, H and W multiples of 8; latents scaled to unit variance).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from parallel import checkpoint
from stdit.config import vae_config_of
from stdit.models.vae import VideoVAE

STATS = "latent_stats.json"


def _locate(path: Path) -> tuple[Path, Path | None]:
    """(where the weights are: checkpoint or export directory, where latent_stats.json is or None)."""
    path = Path(path)
    weights = path if (path / "ema.safetensors").is_file() else checkpoint.resolve(path)
    for d in (path, weights, weights.parent.parent):  # given dir, checkpoint dir, run dir of a checkpoint
        if (d / STATS).is_file():
            return weights, d / STATS
    return weights, None


def load_vae(path: str | Path, device: str | torch.device = "cpu", require_stats: bool = True) -> VideoVAE:
    """The EMA autoencoder of a VAE run directory, checkpoint or export, with its latent scaling, frozen."""
    weights, stats = _locate(Path(path))
    vae = VideoVAE(vae_config_of(weights))
    checkpoint.load_weights(vae, weights, "ema")
    if stats is not None:
        s = json.loads(stats.read_text())
        vae.latent_mean.copy_(torch.tensor(s["mean"]))
        vae.latent_std.copy_(torch.tensor(s["std"]))
    elif require_stats:
        raise FileNotFoundError(f"{path}: no {STATS} beside the autoencoder's weights; measure it with "
                                f"`stdit vae stats --run {path}` (training writes it at its end)")
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def compute_latent_stats(vae: VideoVAE, videos: list[torch.Tensor]) -> dict:
    """Per-channel mean and std of the posterior means of `videos` ([C, T, H, W] each), over every position."""
    device = next(vae.parameters()).device
    total, sq, count = 0.0, 0.0, 0
    for v in videos:
        mean = vae.posterior(v[None].to(device))[0].double()
        total = total + mean.sum(dim=(0, 2, 3, 4))
        sq = sq + (mean ** 2).sum(dim=(0, 2, 3, 4))
        count += mean[0, 0].numel()
    mu = total / count
    std = (sq / count - mu ** 2).clamp_min(1e-12).sqrt()
    return {"mean": mu.tolist(), "std": std.tolist(), "samples": len(videos)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="stdit vae", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("reconstruct", help="encode and decode a video file (tiled), write the result")
    rec.add_argument("--run", required=True, help="VAE run directory, checkpoint or export")
    rec.add_argument("input")
    rec.add_argument("output")
    rec.add_argument("--device", default="auto")
    rec.add_argument("--upscale", type=int, default=1)
    st = sub.add_parser("stats", help="measure the latents' per-channel mean / std on the run's training data")
    st.add_argument("--run", required=True, help="VAE run directory")
    args = ap.parse_args(argv)

    from stdit.train import resolve_device
    if args.command == "stats":
        from stdit.config import load_config
        from stdit.data.loader import build_dataset
        run = Path(args.run)
        vae = load_vae(run, require_stats=False)
        cfg = load_config(run / "config.yaml")
        data = build_dataset(cfg.data, cfg.run.seed)
        stats = compute_latent_stats(vae, [data[i].video for i in range(min(cfg.vae.stats_samples, len(data)))])
        (run / STATS).write_text(json.dumps(stats, indent=1))
        print(f"wrote {run / STATS}: mean {stats['mean']}, std {stats['std']}")
        return
    from stdit.data.video import read_video, to_uint8, write_video
    device = resolve_device(args.device)
    vae = load_vae(args.run, device)
    frames, fps = read_video(args.input)  # [T, H, W, 3] uint8
    video = frames.permute(3, 0, 1, 2).float() / 127.5 - 1.0
    t, h, w = video.shape[1:]
    ft, fs = vae.time_factor, vae.space_factor
    keep_t, keep_h, keep_w = 1 + (t - 1) // ft * ft, h // fs * fs, w // fs * fs
    if (keep_t, keep_h, keep_w) != (t, h, w):
        print(f"note: cropping {t}x{h}x{w} to {keep_t}x{keep_h}x{keep_w} (frames 1 + {ft}k, sides multiples of {fs})")
    video = video[:, :keep_t, :keep_h, :keep_w]
    latents = vae.encode(video[None].to(device), tiled=True)
    recon = vae.decode(latents, tiled=True)[0].cpu()
    mse = torch.mean((recon.clamp(-1, 1) - video) ** 2).item()
    out = write_video(args.output, to_uint8(recon), fps=fps, upscale=args.upscale)
    print(f"wrote {out}: latents {tuple(latents.shape[1:])}, PSNR {10 * math.log10(4 / max(mse, 1e-12)):.2f} dB")
