"""`stdit eval --run RUN_DIR --out OUT`: generate held-out clips of the synthetic world in each mode (text, image,
extension both ways, loop, connect, keyframes, edit, long videos by each FDM scheme) and measure from pixels whether
they show what their captions say and keep their given frames (stdit/evaluate.py does the work); prints the
results tables."""
from __future__ import annotations

import argparse
from pathlib import Path

from stdit.eval_report import markdown
from stdit.evaluate import DEFAULT_MODES, LONG_FACTORS, MODES, evaluate, expand_modes
from stdit.generate import sampling_overrides


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="stdit eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="modes:\n" + "\n".join(f"  {k:16s} {v}" for k, v in MODES.items()))
    ap.add_argument("--run", required=True, help="run directory (uses its latest checkpoint) or checkpoint directory")
    ap.add_argument("--out", required=True, help="directory for results.json, results.md, contact sheets, "
                    "report.html and tb/")
    ap.add_argument("--n", type=int, default=16, help="clips per short mode (default 16)")
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES),
                    help=f"comma-separated mode names (below), or all (default {','.join(DEFAULT_MODES)})")
    ap.add_argument("--long-n", type=int, default=4, help="clips per long-video scheme and length (default 4: "
                    "long videos are slow)")
    ap.add_argument("--long-factors", default=",".join(map(str, LONG_FACTORS)),
                    help="long-video lengths in multiples of the training window (default 2,4,8)")
    ap.add_argument("--strength", type=float, default=0.7, help="edit: noise level the edited clip starts from, "
                    "in (0, 1] (default 0.7)")
    ap.add_argument("--steps", type=int, default=None, help="Euler steps (default: diffusion.sample_steps)")
    ap.add_argument("--cfg-scale", type=float, default=None, help="guidance scale (default: diffusion.cfg_scale)")
    ap.add_argument("--cfg-scale-given", type=float, default=None, help="guidance scale for clips with given "
                    "frames (default: diffusion.cfg_scale_given, else the guidance scale)")
    ap.add_argument("--seed", type=int, default=0, help="picks the held-out captions and the noise")
    ap.add_argument("--batch", type=int, default=8, help="clips per sampling call (short modes)")
    ap.add_argument("--weights", choices=["ema", "model"], default="ema")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--expand-prompt", metavar="MODEL", help="also run each short mode on its captions rewritten "
                    "by this local instruct model (mode NAME+expanded), to compare short and expanded prompts")
    args = ap.parse_args(argv)
    try:
        modes = expand_modes([m.strip() for m in args.modes.split(",") if m.strip()])
    except ValueError as e:
        ap.error(f"--modes: {e}")
    try:
        factors = [int(f) for f in args.long_factors.split(",") if f.strip()]
    except ValueError:
        factors = []
    if not factors or min(factors) < 1:
        ap.error(f"--long-factors must be comma-separated positive integers, got {args.long_factors!r}")
    if args.n < 1 or args.batch < 1 or args.long_n < 1:
        ap.error("--n, --long-n and --batch must be >= 1")
    if not 0.0 < args.strength <= 1.0:
        ap.error(f"--strength must be in (0, 1], got {args.strength}")
    if args.expand_prompt and not (Path(args.expand_prompt) / "config.json").is_file():
        ap.error(f"--expand-prompt {args.expand_prompt}: not a local transformers model folder (no config.json)")
    overrides = sampling_overrides(args)
    try:
        results = evaluate(args.run, args.out, n=args.n, modes=modes, seed=args.seed, steps=args.steps,
                           cfg_scale=args.cfg_scale, device=args.device, weights=args.weights, batch=args.batch,
                           progress=True, long_n=args.long_n, long_factors=factors, strength=args.strength,
                           expand_prompt=args.expand_prompt, overrides=overrides)
    except ValueError as e:
        ap.error(str(e))
    print(markdown(results), end="")
    print(f"wrote {args.out}/results.json, results.md, contact_*.png, report.html, tb/")
    return results
