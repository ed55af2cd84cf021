"""`stdit vae reconstruct --run RUN_DIR IN_VIDEO OUT_VIDEO` (encode + decode a video file with a trained autoencoder)
and `stdit vae stats --run RUN_DIR` (measure its latents' per-channel mean / std); stdit/autoencoder.py does the
work."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from stdit.autoencoder import STATS, compute_latent_stats, load_vae
from stdit.device import resolve_device


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
    if args.command == "stats":
        stats(Path(args.run))
    else:
        reconstruct(args.run, args.input, args.output, resolve_device(args.device), args.upscale)


def stats(run: Path) -> None:
    from stdit.config import load_config
    from stdit.data.loader import build_dataset
    vae = load_vae(run, require_stats=False)
    cfg = load_config(run / "config.yaml")
    data = build_dataset(cfg.data, cfg.run.seed)
    found = compute_latent_stats(vae, [data[i].video for i in range(min(cfg.vae.stats_samples, len(data)))])
    (run / STATS).write_text(json.dumps(found, indent=1))
    print(f"wrote {run / STATS}: mean {found['mean']}, std {found['std']}")


def reconstruct(run: str, src: str, dst: str, device: torch.device, upscale: int) -> None:
    from stdit.data.video import read_video, to_uint8, write_video
    vae = load_vae(run, device)
    frames, fps = read_video(src)  # [T, H, W, 3] uint8
    video = frames.permute(3, 0, 1, 2).float() / 127.5 - 1.0
    t, h, w = video.shape[1:]
    ft, fs = vae.time_factor, vae.space_factor
    keep_t, keep_h, keep_w = 1 + (t - 1) // ft * ft, h // fs * fs, w // fs * fs  # the largest shape that fits
    if (keep_t, keep_h, keep_w) != (t, h, w):
        print(f"note: cropping {t}x{h}x{w} to {keep_t}x{keep_h}x{keep_w} (frames 1 + {ft}k, sides multiples of {fs})")
    video = video[:, :keep_t, :keep_h, :keep_w]
    latents = vae.encode(video[None].to(device), tiled=True)
    recon = vae.decode(latents, tiled=True)[0].cpu()
    mse = torch.mean((recon.clamp(-1, 1) - video) ** 2).item()
    out = write_video(dst, to_uint8(recon), fps=fps, upscale=upscale)
    print(f"wrote {out}: latents {tuple(latents.shape[1:])}, PSNR {10 * math.log10(4 / max(mse, 1e-12)):.2f} dB")
