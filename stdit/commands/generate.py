"""`stdit generate --run RUN_DIR --prompt TEXT --out FILE [mode options]`: sample a video (or an image) with the
EMA weights of a run or an exported checkpoint directory, in any mode (stdit/conditioning.py), or a long video by
an FDM schedule (stdit/longvideo.py); stdit/generate.py does the work."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from stdit.config import ConfigError, clip_shapes
from stdit.data.video import IMAGE_SUFFIXES, to_uint8, write_video
from stdit.generate import check_memory, generate, load_for_generation, read_clip, sampling_overrides
from stdit.grid import latent_shape, token_grid
from stdit.longvideo import SCHEMES, describe, generate_long, schedule


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="stdit generate", description=__doc__)
    ap.add_argument("--run", required=True, help="run directory (uses its latest checkpoint) or checkpoint directory")
    ap.add_argument("--prompt", required=True, action="append",
                    help="the caption; with --length, repeat it to give each equal segment its own prompt")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--height", type=int, default=24)
    ap.add_argument("--width", type=int, default=24)
    ap.add_argument("--fps", type=float, default=8.0)
    ap.add_argument("--steps", type=int, default=None, help="Euler steps (default: diffusion.sample_steps)")
    ap.add_argument("--cfg-scale", type=float, default=None, help="guidance scale (default: diffusion.cfg_scale)")
    ap.add_argument("--cfg-scale-given", type=float, default=None, help="guidance scale with given frames "
                    "(default: diffusion.cfg_scale_given, else the guidance scale)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", choices=["ema", "model"], default="ema")
    ap.add_argument("--upscale", type=int, default=4, help="nearest-neighbour upscaling of the written video")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", required=True, help="output file: .mp4 (H.264 via PyAV), .gif, or .png/.jpg (1 frame)")
    ap.add_argument("--expand-prompt", metavar="MODEL", help="rewrite each --prompt in the style of the run's "
                    "training captions with this local instruct model first (stdit/prompt.py); the prompts are "
                    "printed and kept beside the output as OUT.prompt.json")
    g = ap.add_argument_group("modes (at most one; none: text-to-video, or text-to-image with --frames 1)")
    g.add_argument("--condition", metavar="FILE", help="image-to-video / continuation: the first --cond-frames "
                   "frames of an image or video start the output")
    g.add_argument("--extend-forward", metavar="CLIP", help="the last --cond-frames frames of CLIP start the output")
    g.add_argument("--extend-backward", metavar="CLIP", help="the first --cond-frames frames of CLIP end the output")
    g.add_argument("--loop", action="store_true", help="the output closes on itself (on --condition's first frame "
                   "if given, else on a first frame generated from the prompt)")
    g.add_argument("--connect", nargs=2, metavar=("A", "B"), help="A's last and B's first --cond-frames frames, "
                   "generated in between")
    g.add_argument("--keyframe", action="append", metavar="FILE@T", help="an image at frame T (repeatable)")
    g.add_argument("--edit", metavar="CLIP", help="video-to-video: start from CLIP noised to --strength")
    g.add_argument("--strength", type=float, default=0.7, help="noise level --edit starts from (0, 1]")
    g.add_argument("--cond-frames", type=int, default=1, help="frames of a given clip (default 1)")
    g.add_argument("--length", type=int, help="a long video of this many frames, made by --scheme")
    g.add_argument("--scheme", choices=SCHEMES, default="hierarchical", help="FDM schedule of --length")
    g.add_argument("--context", type=int, default=None, help="frames given per stage (--length; default half)")
    g.add_argument("--dry-run", action="store_true", help="with --length: print the schedule and stop")
    return ap


def _mode(args, ap) -> str:
    chosen = [m for m, on in (("i2v", args.condition), ("extend_forward", args.extend_forward),
                              ("extend_backward", args.extend_backward), ("connect", args.connect),
                              ("keyframes", args.keyframe), ("edit", args.edit), ("long", args.length)) if on]
    if len(chosen) > 1 or (args.loop and chosen not in ([], ["i2v"])):
        ap.error(f"choose one mode, got {' and '.join(chosen + (['loop'] if args.loop else []))}")
    if len(args.prompt) > 1 and not args.length:
        ap.error("several --prompt need --length (one per segment of a long video)")
    return "loop" if args.loop else (chosen[0] if chosen else "t2v")


def _checked(args, ap) -> None:
    for name in ("frames", "height", "width", "upscale"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not args.fps > 0:
        ap.error(f"--fps must be > 0, got {args.fps}")
    if args.steps is not None and args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
    if not 0 < args.strength <= 1:
        ap.error(f"--strength must be in (0, 1], got {args.strength}")
    if Path(args.out).suffix.lower() in IMAGE_SUFFIXES and (args.frames != 1 or args.length):
        ap.error(f"--out {args.out} names an image: use --frames 1, or write .mp4 / .gif")


def main(argv: list[str] | None = None) -> Path:
    ap = _parser()
    args = ap.parse_args(argv)
    _checked(args, ap)
    mode = _mode(args, ap)
    expanded = _expand(args, ap) if args.expand_prompt else None
    overrides = sampling_overrides(args)
    try:
        model, text_encoder, cfg = load_for_generation(args.run, args.device, args.weights, overrides)
    except ConfigError as e:
        ap.error(f"{args.run}: {e}")
    shape, vae, factors = (args.frames, args.height, args.width), None, (1, 1)
    if cfg.model.vae is not None:  # the DiT denoises latents: sample the latent shape, then decode
        from stdit.autoencoder import load_vae
        vae = load_vae(cfg.model.vae, next(model.parameters()).device)
        factors = (vae.time_factor, vae.space_factor)
    if mode == "long":
        return _keep_prompts(_long(args, ap, model, text_encoder, cfg, vae, factors), expanded, args.dry_run)
    try:
        token_grid(shape, cfg.model.patch_size, factors)
    except ValueError as e:
        ap.error(f"--frames/--height/--width: {e}")
    try:  # before any sampling: a request that cannot fit is refused, naming what to lower
        check_memory(cfg, shape, next(model.parameters()).device, factors, args.upscale, args.cfg_scale)
    except ValueError as e:
        ap.error(str(e))
    hw = (args.height, args.width)
    try:
        inputs = _inputs(args, mode, hw)
        steps = args.steps or cfg.diffusion.sample_steps
        with tqdm(total=steps, desc="sample", mininterval=1.0) as bar:
            video = generate(model, text_encoder, cfg, args.prompt[0], shape, mode, vae, k=args.cond_frames,
                             strength=args.strength, seed=args.seed, fps=args.fps, steps=steps,
                             cfg_scale=args.cfg_scale, progress=bar, **inputs)
        out = write_video(args.out, to_uint8(video), fps=args.fps, upscale=args.upscale)
    except ValueError as e:
        ap.error(str(e))
    print(f"wrote {out} ({mode}, {args.frames} frames, {args.height}x{args.width}, x{args.upscale} upscaled)")
    return _keep_prompts(out, expanded)


def _expand(args, ap) -> list[dict]:
    """--expand-prompt: each --prompt rewritten in the style of the run's training captions (the model is freed
    before the DiT loads); args.prompt becomes the expansions. Returns the records kept beside the output."""
    from stdit.config import load_config
    from stdit.generate import find_checkpoint
    from stdit.prompt import PromptExpander, style_examples
    cfg = load_config(find_checkpoint(Path(args.run)) / "config.yaml")
    try:
        expander = PromptExpander(args.expand_prompt, style_examples(cfg.data, seed=args.seed), args.device,
                                  seed=args.seed)
    except ValueError as e:
        ap.error(str(e))
    records = [expander.record(p, expander.expand(p)) for p in args.prompt]
    expander.close()
    for r in records:
        print(f"expanded prompt: {r['expanded']}")
    args.prompt = [r["expanded"] for r in records]
    return records


def _keep_prompts(out: Path, records: list[dict] | None, dry_run: bool = False) -> Path:
    """With --expand-prompt, the prompts (short and expanded, model, settings, examples) as OUT.prompt.json."""
    if records and not dry_run:
        path = Path(out).with_suffix(".prompt.json")
        path.write_text(json.dumps(records, indent=1))
        print(f"wrote {path}")
    return out


def _inputs(args, mode: str, hw) -> dict:
    """The pixel clips a mode is given, read from the files named."""
    if mode == "i2v":
        k = args.cond_frames
        if not 1 <= k < args.frames:
            raise ValueError(f"--cond-frames={k} must be in [1, --frames - 1 = {args.frames - 1}]")
        clip = read_clip(args.condition, hw, k)
        if clip.shape[1] < k:
            raise ValueError(f"{args.condition} holds {clip.shape[1]} frames, fewer than --cond-frames={k}")
        return {"image": clip[:, :k]}
    if mode == "loop":
        return {"image": read_clip(args.condition, hw, 1)[:, :1] if args.condition else None}
    if mode in ("extend_forward", "extend_backward", "edit"):
        path = getattr(args, mode)
        return {"clip": read_clip(path, hw)}
    if mode == "connect":
        return {"clip": read_clip(args.connect[0], hw), "clip_b": read_clip(args.connect[1], hw)}
    if mode == "keyframes":
        frames = []
        for spec in args.keyframe:
            path, _, at = spec.rpartition("@")
            if not path or not at.isdigit():
                raise ValueError(f"--keyframe {spec!r}: give FILE@FRAME, e.g. key.png@7")
            frames.append((read_clip(path, hw, 1)[:, :1], int(at)))
        return {"keyframes": frames}
    return {}


def _long(args, ap, model, text_encoder, cfg, vae, factors) -> Path:
    """--length N: a long video by an FDM schedule over the model's training window."""
    window = max(latent_shape((t, factors[1], factors[1]), factors)[0] for t, _, _ in clip_shapes(cfg.data))
    try:
        length = latent_shape((args.length, args.height, args.width), factors)
        stages = schedule(args.scheme, length[0], window, args.context)
    except ValueError as e:
        ap.error(str(e))
    if args.dry_run:
        print(f"{args.scheme}: {length[0]} frames in {len(stages)} stages of at most {window} frames")
        print(describe(stages, args.prompt, length[0]))
        return Path(args.out)
    try:
        check_memory(cfg, (args.length, args.height, args.width), next(model.parameters()).device, factors,
                     args.upscale, args.cfg_scale, window, "--length, --height, --width")
    except ValueError as e:
        ap.error(str(e))
    with tqdm(total=len(stages), desc="stages", mininterval=1.0) as bar:
        try:
            video = generate_long(model, text_encoder, args.prompt, length[0], length[1:], window, args.scheme,
                                  cfg.model, cfg.diffusion, seed=args.seed, fps=args.fps, steps=args.steps,
                                  cfg_scale=args.cfg_scale, context=args.context, progress=bar)
        except ValueError as e:
            ap.error(str(e))
    if vae is not None:
        video = vae.decode(video[None].to(next(vae.parameters()).device), tiled=True)[0].cpu()
    out = write_video(args.out, to_uint8(video), fps=args.fps, upscale=args.upscale)
    print(f"wrote {out} ({args.scheme}, {args.length} frames in {len(stages)} stages)")
    return out
