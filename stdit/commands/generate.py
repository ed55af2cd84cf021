"""`stdit generate --run RUN_DIR --prompt TEXT --out FILE`: sample a video with the EMA weights of a run (or an
exported checkpoint directory) and write it (stdit/generate.py does the work)."""
from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from stdit.data.video import to_uint8, write_video
from stdit.diffusion.sampler import sample_videos
from stdit.generate import condition_of, load_for_generation
from stdit.grid import latent_shape, token_grid


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
    shape, vae, factors = (args.frames, args.height, args.width), None, (1, 1)
    if cfg.model.vae is not None:  # the DiT denoises latents: sample the latent shape, then decode
        from stdit.autoencoder import load_vae
        vae = load_vae(cfg.model.vae, next(model.parameters()).device)
        factors = (vae.time_factor, vae.space_factor)
    try:
        token_grid(shape, cfg.model.patch_size, factors)
    except ValueError as e:
        ap.error(f"--frames/--height/--width: {e}")
    condition = None
    if args.condition is not None:
        try:
            condition = condition_of(args.condition, args.cond_frames, shape, cfg.model.patch_size, vae)
        except ValueError as e:
            ap.error(f"--condition: {e}")
    steps = args.steps or cfg.diffusion.sample_steps
    with tqdm(total=steps, desc="sample", mininterval=1.0) as bar:
        (video,) = sample_videos(model, text_encoder, [args.prompt], [latent_shape(shape, factors)], cfg.model,
                                 cfg.diffusion, seed=args.seed, fps=args.fps, steps=steps, cfg_scale=args.cfg_scale,
                                 progress=bar, conditions=[condition])
    if vae is not None:
        video = vae.decode(video[None].to(next(vae.parameters()).device), tiled=True)[0].cpu()
    out = write_video(args.out, to_uint8(video), fps=args.fps, upscale=args.upscale)
    print(f"wrote {out} ({args.frames} frames, {args.height}x{args.width}, x{args.upscale} upscaled)")
    return out
